//! `doctor` tells the truth: each broken prerequisite is a ✘ line with its fix and a non-zero exit.

use std::process::Command;

use crate::common;

struct Run {
    code: i32,
    stdout: String,
}

fn doctor(config: &str, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let text = format!("state_dir = {:?}\n{config}", dir.path().join("state"));
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_docusearch-agent"));
    cmd.arg("--config").arg(&path).arg("doctor");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs the binary");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
    }
}

fn line<'a>(run: &'a Run, check: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.contains(&format!(" {check}:")))
        .unwrap_or_else(|| panic!("no `{check}` line in:\n{}", run.stdout))
}

#[test]
fn doctor_reports_a_working_setup_and_a_reachable_chroma() {
    let chroma = common::start_chroma();
    let model = common::fixture("tiny-colpali");
    let cfg = format!(
        "[chroma]\nurl = {:?}\n[model]\nname = {:?}\ndevice = \"cpu\"\n",
        chroma.url(),
        model
    );
    let run = doctor(&cfg, &[]);
    assert!(
        line(&run, "configuration").starts_with('✔'),
        "{}",
        run.stdout
    );
    assert!(
        line(&run, "state directory").starts_with('✔'),
        "{}",
        run.stdout
    );
    assert!(
        line(&run, "PDFium").starts_with('✔') && line(&run, "PDFium").contains("PDFium 1"),
        "{}",
        run.stdout
    );
    assert!(
        line(&run, "Chroma").starts_with('✔') && line(&run, "Chroma").contains(&chroma.url()),
        "{}",
        run.stdout
    );
    assert!(line(&run, "device").starts_with('✔'), "{}", run.stdout);
    assert!(
        line(&run, "model").starts_with('✔') && line(&run, "model").contains("tiny-colpali"),
        "{}",
        run.stdout
    );
    assert_eq!(
        run.code, 0,
        "every check passed, so the exit status is 0:\n{}",
        run.stdout
    );
}

#[test]
fn doctor_names_a_stopped_chroma() {
    // A port nothing listens on.
    let port = common::free_port();
    let run = doctor(
        "",
        &[
            ("CHROMA_HOST", "127.0.0.1"),
            ("CHROMA_PORT", &port.to_string()),
        ],
    );
    let l = line(&run, "Chroma");
    assert!(
        l.starts_with('✘') && l.contains(&port.to_string()),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("fix: start the server"),
        "{}",
        run.stdout
    );
    assert_eq!(run.code, 1);
}

#[test]
fn doctor_names_missing_pdfium() {
    let run = doctor("[extract]\npdfium_path = \"/nowhere/libpdfium.so\"\n", &[]);
    let l = line(&run, "PDFium");
    assert!(
        l.starts_with('✘') && run.stdout.contains("/nowhere/libpdfium.so"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("scripts/setup"), "{}", run.stdout);
    assert_eq!(run.code, 1);
}

#[test]
fn doctor_names_a_bad_config_key_and_still_checks_the_rest() {
    let run = doctor("[model]\nbatch_size_visuals = 3\n", &[]);
    let l = line(&run, "configuration");
    assert!(l.starts_with('✘'), "{}", run.stdout);
    assert!(run.stdout.contains("batch_size_visuals"), "{}", run.stdout);
    assert!(
        line(&run, "PDFium").starts_with('✔'),
        "other checks still run:\n{}",
        run.stdout
    );
    assert_eq!(run.code, 1);
}

/// An unmounted disk is a ✘ with the fix, and the rest is checked with the user's settings (the
/// configuration is not refused, so doctor does not fall back to the defaults).
#[test]
fn doctor_names_a_missing_watched_folder_and_checks_the_real_settings() {
    let watched = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny-colpali");
    let cfg = format!(
        "[watch]\nfolders = [{:?}, \"/mnt/unplugged/docs\"]\n[model]\nname = {:?}\ndevice = \"cpu\"\n",
        watched.path(),
        model
    );
    let run = doctor(&cfg, &[]);
    assert!(
        line(&run, "configuration").starts_with('✔'),
        "{}",
        run.stdout
    );
    let l = line(&run, "watched folders");
    assert!(
        l.starts_with('✘')
            && l.contains("1 of 2 missing")
            && l.contains("/mnt/unplugged/docs")
            && !l.contains(&watched.path().display().to_string()),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("fix: mount the disk or create the folder"),
        "{}",
        run.stdout
    );
    assert!(
        line(&run, "model").starts_with('✔') && line(&run, "model").contains("tiny-colpali"),
        "the configured model, not the default one:\n{}",
        run.stdout
    );
    assert!(
        line(&run, "device").contains("forced by configuration"),
        "{}",
        run.stdout
    );
    assert_eq!(run.code, 1);
}

#[test]
fn doctor_refuses_a_gpu_this_build_lacks() {
    let run = doctor("", &[("DEVICE", "cuda")]);
    let l = line(&run, "device");
    // The CPU build (what CI runs) has no CUDA: ✘ with the fix. A CUDA build opens the device:
    // ✔ on a GPU, ✘ naming the CUDA error without one.
    if candle_core::utils::cuda_is_available() {
        assert!(
            l.starts_with('✔') && l.contains("cuda:0")
                || l.starts_with('✘') && l.contains("no usable CUDA device"),
            "{}",
            run.stdout
        );
    } else {
        assert!(
            l.starts_with('✘') && run.stdout.contains("--features cuda"),
            "{}",
            run.stdout
        );
        assert_eq!(run.code, 1);
    }
}

#[test]
fn doctor_runs_the_recall_check_on_the_indexed_records() {
    use docusearch_agent::config::Config;
    use docusearch_agent::sync::{DocumentMeta, PageRecord, Syncer};
    use docusearch_agent::types::{ContentHash, DocFormat, DocId, MultiVector};
    use rand::{Rng, SeedableRng};

    let chroma = common::start_chroma();
    let mut cfg = Config::default();
    cfg.chroma.url = Some(chroma.url());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let syncer = Syncer::connect(&chroma.url(), &cfg).await.expect("connect");
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for d in 0..3u32 {
            let path = std::path::PathBuf::from(format!("/docs/report-{d}.pdf"));
            let meta = DocumentMeta {
                doc_id: DocId::new(&cfg.agent_id, &path),
                agent_id: cfg.agent_id.clone(),
                filename: format!("report-{d}.pdf"),
                format: DocFormat::Pdf,
                num_pages: 4,
                content_hash: ContentHash::of_bytes(&d.to_le_bytes()),
                model: "test".into(),
                timestamp: "2026-11-27T18:00:00Z".into(),
                source_path: path,
            };
            let pages: Vec<PageRecord> = (1..=4)
                .map(|p| PageRecord {
                    page: p,
                    text: format!("page {p}"),
                    embedding: MultiVector::new(
                        6,
                        128,
                        (0..6 * 128).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
                    ),
                })
                .collect();
            syncer
                .upsert_pages(&meta, &pages)
                .await
                .expect("write pages");
        }
    });
    let model = common::fixture("tiny-colpali");
    let config = format!(
        "[chroma]\nurl = {:?}\n[model]\nname = {:?}\ndevice = \"cpu\"\n",
        chroma.url(),
        model
    );
    let run = doctor(&config, &[]);
    let l = line(&run, "recall");
    assert!(l.starts_with('✔'), "{}", run.stdout);
    assert!(
        l.contains(&format!(
            "{}: 12 of 12 sampled records returned",
            cfg.chroma.visual_collection
        )),
        "{}",
        run.stdout
    );
    assert!(
        l.contains(&format!("{}: empty", cfg.chroma.text_collection)),
        "{}",
        run.stdout
    );
}
