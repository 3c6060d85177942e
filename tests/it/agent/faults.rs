//! The fault-injection suite: the real `run` binary, with the tiny checkpoint, a real Chroma and
//! real files, driven through what machines do to a background agent. After each scenario the
//! [`oracle`] compares Chroma with the folder: every file is indexed with exactly the pages and
//! chunks it has now, or listed as failed with a reason in `status`; nothing else is in Chroma;
//! the agent is still running. `scripts/soak` runs the same scenarios longer
//! (`DOCUSEARCH_SOAK=1`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use docusearch_agent::agent::real::RealExtract;
use docusearch_agent::agent::stages::Extract;
use docusearch_agent::api::DocState;
use docusearch_agent::chroma::client::Include;
use docusearch_agent::config::Config;
use docusearch_agent::extract::ExtractEvent;
use docusearch_agent::records::{keys, where_agent};
use docusearch_agent::types::{ContentHash, DocId};

use crate::common::{
    agent_exe, make_pdf, pdf_pages, poll, rig, signal, status_json, write_file, Launch, Rig,
    ServedAgent,
};

/// Longer runs for `scripts/soak`; the suite's own sizes otherwise.
fn soak() -> bool {
    std::env::var_os("DOCUSEARCH_SOAK").is_some()
}

/// What a file must have in Chroma now, as the agent's own extractor reads it.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    pages: usize,
    chunks: usize,
    hash: String,
}

/// Each file's expectation: indexed as [`Expected`], or failed (with the extractor's reason).
fn expectations(cfg: &Config, files: &[PathBuf]) -> BTreeMap<PathBuf, Result<Expected, String>> {
    let extract = RealExtract::new(cfg, agent_exe()).expect("extractor");
    files
        .iter()
        .map(|f| {
            let (mut pages, mut chunks) = (0, 0);
            let got = extract.extract(f, &mut |e| {
                if let ExtractEvent::Page(p) = e {
                    pages += usize::from(p.image.is_some());
                    chunks += p.chunks.len();
                }
                ControlFlow::Continue(())
            });
            let e = got.map_err(|e| e.to_string()).map(|_| Expected {
                pages,
                chunks,
                hash: ContentHash::of_file(f).expect("hash").to_string(),
            });
            (f.clone(), e)
        })
        .collect()
}

/// What one document has in Chroma.
#[derive(Debug, Default)]
struct Held {
    source: String,
    pages: BTreeSet<i64>,
    page_records: usize,
    chunk_records: usize,
    hashes: BTreeSet<String>,
}

/// Everything the agent has in Chroma, by document.
async fn held(rig: &Rig) -> BTreeMap<String, Held> {
    let url = rig.cfg.chroma.url.clone().expect("the rig's Chroma");
    let syncer = docusearch_agent::sync::Syncer::connect(&url, &rig.cfg)
        .await
        .expect("connect to Chroma");
    let mut out: BTreeMap<String, Held> = BTreeMap::new();
    for (collection, visual) in [
        (syncer.visual_collection(), true),
        (syncer.text_collection(), false),
    ] {
        let got = collection
            .get_where(where_agent(&rig.cfg.agent_id), &[Include::Metadatas])
            .await
            .expect("read the agent's records");
        for m in got.metadatas.unwrap_or_default().into_iter().flatten() {
            let s = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let h = out.entry(s(keys::DOC_ID)).or_default();
            h.source = s(keys::SOURCE_PATH);
            h.hashes.insert(s(keys::CONTENT_HASH));
            if visual {
                h.page_records += 1;
                h.pages
                    .insert(m.get(keys::PAGE).and_then(|v| v.as_i64()).unwrap_or(-1));
            } else {
                h.chunk_records += 1;
            }
        }
    }
    out
}

/// What the oracle counted.
#[derive(Debug, Default)]
struct Tally {
    indexed: usize,
    pages: usize,
    chunks: usize,
    failed: usize,
}

/// Compares Chroma and `status --json` with `files` as they are now; panics with every
/// difference. `files` is every document in the folder; what the agent cannot index must be
/// among `status`'s failures with a reason, and have nothing in Chroma.
async fn oracle(rig: &Rig, agent: &ServedAgent, files: &[PathBuf]) -> Tally {
    oracle_of(rig, agent, expectations(&rig.cfg, files)).await
}

/// [`oracle`] with the expectations given (many files whose content the test wrote).
async fn oracle_of(
    rig: &Rig,
    agent: &ServedAgent,
    want: BTreeMap<PathBuf, Result<Expected, String>>,
) -> Tally {
    let mut held = held(rig).await;
    let status = status_json(&agent.config);
    let failures: BTreeMap<String, String> = status["failures"]
        .as_array()
        .expect("status lists failures")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap_or("").to_string(),
                f["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut wrong = Vec::new();
    let mut tally = Tally::default();
    for (path, want) in &want {
        let id = DocId::new(&rig.cfg.agent_id, path);
        let got = held.remove(id.as_str());
        match (want, got) {
            (Ok(w), Some(g)) => {
                let pages: BTreeSet<i64> = (1..=w.pages as i64).collect();
                if g.page_records != w.pages || g.pages != pages || g.chunk_records != w.chunks {
                    wrong.push(format!(
                        "{}: {} page records (pages {:?}) and {} chunks in Chroma, the file has {} pages and {} chunks",
                        path.display(), g.page_records, g.pages, g.chunk_records, w.pages, w.chunks
                    ));
                }
                if g.hashes != BTreeSet::from([w.hash.clone()]) {
                    wrong.push(format!(
                        "{}: Chroma holds content {:?}, the file is {}",
                        path.display(),
                        g.hashes,
                        w.hash
                    ));
                }
                tally.indexed += 1;
                tally.pages += w.pages;
                tally.chunks += w.chunks;
            }
            (Ok(w), None) if w.pages + w.chunks == 0 => tally.indexed += 1,
            (Ok(_), None) => wrong.push(format!("{}: not in Chroma", path.display())),
            (Err(why), got) => {
                if let Some(g) = got {
                    wrong.push(format!(
                        "{}: fails to extract ({why}) yet has {} records in Chroma",
                        path.display(),
                        g.page_records + g.chunk_records
                    ));
                }
                match failures.get(&path.display().to_string()) {
                    Some(reason) if !reason.is_empty() => tally.failed += 1,
                    _ => wrong.push(format!(
                        "{}: fails ({why}) but status does not list it with a reason",
                        path.display()
                    )),
                }
            }
        }
    }
    for (id, g) in held {
        wrong.push(format!(
            "{id} ({}): {} records in Chroma for no file in the folder",
            g.source,
            g.page_records + g.chunk_records
        ));
    }
    if !wrong.is_empty() {
        let log = agent.log_text();
        let keep = std::env::var_os("DOCUSEARCH_FAULT_LOG").map(PathBuf::from);
        if let Some(to) = keep {
            std::fs::write(to, &log).expect("keep the log");
        }
        panic!(
            "the index does not match the folder:\n  {}\nlog:\n{}",
            wrong.join("\n  "),
            tail(&log)
        );
    }
    tally
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The documents in `dir` (regular files with a name the agent reads), sorted.
fn documents(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = walk(dir)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.')
        })
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read folder").flatten() {
        let md = std::fs::symlink_metadata(e.path()).expect("metadata");
        if md.is_dir() {
            out.extend(walk(&e.path()));
        } else if md.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// Waits until the agent has nothing queued or in progress (twice in a row, a second apart, so
/// that a change being settled is not missed).
fn quiet(agent: &ServedAgent, limit: Duration) {
    let mut calm = 0;
    poll("the agent to finish its queue", limit, agent, || {
        let s = agent.status();
        let idle = s.queue.queued == 0 && s.queue.in_progress == 0 && s.in_progress.is_empty();
        calm = if idle { calm + 1 } else { 0 };
        (calm >= 5).then_some(())
    });
}

fn running(agent: &mut ServedAgent) {
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "the agent exited; log:\n{}",
        tail(&agent.log_text())
    );
}

// ---- the store's disk full, then read-only ----

/// A tmpfs of `mb` MB mounted at a fresh folder, unmounted on drop. Needs root (CI runs as
/// root), as a full or read-only disk cannot be made otherwise.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(mb: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test mounts a small tmpfs for a full disk and needs root (CAP_SYS_ADMIN)"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk: writes until the kernel says it is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).expect("filler");
        let block = vec![0u8; 1 << 16];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).expect("remove filler");
    }

    fn remount(&self, opt: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "remount {opt}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Waits for the agent to exit on its own; its exit status and what its log says.
fn exits(agent: &mut ServedAgent, limit: Duration) -> std::process::ExitStatus {
    agent.wait_exit(limit).unwrap_or_else(|| {
        panic!(
            "the agent kept running on a store it cannot write; log:\n{}",
            tail(&agent.log_text())
        )
    })
}

#[test]
fn a_store_on_a_full_then_read_only_disk_stops_the_agent_and_nothing_is_lost() {
    // Full: the running agent stops at the first change it cannot record, is refused while
    // the disk is full, and catches up once there is space. Read-only: refused at start.
    let rig = rig(300);
    let disk = SmallDisk::new(16);
    let mut cfg = rig.cfg.clone();
    cfg.state_dir = disk.path().join("state");
    write_file(&rig.root.join("before.pdf"), &pdf_pages("before", 0, 2));
    let agent = ServedAgent::start(&rig, &cfg, &[]);
    quiet(&agent, Duration::from_secs(120));
    drop(agent);

    for (round, break_disk) in [("full", true), ("read-only", false)] {
        let mut agent = ServedAgent::start(&rig, &cfg, &[]);
        quiet(&agent, Duration::from_secs(120));
        if break_disk {
            disk.fill();
        } else {
            // Linux remounts read-only only with no file open for writing, so the agent is
            // stopped first (a disk the kernel turns read-only under it stops it as a full
            // one does).
            let _ = agent.stop();
            disk.remount("ro");
            agent = ServedAgent::launch(
                &rig,
                &cfg,
                &[],
                Launch {
                    no_wait: true,
                    ..Default::default()
                },
            );
        }
        let name = format!("during-{round}.pdf");
        write_file(&rig.root.join(&name), &pdf_pages(&name, 0, 1));
        // sled rewrites the space its files already have, so a full disk bites once the store
        // must grow: new files keep coming until it must.
        let mut n = 0;
        while break_disk && n < 4000 && agent.child.try_wait().expect("wait").is_none() {
            for _ in 0..25 {
                write_file(
                    &rig.root.join(format!("many/{round}-{n}.txt")),
                    format!("note {n} about rivers").as_bytes(),
                );
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // A change cannot be recorded: the agent says why, then stops for its service
        // manager to start it again.
        let status = exits(&mut agent, Duration::from_secs(120));
        assert!(!status.success(), "{round}: exit status {status}");
        let log = agent.log_text();
        let advice = if break_disk {
            "the disk holding state_dir is full: free space on it"
        } else {
            "read-only: make it writable"
        };
        assert!(
            log.contains(advice),
            "{round}: the log does not say `{advice}`:\n{}",
            tail(&log)
        );

        // Started again while the disk is still broken: refused at once, with the same advice.
        let mut again = ServedAgent::launch(
            &rig,
            &cfg,
            &[],
            Launch {
                no_wait: true,
                ..Default::default()
            },
        );
        let status = exits(&mut again, Duration::from_secs(60));
        assert!(!status.success());
        assert!(
            again.log_text().contains(advice),
            "{}",
            tail(&again.log_text())
        );

        if break_disk {
            disk.free();
        } else {
            disk.remount("rw");
        }
        // Started by its service manager once the disk is fixed: it catches up by itself.
        let mut fixed = ServedAgent::start(&rig, &cfg, &[]);
        quiet(&fixed, Duration::from_secs(300));
        running(&mut fixed);
        let files = documents(&rig.root);
        let tally = crate::common::rt().block_on(oracle(&rig, &fixed, &files));
        assert_eq!(tally.indexed, files.len(), "{round}: {tally:?}");
        eprintln!("store disk {round}: {tally:?}");
    }
}

// ---- killed at random points, with edits between ----

#[test]
fn killed_at_random_points_twenty_times_with_edits_between_converges() {
    use rand::{Rng, SeedableRng};
    let rig = rig(200);
    let seed: u64 = std::env::var("DOCUSEARCH_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rounds = if soak() { 100 } else { 20 };
    let mut live: Vec<PathBuf> = Vec::new();
    for round in 0..rounds {
        // An edit: a new document, a changed one, a rename, a deletion.
        let pick =
            |rng: &mut rand::rngs::StdRng, v: &Vec<PathBuf>| v[rng.gen_range(0..v.len())].clone();
        // Deletions leave at least two documents, so the oracle always has files to check.
        let op = match rng.gen_range(0..4) {
            3 if live.len() < 3 => 0,
            op => op,
        };
        match (op, live.is_empty()) {
            (0, _) | (_, true) => {
                let p = rig.root.join(format!("doc-{round}.pdf"));
                write_file(&p, &pdf_pages(&format!("r{round}"), 0, rng.gen_range(1..6)));
                live.push(p);
            }
            (1, false) => {
                let p = pick(&mut rng, &live);
                write_file(
                    &p,
                    &pdf_pages(&format!("edit{round}"), 0, rng.gen_range(1..6)),
                );
            }
            (2, false) => {
                let p = pick(&mut rng, &live);
                let to = rig.root.join(format!("renamed-{round}.pdf"));
                std::fs::rename(&p, &to).expect("rename");
                eprintln!("round {round}: {} -> {}", p.display(), to.display());
                live.retain(|x| *x != p);
                live.push(to);
            }
            _ => {
                let p = pick(&mut rng, &live);
                std::fs::remove_file(&p).expect("delete");
                eprintln!("round {round}: rm {}", p.display());
                live.retain(|x| *x != p);
            }
        }
        let agent = ServedAgent::start(&rig, &rig.cfg, &[]);
        let ms = rng.gen_range(0..1500);
        eprintln!("round {round}: kill after {ms} ms");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&agent.log)
            .and_then(|mut f| {
                std::io::Write::write_all(
                    &mut f,
                    format!("---- round {round}: kill after {ms} ms\n").as_bytes(),
                )
            })
            .ok();
        std::thread::sleep(Duration::from_millis(ms));
        signal(agent.child.id(), libc::SIGKILL);
        drop(agent);
    }
    let mut agent = ServedAgent::start(&rig, &rig.cfg, &[]);
    quiet(&agent, Duration::from_secs(180));
    running(&mut agent);
    let files = documents(&rig.root);
    assert!(files.len() >= 2, "seed {seed}: the rounds left {files:?}");
    let tally = crate::common::rt().block_on(oracle(&rig, &agent, &files));
    assert_eq!(tally.indexed, files.len(), "seed {seed}: {tally:?}");
    eprintln!("{rounds} SIGKILL rounds (seed {seed}): {tally:?}");
}

// ---- hostile files and names ----

/// A PDF whose one content stream inflates to `mb` MB of spaces: a decompression bomb.
fn zip_bomb_pdf(mb: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![b' '; 1 << 20];
    for _ in 0..mb {
        z.write_all(&block).expect("deflate");
    }
    let stream = z.finish().expect("deflate");
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    let objs: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>".to_vec(),
        [
            format!(
                "<< /Length {} /Filter /FlateDecode >>\nstream\n",
                stream.len()
            )
            .into_bytes(),
            stream,
            b"\nendstream".to_vec(),
        ]
        .concat(),
    ];
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(o);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objs.len() + 1).as_bytes());
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objs.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A grey PNG of `side`² pixels, written row by row (it inflates to `side`² bytes).
fn huge_png(path: &Path, side: u32) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).expect("png"));
    let mut enc = png::Encoder::new(f, side, side);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().expect("png header");
    let mut s = w.stream_writer().expect("png stream");
    let row = vec![200u8; side as usize];
    for _ in 0..side {
        std::io::Write::write_all(&mut s, &row).expect("png row");
    }
    s.finish().expect("png end");
}

/// A user that is not root, for files only root could read otherwise.
const NOBODY: u32 = 65534;

fn chown_tree(path: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success());
}

/// A non-UTF-8 name (Latin-1 "café.pdf").
fn latin1_name(dir: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9.pdf"))
}

#[test]
fn hostile_files_and_names_each_get_a_reason_and_the_rest_is_indexed() {
    let mut rig = rig(300);
    rig.cfg.extract.worker_memory_mb = 1024;
    rig.cfg.extract.render_timeout_s = 60;
    let root = rig.root.clone();
    // Good documents among the bad, so that the bad are seen not to block them.
    std::fs::copy(
        crate::common::corpus().join("asyRefCard.pdf"),
        root.join("good.pdf"),
    )
    .unwrap();
    write_file(
        &root.join("notes.txt"),
        b"plain words about rivers and mountains\n",
    );
    write_file(
        &root.join("deep/a/b/c/d/e/f/g/nested.pdf"),
        &pdf_pages("nested", 0, 1),
    );
    let long = format!("{}.pdf", "l".repeat(250));
    write_file(&root.join(&long), &pdf_pages("long", 0, 0));
    write_file(
        &root.join("spaces and ünïcödé (1).pdf"),
        &pdf_pages("odd", 0, 0),
    );

    // The bad.
    write_file(&root.join("empty.pdf"), b"");
    let real = std::fs::read(crate::common::corpus().join("xfig-howto.pdf")).unwrap();
    write_file(&root.join("truncated.pdf"), &real[..real.len() / 3]);
    write_file(
        &root.join("lying.pdf"),
        b"this is not a PDF at all, only text\n",
    );
    write_file(
        &root.join("encrypted.pdf"),
        &crate::extract::encrypted_pdf(b"sesame", "secret"),
    );
    write_file(
        &root.join("bomb.pdf"),
        &zip_bomb_pdf(if soak() { 4096 } else { 1536 }),
    );
    let many: Vec<String> = (0..10_000).map(|i| format!("page {i}")).collect();
    write_file(&root.join("ten-thousand-pages.pdf"), &make_pdf(&many));
    huge_png(&root.join("huge.png"), 30_000);
    write_file(&latin1_name(&root), &pdf_pages("latin1", 0, 0));
    write_file(&root.join("locked/inside.pdf"), &pdf_pages("locked", 0, 0));
    write_file(&root.join("unreadable.pdf"), &pdf_pages("unreadable", 0, 0));
    std::os::unix::fs::symlink(root.join("loop-b"), root.join("loop-a.pdf")).unwrap();
    std::os::unix::fs::symlink(root.join("loop-a.pdf"), root.join("loop-b")).unwrap();
    let fifo =
        std::ffi::CString::new(root.join("fifo.pdf").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    // As a user other than root, so that permissions mean something.
    chown_tree(&root, NOBODY);
    chown_tree(&rig.cfg.state_dir, NOBODY);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(
        root.join("unreadable.pdf"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let home = rig.cfg.state_dir.join("home");
    std::fs::create_dir_all(home.join(".local/share/docusearch-agent")).unwrap();
    std::fs::copy(
        runtime_toml(),
        home.join(".local/share/docusearch-agent/runtime.toml"),
    )
    .unwrap();
    chown_tree(&home, NOBODY);
    let env = [("HOME", home.to_str().unwrap()), ("XDG_DATA_HOME", "")];
    let mut agent = ServedAgent::launch(
        &rig,
        &rig.cfg,
        &env,
        Launch {
            uid: Some(NOBODY),
            no_wait: false,
        },
    );
    quiet(&agent, Duration::from_secs(300));
    running(&mut agent);

    // The FIFO and the link loop are not documents: ignored, and they block nothing.
    let mut files = documents(&root);
    files.retain(|p| !p.starts_with(root.join("locked")));
    let status = status_json(&agent.config);
    let listed = |p: &Path| {
        status["failures"].as_array().unwrap().iter().any(|f| {
            f["path"].as_str() == Some(&p.to_string_lossy())
                && !f["reason"].as_str().unwrap_or("").is_empty()
        })
    };
    for p in [
        root.join("locked"),
        latin1_name(&root),
        root.join("unreadable.pdf"),
    ] {
        assert!(
            listed(&p),
            "{} is not listed as failed in status: {status:#}",
            p.display()
        );
    }
    // The oracle reads as root, so it would read what the agent may not: those two are
    // judged above, the rest below.
    files.retain(|p| *p != root.join("unreadable.pdf") && *p != latin1_name(&root));
    let tally = crate::common::rt().block_on(oracle(&rig, &agent, &files));
    for f in status["failures"].as_array().unwrap() {
        eprintln!("failed: {} — {}", f["path"], f["reason"]);
    }
    // A renderer stopped by its memory bound says so.
    for bomb in ["huge.png", "bomb.pdf"] {
        let reason = status["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str() == Some(&root.join(bomb).to_string_lossy()))
            .map(|f| f["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default();
        assert!(reason.contains("memory bound"), "{bomb}: {reason}");
    }
    assert_eq!(tally.indexed, 5, "{tally:?}");
    assert_eq!(tally.failed, files.len() - 5, "{tally:?}");
    eprintln!("hostile inputs: {tally:?}, plus a locked folder, an unreadable file, a non-UTF-8 name, a FIFO and a symlink loop");
}

/// The runtime file `scripts/setup` wrote for this user.
fn runtime_toml() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".local/share")
        });
    let p = data.join("docusearch-agent/runtime.toml");
    assert!(p.is_file(), "{} is missing: run scripts/setup", p.display());
    p
}

// ---- the inotify limits used up ----

/// Holds every inotify instance a user may have, as another program of theirs could.
struct InotifyHog {
    child: Child,
}

impl InotifyHog {
    fn new(uid: u32) -> InotifyHog {
        use std::io::{BufRead, BufReader};
        use std::os::unix::process::CommandExt;
        // The system's (scripts/setup needs one): what PATH finds may lie under root's
        // folders (pyenv), out of this user's reach.
        let python3 = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("python3");
        let mut child = Command::new(python3)
            .args([
                "-c",
                "import ctypes,sys\nlibc=ctypes.CDLL(None,use_errno=True)\nfds=[]\nwhile libc.inotify_init()>=0: fds.append(1)\nprint(len(fds),flush=True)\nsys.stdin.read()",
            ])
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the hog");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("hog says how many");
        assert!(line.trim().parse::<u32>().is_ok(), "hog: {line}");
        InotifyHog { child }
    }
}

impl Drop for InotifyHog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn with_the_inotify_limits_used_up_the_agent_polls_and_says_so() {
    let rig = rig(300);
    write_file(&rig.root.join("first.pdf"), &pdf_pages("first", 0, 1));
    chown_tree(&rig.root, NOBODY);
    chown_tree(&rig.cfg.state_dir, NOBODY);
    let home = rig.cfg.state_dir.join("home");
    std::fs::create_dir_all(home.join(".local/share/docusearch-agent")).unwrap();
    std::fs::copy(
        runtime_toml(),
        home.join(".local/share/docusearch-agent/runtime.toml"),
    )
    .unwrap();
    chown_tree(&home, NOBODY);
    let _hog = InotifyHog::new(NOBODY);
    let env = [("HOME", home.to_str().unwrap()), ("XDG_DATA_HOME", "")];
    let mut agent = ServedAgent::launch(
        &rig,
        &rig.cfg,
        &env,
        Launch {
            uid: Some(NOBODY),
            no_wait: false,
        },
    );
    let s = agent.status();
    let why = s.watch_polling.clone().unwrap_or_default();
    assert!(
        why.contains("inotify"),
        "status does not say the watcher polls: {s:?}"
    );
    let text = Command::new(agent_exe())
        .arg("--config")
        .arg(&agent.config)
        .arg("status")
        .output()
        .expect("status");
    assert!(String::from_utf8_lossy(&text.stdout).contains("polls the folders"));
    quiet(&agent, Duration::from_secs(120));

    // Changes are still seen, without an OS event.
    // A poll may see a file being written twice: the second look finds it unchanged.
    let seen = |name: &str, states: &[DocState]| {
        let s = agent.status();
        s.recent
            .iter()
            .any(|d| d.path == rig.root.join(name) && states.contains(&d.state))
            .then_some(())
    };
    write_file(&rig.root.join("later.pdf"), &pdf_pages("later", 0, 2));
    poll(
        "the poller to see a new file",
        Duration::from_secs(60),
        &agent,
        || seen("later.pdf", &[DocState::Indexed, DocState::Unchanged]),
    );
    std::fs::remove_file(rig.root.join("first.pdf")).unwrap();
    poll(
        "the poller to see a deletion",
        Duration::from_secs(60),
        &agent,
        || seen("first.pdf", &[DocState::Removed]),
    );
    quiet(&agent, Duration::from_secs(60));
    running(&mut agent);
    let files = documents(&rig.root);
    crate::common::rt().block_on(oracle(&rig, &agent, &files));
}

// ---- Chroma killed, away for a while, back on the same port and data ----

/// `chroma run` on `port` with its data in `dir`, as a user runs it (not restarted by anyone).
fn chroma_process(dir: &Path, port: u16) -> Child {
    let child = Command::new(crate::common::chroma_bin())
        .args([
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--path",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chroma");
    let url = format!("http://127.0.0.1:{port}");
    let rt = crate::common::rt();
    let up = crate::common::wait_until(Duration::from_secs(60), || {
        rt.block_on(docusearch_agent::chroma::client::probe(
            &url,
            None,
            Duration::from_secs(2),
        ))
        .is_ok()
    });
    assert!(up, "chroma did not start on port {port}");
    child
}

#[test]
fn chroma_killed_for_a_while_costs_no_document_and_no_second_embedding() {
    let mut rig = rig(300);
    let data = tempfile::tempdir().expect("chroma data");
    let port = crate::common::free_port();
    rig.cfg.chroma.url = Some(format!("http://127.0.0.1:{port}"));
    rig.cfg.pipeline.max_attempts = 2;
    let mut chroma = chroma_process(data.path(), port);
    let root = rig.root.clone();
    write_file(&root.join("a.pdf"), &pdf_pages("a", 0, 3));
    write_file(&root.join("b.pdf"), &pdf_pages("b", 0, 1));
    let mut agent = ServedAgent::start(&rig, &rig.cfg, &[]);
    quiet(&agent, Duration::from_secs(120));

    let _ = chroma.kill();
    let _ = chroma.wait();
    // While it is away: new documents, an edit, a deletion.
    write_file(&root.join("c.pdf"), &pdf_pages("c", 0, 4));
    write_file(&root.join("d.pdf"), &pdf_pages("d", 0, 2));
    write_file(&root.join("a.pdf"), &pdf_pages("a2", 0, 5));
    std::fs::remove_file(root.join("b.pdf")).unwrap();
    let away = if soak() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(45)
    };
    let until = std::time::Instant::now() + away;
    let mut said = false;
    while std::time::Instant::now() < until {
        let s = agent.status();
        said |= s.sync_waiting.is_some() && agent.health().is_some_and(|h| !h.is_healthy());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(said, "neither /status nor /health said Chroma was away");
    running(&mut agent);

    chroma = chroma_process(data.path(), port);
    quiet(&agent, Duration::from_secs(180));
    let s = agent.status();
    assert!(s.sync_waiting.is_none(), "{s:?}");
    assert!(
        s.failures.is_empty(),
        "an outage is not a document failure: {:?}",
        s.failures
    );
    // Embedded once each: a (4 pages), b (2), then c (5), d (3) and a's new version (6).
    assert_eq!(
        s.counters.pages_embedded,
        4 + 2 + 5 + 3 + 6,
        "{:?}",
        s.counters
    );
    let files = documents(&root);
    let tally = crate::common::rt().block_on(oracle(&rig, &agent, &files));
    assert_eq!(tally.indexed, 3, "{tally:?}");
    drop(agent);
    let _ = chroma.kill();
    let _ = chroma.wait();
}

// ---- 10,000 small files in one burst ----

#[test]
fn ten_thousand_small_files_in_one_burst_are_all_indexed_once() {
    let rig = rig(300);
    let agent = ServedAgent::start(&rig, &rig.cfg, &[]);
    let n = if soak() { 50_000 } else { 10_000 };
    let mut want = BTreeMap::new();
    for i in 0..n {
        let p = rig.root.join(format!("burst/{:02}/note-{i}.txt", i / 1000));
        let text = format!("note {i} about rivers, mountains and printing\n");
        write_file(&p, text.as_bytes());
        let hash = ContentHash::of_bytes(text.as_bytes()).to_string();
        want.insert(
            p,
            Ok(Expected {
                pages: 0,
                chunks: 1,
                hash,
            }),
        );
    }
    let mut agent = agent;
    // A limit, not a speed goal (about 6 files/s were seen with the machine loaded 3-fold).
    quiet(&agent, Duration::from_secs(3000));
    running(&mut agent);
    let s = agent.status();
    assert_eq!(s.indexed.files, n as u64, "{:?}", s.indexed);
    assert_eq!(
        s.counters.chunks_embedded, n as u64,
        "each embedded once: {:?}",
        s.counters
    );
    let tally = crate::common::rt().block_on(oracle_of(&rig, &agent, want));
    assert_eq!(tally.indexed, n);
    eprintln!("burst of {n} files: {tally:?}, {:?}", s.counters);
}

// ---- a file rewritten every 100 ms ----

#[test]
fn a_file_rewritten_every_100_ms_for_a_minute_is_indexed_once_when_it_stops() {
    let mut rig = rig(0);
    // The default: what a user has.
    rig.cfg.watch.settle_ms = docusearch_agent::config::Config::default().watch.settle_ms;
    let agent = ServedAgent::start(&rig, &rig.cfg, &[]);
    let path = rig.root.join("busy.pdf");
    let span = if soak() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(60)
    };
    let started = std::time::Instant::now();
    let mut i = 0u32;
    while started.elapsed() < span {
        // Each write a different length, as a program saving as it goes would.
        write_file(&path, &pdf_pages(&format!("v{i}"), 0, (i % 3) as u16));
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut agent = agent;
    quiet(&agent, Duration::from_secs(120));
    running(&mut agent);
    let s = agent.status();
    let last_pages = u64::from((i - 1) % 3) + 1;
    assert_eq!(
        s.counters.pages_embedded, last_pages,
        "only the last version is embedded, once ({i} writes): {:?}",
        s.counters
    );
    let tally = crate::common::rt().block_on(oracle(&rig, &agent, &[path]));
    assert_eq!(tally.indexed, 1);
}

// ---- `index` of what is not a document ----

#[test]
fn index_says_what_a_fifo_a_link_loop_and_a_non_utf8_name_are() {
    let rig = rig(0);
    let root = rig.root.clone();
    write_file(&root.join("good.pdf"), &pdf_pages("good", 0, 0));
    std::os::unix::fs::symlink(root.join("loop-b.pdf"), root.join("loop-a.pdf")).unwrap();
    std::os::unix::fs::symlink(root.join("loop-a.pdf"), root.join("loop-b.pdf")).unwrap();
    let fifo =
        std::ffi::CString::new(root.join("fifo.pdf").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    write_file(&latin1_name(&root), &pdf_pages("latin1", 0, 0));
    let config = rig.cfg.state_dir.join("config.toml");
    std::fs::write(&config, toml::to_string(&rig.cfg).unwrap()).unwrap();
    let out = Command::new(agent_exe())
        .arg("--config")
        .arg(&config)
        .arg("index")
        .args([
            root.join("good.pdf"),
            root.join("fifo.pdf"),
            root.join("loop-a.pdf"),
            latin1_name(&root),
        ])
        .output()
        .expect("index runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for said in [
        "is not a regular file (a FIFO",
        "is a loop of symbolic links",
        "its name is not valid UTF-8",
        "indexed 1 files",
        " 0 unchanged",
    ] {
        assert!(
            text.contains(said),
            "`index` does not say `{said}`:\n{text}"
        );
    }
}
