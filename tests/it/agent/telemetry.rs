//! What the running agent says about itself, checked against what it did: the real `run`
//! binary on real documents, read through `/status`, `/metrics`, `/health` and `status --json`.

use std::path::Path;
use std::time::Duration;

use docusearch_agent::api::{DocStage, ModelState};
use docusearch_agent::config::DeviceChoice;

use crate::common::{self, counts, pdf_pages, poll, rig, ServedAgent as Agent};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write file");
}

/// The tiny checkpoint's files, copied to `to` (a model folder a test can break or withhold).
fn copy_tiny_model(to: &Path) {
    std::fs::create_dir_all(to).expect("model dir");
    for f in std::fs::read_dir(common::fixture("tiny-colpali")).expect("fixture") {
        let f = f.expect("entry").path();
        if f.is_file() {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).expect("copy");
        }
    }
}

#[test]
fn status_and_metrics_follow_a_long_document_and_end_equal_to_what_was_indexed() {
    let rig = rig(200);
    let agent = Agent::start(&rig, &rig.cfg, &[]);
    // An idle spell first: the snapshot must wake up by itself when work arrives.
    std::thread::sleep(Duration::from_millis(1500));
    let idle = agent.status();
    assert_eq!(idle.model.state, ModelState::NotLoaded, "{idle:?}");
    assert!(idle.in_progress.is_empty());

    std::fs::copy(
        common::corpus().join("R-intro.pdf"),
        rig.root.join("big.pdf"),
    )
    .expect("copy");
    write(&rig.root.join("small.pdf"), &pdf_pages("telemetry", 0, 2));
    let expected_pages = 113 + 3;

    let mut stages = Vec::new();
    let mut models = Vec::new();
    let mut saw_queue = false;
    let mut saw_pages_move = false;
    let done = poll(
        "both documents indexed",
        Duration::from_secs(240),
        &agent,
        || {
            let s = agent.status();
            models.push(s.model.state);
            saw_queue |= s.queue.queued + s.queue.in_progress > 0;
            for d in &s.in_progress {
                if d.path.ends_with("big.pdf") {
                    stages.push(d.stage);
                    saw_pages_move |= d.num_pages == Some(113) && d.pages_embedded > 0;
                }
            }
            (s.indexed.files == 2
                && s.queue.queued + s.queue.in_progress == 0
                && s.in_progress.is_empty())
            .then_some(s)
        },
    );
    assert!(
        saw_queue,
        "the queue was seen non-empty while the agent worked"
    );
    assert!(
        stages.contains(&DocStage::Embedding),
        "big.pdf was seen with the model: {stages:?}"
    );
    assert!(
        saw_pages_move,
        "big.pdf's progress was seen in pages (113 known, some embedded)"
    );
    assert!(
        models.contains(&ModelState::Loaded),
        "the model was seen loaded while it worked: {models:?}"
    );
    assert_eq!(done.model.state, ModelState::Loaded);
    assert_eq!(done.model.loads, 1);
    assert!(done.model.load_seconds.is_some());
    assert_eq!(done.model.device.as_deref(), Some("cpu"));
    assert_eq!(done.model.dtype.as_deref(), Some("f32"));
    assert!(!done.model.fell_back_to_cpu, "DEVICE=cpu was asked for");
    assert_eq!(
        done.model.placement_reason.as_deref(),
        Some("device = cpu, forced by configuration; dtype = auto: f32 on the CPU")
    );

    // What Chroma holds is what every surface says.
    let rt = Agent::rt();
    let s = rt.block_on(rig.syncer());
    let (big_pages, big_chunks) = rt.block_on(counts(&s, &rig.doc_id("big.pdf")));
    let (small_pages, small_chunks) = rt.block_on(counts(&s, &rig.doc_id("small.pdf")));
    assert_eq!(big_pages + small_pages, expected_pages);
    let chunks = (big_chunks + small_chunks) as u64;
    assert!(chunks > 0);
    assert_eq!(done.indexed.files, 2);
    assert_eq!(done.indexed.pages, expected_pages as u64);
    assert_eq!(done.indexed.chunks, chunks);
    let c = &done.counters;
    assert_eq!(c.files_indexed, 2, "{c:?}");
    assert_eq!(c.pages_indexed, expected_pages as u64, "{c:?}");
    assert_eq!(c.chunks_indexed, chunks, "{c:?}");
    assert_eq!(c.pages_embedded, expected_pages as u64, "{c:?}");
    assert_eq!(c.chunks_embedded, chunks, "{c:?}");
    assert_eq!(c.failures.values().sum::<u64>(), 0, "{c:?}");

    let m = agent.metrics();
    for (series, want) in [
        ("docusearch_files_indexed_total", 2.0),
        ("docusearch_pages_indexed_total", expected_pages as f64),
        ("docusearch_chunks_indexed_total", chunks as f64),
        ("docusearch_pages_embedded_total", expected_pages as f64),
        ("docusearch_chunks_embedded_total", chunks as f64),
        ("docusearch_queue_depth", 0.0),
        ("docusearch_jobs_in_progress", 0.0),
        ("docusearch_model_loaded", 1.0),
        ("docusearch_model_failed", 0.0),
        ("docusearch_failures_total{stage=\"extract\"}", 0.0),
        ("docusearch_task_failures", 0.0),
        ("docusearch_chroma_up", 1.0),
        ("docusearch_extract_seconds_count", 2.0),
        ("docusearch_sync_seconds_count", 2.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series} in /metrics");
    }
    assert!(m["docusearch_embed_batch_seconds_count"] >= 1.0);
    assert!(m["docusearch_model_load_seconds"] > 0.0);

    // `status --json` reads the same snapshot.
    let cli = agent.status_command();
    assert_eq!(cli["agent_running"], true, "{cli}");
    assert_eq!(cli["files"]["indexed"], 2, "{cli}");
    assert_eq!(cli["files"]["pages"], expected_pages, "{cli}");
    assert_eq!(cli["files"]["chunks"], chunks, "{cli}");
    assert_eq!(cli["queue"]["queued"], 0, "{cli}");
    assert_eq!(cli["model"]["state"], "loaded", "{cli}");
    assert_eq!(cli["model"]["device"], "cpu", "{cli}");
    for key in [
        "files_indexed",
        "pages_indexed",
        "chunks_indexed",
        "pages_embedded",
        "chunks_embedded",
    ] {
        assert_eq!(
            cli["counters"][key],
            serde_json::to_value(agent.status().counters).unwrap()[key],
            "{key}: status --json and /status"
        );
    }
    assert_eq!(cli["health"]["status"], "healthy", "{cli}");

    let st = agent.stop();
    assert!(st.success(), "SIGTERM exits 0: {st:?}");
}

#[test]
fn a_model_that_fails_to_load_degrades_health_and_keeps_what_was_indexed() {
    let rig = rig(200);
    // The tiny checkpoint, copied so that it can be broken after a first document is indexed.
    let model = rig.cfg.state_dir.join("model");
    copy_tiny_model(&model);
    let mut cfg = rig.cfg.clone();
    cfg.model.name = model.to_string_lossy().into_owned();
    cfg.pipeline.max_attempts = 2;

    write(&rig.root.join("kept.pdf"), &pdf_pages("kept", 0, 1));
    let agent = Agent::start(&rig, &cfg, &[]);
    poll("kept.pdf indexed", Duration::from_secs(120), &agent, || {
        (agent.status().indexed.files == 1).then_some(())
    });
    assert!(agent.stop().success());
    let rt = Agent::rt();
    let s = rt.block_on(rig.syncer());
    let kept = rig.doc_id("kept.pdf");
    assert_eq!(rt.block_on(counts(&s, &kept)).0, 2);

    // The weights are damaged; a new document arrives.
    write(
        &model.join("model.safetensors"),
        b"not a safetensors file at all",
    );
    let agent = Agent::start(&rig, &cfg, &[]);
    write(&rig.root.join("new.pdf"), &pdf_pages("new", 0, 0));
    let health = poll("/health degraded", Duration::from_secs(120), &agent, || {
        agent.health().filter(|h| !h.is_healthy())
    });
    assert!(
        health
            .reasons
            .iter()
            .any(|r| r.contains("failed to load") && r.contains("model")),
        "{health:?}"
    );
    let status = agent.status();
    assert_eq!(status.model.state, ModelState::Failed, "{:?}", status.model);
    let error = status
        .model
        .error
        .clone()
        .expect("the reason is in /status");
    assert!(error.contains("safetensors"), "{error}");
    let m = agent.metrics();
    assert_eq!(m.get("docusearch_model_failed"), Some(&1.0));
    assert!(m["docusearch_failures_total{stage=\"model\"}"] >= 1.0);

    let cli = agent.status_command();
    assert_eq!(cli["model"]["state"], "failed", "{cli}");
    assert_eq!(cli["model"]["error"], error.as_str(), "{cli}");
    assert_eq!(cli["health"]["status"], "degraded", "{cli}");

    // Nothing indexed is lost, and the new document's job is kept (retried, then failed).
    assert_eq!(rt.block_on(counts(&s, &kept)).0, 2);
    let after = poll(
        "new.pdf marked failed",
        Duration::from_secs(60),
        &agent,
        || {
            let s = agent.status();
            (s.queue.failed == 1).then_some(s)
        },
    );
    assert_eq!(after.indexed.files, 1, "kept.pdf is still indexed");
    assert!(after.failures[0].path.ends_with("new.pdf"), "{after:?}");
    assert!(
        after.failures[0].reason.contains("safetensors"),
        "{after:?}"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_device_this_build_lacks_shows_in_status_as_the_model_failing_with_why() {
    let rig = rig(200);
    let mut cfg = rig.cfg.clone();
    cfg.model.device = DeviceChoice::Auto;
    // `DEVICE` overrides the file, as under launchd.
    let agent = Agent::start(&rig, &cfg, &[("DEVICE", "cuda")]);
    write(&rig.root.join("doc.pdf"), &pdf_pages("device", 0, 0));
    let status = poll(
        "the model's state",
        Duration::from_secs(120),
        &agent,
        || {
            let s = agent.status();
            (s.model.state == ModelState::Failed).then_some(s)
        },
    );
    let error = status.model.error.clone().unwrap_or_default();
    assert!(error.to_lowercase().contains("cuda"), "{error}");
    assert!(
        !status.model.fell_back_to_cpu,
        "a forced device never falls back"
    );
    let health = agent.health().expect("answers");
    assert!(!health.is_healthy(), "{health:?}");
    let cli = agent.status_command();
    assert_eq!(cli["model"]["state"], "failed", "{cli}");
    assert!(
        cli["model"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("cuda"),
        "{cli}"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_stage_that_fails_fatally_degrades_health_then_run_exits_non_zero() {
    for point in ["sync", "extract:panic"] {
        let rig = rig(200);
        let mut agent = Agent::start(&rig, &rig.cfg, &[("DOCUSEARCH_FAILPOINT", point)]);
        write(&rig.root.join("doc.pdf"), &pdf_pages("fatal", 0, 0));
        let health = poll("/health degraded", Duration::from_secs(120), &agent, || {
            agent.health().filter(|h| !h.is_healthy())
        });
        let stage = point.split(':').next().unwrap();
        assert!(
            health
                .reasons
                .iter()
                .any(|r| r.contains(&format!("the {stage} task stopped"))),
            "{point}: {health:?}"
        );
        let st = agent
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{point}: run did not exit; log:\n{}", agent.log_text()));
        assert!(
            !st.success(),
            "{point}: a dead pipeline exits non-zero: {st:?}"
        );
        let log = agent.log_text();
        assert!(
            log.contains("failure point"),
            "{point}: the log says why:\n{log}"
        );
    }
}

#[test]
fn a_model_not_there_at_start_is_waited_for_and_used_once_it_is() {
    let rig = rig(200);
    // A model folder on a disk not mounted yet (or a hub not reachable yet: the same wait).
    let model = rig.cfg.state_dir.join("model");
    let mut cfg = rig.cfg.clone();
    cfg.model.name = model.to_string_lossy().into_owned();
    // One attempt: a wait that used it up would fail the document for good.
    cfg.pipeline.max_attempts = 1;
    let agent = Agent::start(&rig, &cfg, &[]);
    write(&rig.root.join("doc.pdf"), &pdf_pages("later", 0, 1));
    let health = poll("/health degraded", Duration::from_secs(60), &agent, || {
        agent.health().filter(|h| !h.is_healthy())
    });
    assert!(
        health
            .reasons
            .iter()
            .any(|r| r.contains("failed to load") && r.contains("does not exist")),
        "{health:?}"
    );
    // The snapshot's queue counts follow within a second.
    let waiting = poll(
        "doc.pdf back in the queue",
        Duration::from_secs(30),
        &agent,
        || {
            let s = agent.status();
            (s.queue.queued == 1).then_some(s)
        },
    );
    assert_eq!(
        waiting.model.state,
        ModelState::Failed,
        "{:?}",
        waiting.model
    );
    assert_eq!(
        waiting.queue.failed, 0,
        "the document waits, it is not failed"
    );

    // The model arrives.
    copy_tiny_model(&model);
    let done = poll("doc.pdf indexed", Duration::from_secs(120), &agent, || {
        let s = agent.status();
        (s.indexed.files == 1).then_some(s)
    });
    assert_eq!(done.model.state, ModelState::Loaded, "{:?}", done.model);
    assert_eq!(done.model.error, None);
    assert_eq!(done.queue.failed, 0);
    let rt = Agent::rt();
    let s = rt.block_on(rig.syncer());
    assert_eq!(rt.block_on(counts(&s, &rig.doc_id("doc.pdf"))).0, 2);
    assert!(agent.health().expect("answers").is_healthy());
    assert!(agent.stop().success());
}

/// Fields of `/proc/PID[/task/TID]/stat` after the command name (field 3, the state, first).
fn proc_stat(dir: &Path) -> Option<(String, Vec<i64>)> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let fields = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some((name, fields))
}

/// `stat` field 19, the nice value.
const NICE: usize = 19 - 3;
/// `stat` field 4, the parent's pid.
const PPID: usize = 4 - 3;

#[test]
fn rendering_and_the_model_run_below_the_agents_priority_and_the_rest_at_it() {
    use docusearch_agent::priority::BULK_NICE_STEP;
    let rig = rig(200);
    let agent = Agent::start(&rig, &rig.cfg, &[]);
    write(&rig.root.join("one.pdf"), &pdf_pages("priority", 0, 1));
    poll("one.pdf indexed", Duration::from_secs(120), &agent, || {
        (agent.status().indexed.files == 1).then_some(())
    });
    let pid = agent.child.id();
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let (_, main) = proc_stat(&proc_dir).expect("the agent's /proc entry");
    let base = main[NICE];
    let bulk = (base + i64::from(BULK_NICE_STEP)).min(19);
    assert!(
        bulk > base,
        "the test runs at nice {base}: nothing lower to check"
    );

    let mut threads: Vec<(String, i64)> = std::fs::read_dir(proc_dir.join("task"))
        .expect("the agent's threads")
        .filter_map(|t| proc_stat(&t.ok()?.path()))
        .map(|(name, f)| (name, f[NICE]))
        .collect();
    threads.sort();
    let of = |prefix: &str| -> Vec<i64> {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|t| t.1)
            .collect()
    };
    // The model's pool, and candle's element-wise helpers, which the model's first op started.
    for bulk_threads in ["ds-embed-", "candle-bp-"] {
        let nices = of(bulk_threads);
        assert!(!nices.is_empty(), "no {bulk_threads}* thread: {threads:?}");
        assert!(
            nices.iter().all(|&n| n == bulk),
            "{bulk_threads}*: {threads:?}"
        );
    }
    // The sync stage, the watcher and the API run on tokio's threads, at the agent's priority.
    let tokio = of("tokio-");
    assert!(!tokio.is_empty(), "{threads:?}");
    assert!(tokio.iter().all(|&n| n == base), "{threads:?}");

    // The extraction worker that rendered one.pdf is kept for the next document.
    let workers: Vec<i64> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|p| {
            let p = p.ok()?.path();
            let (_, f) = proc_stat(&p)?;
            let cmdline = std::fs::read(p.join("cmdline")).ok()?;
            (f[PPID] == i64::from(pid)
                && cmdline.split(|&b| b == 0).any(|a| a == b"extract-worker"))
            .then_some(f[NICE])
        })
        .collect();
    assert_eq!(
        workers,
        vec![bulk],
        "one extraction worker, below the agent"
    );
}
