//! The whole agent on the real stages: real file-system events, real PDFium (isolated
//! worker), the real model code on the tiny checkpoint, a real Chroma server.

use std::sync::Arc;
use std::time::Duration;

use docusearch_agent::agent::real::{RealExtract, RealModelLoader, RealSink};
use docusearch_agent::agent::runtime::{index_paths, Agent};
use docusearch_agent::state::Store;
use docusearch_agent::telemetry::{ModelState, Telemetry};
use docusearch_agent::types::DocId;

use crate::common::{
    self, agent_exe, canonical_tempdir, counts, pdf_pages, rig, until, write_file, RunningAgent,
};

/// Waits until the agent has nothing queued or running.
async fn quiet(agent: &Agent) {
    until("the queue to drain", || async {
        let c = agent.store().queue_counts().expect("counts");
        c.queued == 0 && c.in_progress == 0 && agent.telemetry.in_flight.get() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_dropped_edited_saved_renamed_and_deleted() {
    let rig = rig(300);
    let s = rig.syncer().await;
    let agent = rig.start().await;

    // Dropped in: searchable.
    write_file(&rig.root.join("a.pdf"), &pdf_pages("asyRefCard.pdf", 0, 1));
    let a = rig.doc_id("a.pdf");
    until("a.pdf indexed", || async { counts(&s, &a).await.0 == 2 }).await;
    quiet(&agent).await;
    assert!(counts(&s, &a).await.1 > 0, "text chunks are indexed too");
    let extracted = agent.telemetry.files_extracted.get();

    // Edited in place: the same doc_id, one page less, nothing stale left.
    write_file(&rig.root.join("a.pdf"), &pdf_pages("asyRefCard.pdf", 2, 2));
    until("a.pdf re-indexed with one page", || async {
        counts(&s, &a).await.0 == 1
    })
    .await;
    quiet(&agent).await;
    assert_eq!(agent.telemetry.files_extracted.get(), extracted + 1);

    // Saved atomically (temp file renamed over it): processed once.
    let tmp = rig.root.join(".a.pdf.tmp");
    write_file(&tmp, &pdf_pages("xfig-howto.pdf", 0, 2));
    std::fs::rename(&tmp, rig.root.join("a.pdf")).expect("rename over");
    until("a.pdf re-indexed with three pages", || async {
        counts(&s, &a).await.0 == 3
    })
    .await;
    quiet(&agent).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    quiet(&agent).await;
    assert_eq!(
        agent.telemetry.files_extracted.get(),
        extracted + 2,
        "an atomic save is one change"
    );

    // Renamed: re-keyed, the model not called.
    let calls = agent.telemetry.embed_calls.get();
    std::fs::rename(rig.root.join("a.pdf"), rig.root.join("b.pdf")).expect("rename");
    let b = rig.doc_id("b.pdf");
    until("b.pdf holds a.pdf's records", || async {
        counts(&s, &b).await.0 == 3
    })
    .await;
    quiet(&agent).await;
    assert_eq!(
        counts(&s, &a).await,
        (0, 0),
        "nothing left under the old name"
    );
    assert_eq!(
        agent.telemetry.embed_calls.get(),
        calls,
        "a rename must not call the model"
    );
    assert_eq!(agent.telemetry.files_moved.get(), 1);

    // Moved out of the watched folder: gone.
    let (_o, outside) = canonical_tempdir();
    std::fs::rename(rig.root.join("b.pdf"), outside.join("b.pdf")).expect("move out");
    until("b.pdf's records deleted", || async {
        counts(&s, &b).await == (0, 0)
    })
    .await;

    // A folder of documents removed with rm -r takes them all.
    write_file(
        &rig.root.join("sub/x.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 0),
    );
    write_file(
        &rig.root.join("sub/deep/y.pdf"),
        &pdf_pages("asyRefCard.pdf", 1, 1),
    );
    let (x, y) = (rig.doc_id("sub/x.pdf"), rig.doc_id("sub/deep/y.pdf"));
    until("the folder indexed", || async {
        counts(&s, &x).await.0 == 1 && counts(&s, &y).await.0 == 1
    })
    .await;
    std::fs::remove_dir_all(rig.root.join("sub")).expect("rm -r");
    until("the folder's records deleted", || async {
        counts(&s, &x).await == (0, 0) && counts(&s, &y).await == (0, 0)
    })
    .await;
    quiet(&agent).await;
    assert_eq!(agent.store().file_counts().expect("counts").indexed, 0);
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_copied_in_slowly_is_indexed_once_after_the_copy_ends() {
    let rig = rig(800);
    let s = rig.syncer().await;
    let agent = rig.start().await;
    let bytes = pdf_pages("xfig-howto.pdf", 0, 3);
    let path = rig.root.join("slow.pdf");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        // Pauses shorter than the settle period, many of them.
        for part in bytes.chunks(bytes.len() / 12 + 1) {
            f.write_all(part).expect("write");
            f.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let id = rig.doc_id("slow.pdf");
    until("slow.pdf indexed", || async {
        counts(&s, &id).await.0 == 4
    })
    .await;
    quiet(&agent).await;
    assert_eq!(
        agent.telemetry.files_extracted.get(),
        1,
        "extracted once, complete"
    );
    assert_eq!(agent.telemetry.files_failed.get(), 0);
    assert!(agent.store().failures().expect("failures").is_empty());
    agent.shutdown().await.expect("shutdown");
}

/// A settle period longer than any wait in these tests: a file indexed under it was read
/// because its writer was seen closing it (or it was renamed in), not because time passed.
const TEN_MINUTES_MS: u64 = 600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_closed_by_their_writer_or_renamed_in_do_not_wait_for_the_settle_period() {
    let rig = rig(TEN_MINUTES_MS);
    let s = rig.syncer().await;
    let agent = rig.start().await;
    // Written in place and closed (a copy, an editor saving over the file).
    write_file(
        &rig.root.join("written.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 1),
    );
    // Saved atomically: a hidden temporary file renamed over the name.
    let tmp = rig.root.join(".renamed.pdf.tmp");
    write_file(&tmp, &pdf_pages("xfig-howto.pdf", 0, 2));
    std::fs::rename(&tmp, rig.root.join("renamed.pdf")).expect("rename in");
    // Moved in from outside the watched folder.
    let (_o, outside) = canonical_tempdir();
    write_file(
        &outside.join("moved.pdf"),
        &pdf_pages("xfig-howto.pdf", 3, 3),
    );
    std::fs::rename(outside.join("moved.pdf"), rig.root.join("moved.pdf")).expect("move in");
    for (name, pages) in [("written.pdf", 2), ("renamed.pdf", 3), ("moved.pdf", 1)] {
        let id = rig.doc_id(name);
        until(name, || async { counts(&s, &id).await.0 == pages }).await;
    }
    quiet(&agent).await;
    assert_eq!(agent.telemetry.files_extracted.get(), 3, "each read once");
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_open_between_writes_is_not_read_until_its_writer_closes_it() {
    let rig = rig(TEN_MINUTES_MS);
    let s = rig.syncer().await;
    let agent = rig.start().await;
    let bytes = pdf_pages("xfig-howto.pdf", 0, 3);
    let path = rig.root.join("open.pdf");
    let id = rig.doc_id("open.pdf");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        f.write_all(head).expect("write");
        f.flush().expect("flush");
        // Many of the agent's short checks: the size and mtime hold still all along, but
        // nobody said the file is complete.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            agent.telemetry.files_extracted.get(),
            0,
            "a file still open for writing was read"
        );
        assert_eq!(agent.telemetry.files_failed.get(), 0);
        f.write_all(tail).expect("write");
    }
    until("open.pdf indexed", || async {
        counts(&s, &id).await.0 == 4
    })
    .await;
    quiet(&agent).await;
    assert_eq!(
        agent.telemetry.files_extracted.get(),
        1,
        "read once, complete"
    );
    assert_eq!(agent.telemetry.files_failed.get(), 0);
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_stopped_are_caught_up_at_start() {
    let rig = rig(200);
    let s = rig.syncer().await;
    write_file(
        &rig.root.join("keep.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 0),
    );
    write_file(
        &rig.root.join("edit.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 2),
    );
    write_file(
        &rig.root.join("gone.pdf"),
        &pdf_pages("asyRefCard.pdf", 1, 1),
    );
    write_file(
        &rig.root.join("move.pdf"),
        &pdf_pages("xfig-howto.pdf", 0, 0),
    );
    let agent = rig.start().await;
    for (name, pages) in [
        ("keep.pdf", 1),
        ("edit.pdf", 3),
        ("gone.pdf", 1),
        ("move.pdf", 1),
    ] {
        let id = rig.doc_id(name);
        until(name, || async { counts(&s, &id).await.0 == pages }).await;
    }
    quiet(&agent).await;
    agent.shutdown().await.expect("shutdown");

    write_file(
        &rig.root.join("edit.pdf"),
        &pdf_pages("xfig-howto.pdf", 1, 2),
    );
    std::fs::remove_file(rig.root.join("gone.pdf")).expect("rm");
    std::fs::rename(rig.root.join("move.pdf"), rig.root.join("moved.pdf")).expect("mv");
    write_file(
        &rig.root.join("new.pdf"),
        &pdf_pages("xfig-howto.pdf", 3, 3),
    );

    let agent = rig.start().await;
    let r = agent.startup.clone();
    assert_eq!(
        (r.unchanged, r.changed, r.deleted, r.moved, r.new),
        (1, 1, 1, 1, 1),
        "{r:?}"
    );
    let calls_before = agent.telemetry.embed_calls.get();
    quiet(&agent).await;
    assert_eq!(counts(&s, &rig.doc_id("edit.pdf")).await.0, 2);
    assert_eq!(counts(&s, &rig.doc_id("gone.pdf")).await, (0, 0));
    assert_eq!(counts(&s, &rig.doc_id("move.pdf")).await, (0, 0));
    assert_eq!(counts(&s, &rig.doc_id("moved.pdf")).await.0, 1);
    assert_eq!(counts(&s, &rig.doc_id("new.pdf")).await.0, 1);
    assert_eq!(counts(&s, &rig.doc_id("keep.pdf")).await.0, 1);
    assert_eq!(agent.telemetry.files_moved.get(), 1);
    assert_eq!(
        agent.telemetry.files_extracted.get(),
        2,
        "only edit.pdf and new.pdf are read; {calls_before}"
    );
    agent.shutdown().await.expect("shutdown");
}

/// A change no file-system event reports is found by the periodic rescan. The file is
/// rewritten in place through a hard link in another folder: inotify tells the watchers of the
/// folder the write went through, not of the watched one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_rescan_finds_a_change_no_event_reported() {
    let mut rig = rig(200);
    rig.cfg.watch.rescan_interval_s = 1;
    let s = rig.syncer().await;
    let doc = rig.root.join("linked.pdf");
    write_file(&doc, &pdf_pages("asyRefCard.pdf", 0, 2));
    let agent = rig.start().await;
    let id = rig.doc_id("linked.pdf");
    until("linked.pdf has 3 pages", || async {
        counts(&s, &id).await.0 == 3
    })
    .await;
    quiet(&agent).await;
    assert_eq!(agent.telemetry.missed_changes.get(), 0);

    let elsewhere = tempfile::tempdir().expect("tempdir");
    let link = elsewhere.path().join("same-file.pdf");
    std::fs::hard_link(&doc, &link).expect("hard link");
    // Same inode, new content (and size and mtime).
    std::fs::write(&link, pdf_pages("xfig-howto.pdf", 0, 0)).expect("write through the link");
    until("linked.pdf re-indexed with 1 page", || async {
        counts(&s, &id).await.0 == 1
    })
    .await;
    assert!(
        agent.telemetry.missed_changes.get() >= 1,
        "the periodic rescan found it, not the watcher"
    );
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_files_at_once_with_bounded_memory() {
    let rig = rig(300);
    let s = rig.syncer().await;
    let agent = rig.start().await;
    let one = pdf_pages("asyRefCard.pdf", 0, 0);
    let (_st, staging) = canonical_tempdir();
    for i in 0..200 {
        write_file(&staging.join(format!("f{i:03}.pdf")), &one);
    }
    // All at once: a folder moved in.
    std::fs::rename(&staging, rig.root.join("batch")).expect("move the batch in");
    let visual = s.visual_collection().clone();
    until("200 documents indexed", || async {
        visual.count().await.unwrap_or(0) == 200
    })
    .await;
    quiet(&agent).await;
    assert_eq!(agent.store().file_counts().expect("counts").indexed, 200);
    // Pages from several documents share a model batch.
    let batches = agent.telemetry.image_batches.get();
    let pages = agent.telemetry.pages_embedded.total();
    assert_eq!(pages, 200);
    assert!(
        batches < pages,
        "one-page documents must share model batches ({batches} batches for {pages} pages)"
    );
    let peak = peak_rss_mb();
    println!("200 files: {batches} image batches for {pages} pages, peak RSS {peak} MiB");
    assert!(peak < 2048, "peak RSS {peak} MiB: memory is not bounded");
    agent.shutdown().await.expect("shutdown");
}

/// This process's peak resident memory (Linux), in MiB.
fn peak_rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_command_driver_indexes_reports_and_fails_cleanly() {
    let rig = rig(300);
    let s = rig.syncer().await;
    write_file(
        &rig.root.join("one.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 1),
    );
    write_file(
        &rig.root.join("broken.pdf"),
        b"%PDF-1.4 this is not really a PDF",
    );
    let run = || async {
        let store = Store::open(&rig.cfg.store_dir()).expect("store");
        let extract = RealExtract::new(&rig.cfg, agent_exe()).expect("extractor");
        let loader = RealModelLoader {
            cfg: rig.cfg.model.clone(),
        };
        let mut seen = 0;
        let summary = index_paths(
            &rig.cfg,
            std::slice::from_ref(&rig.root),
            store,
            extract,
            loader,
            RealSink(rig.syncer().await),
            Arc::new(Telemetry::new("tiny")),
            |_, _| seen += 1,
        )
        .await
        .expect("index runs");
        (summary, seen)
    };
    let (summary, seen) = run().await;
    assert_eq!(summary.indexed.len(), 1, "{summary:?}");
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    assert!(summary.failed[0].0.ends_with("broken.pdf"));
    assert!(seen >= 2);
    assert_eq!(counts(&s, &rig.doc_id("one.pdf")).await.0, 2);
    // A second run reads nothing again.
    let (summary, _) = run().await;
    assert!(summary.indexed.is_empty(), "{summary:?}");
    assert_eq!(summary.unchanged, 1, "{summary:?}");
    assert_eq!(
        summary.failed.len(),
        1,
        "a failed file is tried again when asked for: {summary:?}"
    );
}

#[test]
fn killed_mid_batch_then_restarted_converges_and_sigterm_exits_cleanly() {
    let rig = rig(200);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let s = rt.block_on(rig.syncer());
    let mut cfg = rig.cfg.clone();
    // The status API on a free port, so that `status` can ask the running agent.
    cfg.api.port = common::free_port();
    let config = rig.cfg.state_dir.join("config.toml");
    std::fs::write(&config, toml::to_string(&cfg).expect("config as TOML")).expect("write config");
    let log = rig.cfg.state_dir.join("agent.log");

    let mut expected: Vec<(String, usize)> = vec![("big.pdf".into(), 113)];
    std::fs::copy(
        common::corpus().join("R-intro.pdf"),
        rig.root.join("big.pdf"),
    )
    .expect("copy");
    for i in 0..6u16 {
        let name = format!("doc{i}.pdf");
        write_file(
            &rig.root.join(&name),
            &pdf_pages("xfig-howto.pdf", i * 3, i * 3 + 2),
        );
        expected.push((name, 3));
    }
    let total: usize = expected.iter().map(|(_, n)| n).sum();
    let visual = s.visual_collection().clone();
    let count = || rt.block_on(async { visual.count().await.unwrap_or(0) });

    // Killed while records are being written.
    let agent = RunningAgent::start(&config, std::slice::from_ref(&rig.root), &log);
    let mut at_kill = 0;
    for _ in 0..3000 {
        at_kill = count();
        if at_kill > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.signal(libc::SIGKILL);
    let st = agent.wait();
    assert!(!st.success());
    assert!(
        at_kill > 0 && at_kill < total,
        "the kill must land mid-way ({at_kill} of {total} pages written)"
    );

    // While it is down: a finished document shrinks, another one goes.
    write_file(
        &rig.root.join("doc0.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 0),
    );
    expected[1].1 = 1;
    std::fs::remove_file(rig.root.join("doc1.pdf")).expect("rm");
    let gone = expected.remove(2);
    let total: usize = expected.iter().map(|(_, n)| n).sum();

    // Restarted: converges. SIGTERM: exits 0.
    let agent = RunningAgent::start(&config, std::slice::from_ref(&rig.root), &log);
    for (name, pages) in &expected {
        let id = rig.doc_id(name);
        rt.block_on(until(&format!("{name} has {pages} pages"), || async {
            counts(&s, &id).await.0 == *pages
        }));
    }
    rt.block_on(until("no stale or duplicate records", || async {
        visual.count().await.unwrap_or(0) == total
    }));
    assert_eq!(rt.block_on(counts(&s, &rig.doc_id(&gone.0))), (0, 0));

    // `status` while the agent runs (and holds the store): answered through its API.
    let mut live = serde_json::Value::Null;
    for _ in 0..100 {
        live = common::status_json(&config);
        if live["files"]["indexed"] == expected.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(live["agent_running"], true, "{live}");
    assert_eq!(live["files"]["indexed"], expected.len(), "{live}");
    assert_eq!(live["files"]["pages"], total, "{live}");

    // `index` while the agent runs: handed to it through its API, and it returns only once the
    // agent's queue is empty, so the new file is searchable when it does.
    let index = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(agent_exe())
            .arg("--config")
            .arg(&config)
            .arg("index")
            .args(args)
            .output()
            .expect("index runs")
    };
    let late = rig.root.join("late.pdf");
    write_file(&late, &pdf_pages("xfig-howto.pdf", 0, 1));
    let out = index(&[late.as_os_str()]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "index through the agent failed: {said}"
    );
    assert!(said.contains("the running agent"), "{said}");
    assert_eq!(
        rt.block_on(counts(&s, &rig.doc_id("late.pdf"))).0,
        2,
        "indexed by the time `index` returned: {said}"
    );
    // The whole folder, as JSON: every file accounted for. Nothing changed, but the watcher's
    // own event for late.pdf may still have it queued for a (no-op) check.
    let out = index(&["--json".as_ref(), rig.root.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("index --json is JSON");
    assert_eq!(j["through_agent"], true, "{j}");
    let (queued, unchanged) = (
        j["queued"].as_u64().unwrap(),
        j["unchanged"].as_u64().unwrap(),
    );
    assert_eq!(queued + unchanged, expected.len() as u64 + 1, "{j}");
    assert!(queued <= 1, "{j}");
    assert_eq!(j["failed"], serde_json::json!([]), "{j}");
    // A path outside the watched folder is refused, with the reason and the fix.
    let outside = tempfile::tempdir().expect("tempdir");
    let out = index(&[outside.path().as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not in a folder the running agent watches")
            && err.contains("watch.folders"),
        "{err}"
    );

    // `repair` while the agent runs: the agent reconciles its store with Chroma. An orphan
    // (records of this agent id for a file it never had) goes; the live documents stay.
    let ghost = rig.root.join("ghost.pdf");
    let sample = rt.block_on(async {
        let got = visual
            .get_ids(
                &[docusearch_agent::records::page_id(
                    &rig.doc_id("late.pdf"),
                    1,
                )],
                &[docusearch_agent::chroma::client::Include::Metadatas],
            )
            .await
            .expect("get");
        let m = got.metadatas.unwrap().remove(0).expect("metadata");
        docusearch_agent::records::decode_full_embeddings(&m).expect("decodes")
    });
    let meta = docusearch_agent::sync::DocumentMeta {
        doc_id: DocId::new(&rig.cfg.agent_id, &ghost),
        agent_id: rig.cfg.agent_id.clone(),
        source_path: ghost.clone(),
        filename: "ghost.pdf".into(),
        format: docusearch_agent::types::DocFormat::Pdf,
        num_pages: 1,
        content_hash: docusearch_agent::types::ContentHash::of_bytes(b"ghost"),
        model: "test".into(),
        timestamp: "2026-11-27T00:00:00Z".into(),
    };
    let page = docusearch_agent::sync::PageRecord {
        page: 1,
        text: "nobody's page".into(),
        embedding: sample,
    };
    rt.block_on(s.upsert_pages(&meta, &[page]))
        .expect("orphan written");
    let live = total + 2;
    assert_eq!(count(), live + 1);
    let out = std::process::Command::new(agent_exe())
        .arg("--config")
        .arg(&config)
        .arg("repair")
        .output()
        .expect("repair runs");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("done by the running agent"), "{said}");
    assert!(said.contains("1 orphan documents"), "{said}");
    assert_eq!(rt.block_on(counts(&s, &meta.doc_id)), (0, 0), "{said}");
    assert_eq!(
        count(),
        live,
        "the live documents keep every record: {said}"
    );

    agent.signal(libc::SIGTERM);
    let st = agent.wait();
    assert!(
        st.success(),
        "SIGTERM must end the agent with status 0, got {st:?}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        !rig.cfg.state_dir.join("agent.pid").exists(),
        "the pid file is removed on exit"
    );
}

/// A watched folder on a disk that is not mounted: `run` warns, indexes the folder that is there,
/// and `/health` and `status` name the missing one until it appears; then it is watched.
#[test]
fn run_reports_a_missing_watched_folder_and_watches_it_once_it_appears() {
    let rig = rig(200);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let s = rt.block_on(rig.syncer());
    let missing = rig.cfg.state_dir.join("unmounted/docs");
    let mut cfg = rig.cfg.clone();
    cfg.api.port = common::free_port();
    cfg.watch.folders = vec![rig.root.clone(), missing.clone()];
    let config = rig.cfg.state_dir.join("config.toml");
    std::fs::write(&config, toml::to_string(&cfg).expect("config as TOML")).expect("write config");
    let log = rig.cfg.state_dir.join("agent.log");
    write_file(&rig.root.join("a.pdf"), &pdf_pages("missing-folder", 0, 1));

    // The configured folders, as a service runs it.
    let agent = RunningAgent::start(&config, &[], &log);
    let id = rig.doc_id("a.pdf");
    rt.block_on(until(
        "a.pdf indexed from the folder that is there",
        || async { counts(&s, &id).await.0 == 2 },
    ));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.lines().any(|l| l.contains("WARN")
            && l.contains(&format!("watched folder {} is missing", missing.display()))),
        "a warning names the folder: {said}"
    );

    let (code, health) = rt.block_on(async {
        let resp = reqwest::get(format!("http://127.0.0.1:{}/health", cfg.api.port))
            .await
            .expect("GET /health");
        let code = resp.status().as_u16();
        (code, resp.json::<serde_json::Value>().await.expect("JSON"))
    });
    assert_eq!(code, 503, "{health}");
    let reasons = health["reasons"].as_array().expect("reasons");
    assert!(
        reasons.iter().any(|r| r.as_str().is_some_and(
            |r| r.starts_with(&format!("watched folder {} is missing", missing.display()))
        )),
        "{health}"
    );

    let out = std::process::Command::new(agent_exe())
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("status runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("agent:   running"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with(&format!(
            "warning: watched folder {} is missing",
            missing.display()
        ))),
        "{stdout}"
    );

    // Mounted later: watched from then on, and healthy again.
    write_file(&missing.join("b.pdf"), &pdf_pages("missing-folder-b", 0, 0));
    let b = docusearch_agent::types::DocId::new(&cfg.agent_id, &missing.join("b.pdf"));
    rt.block_on(until(
        "b.pdf indexed from the folder that appeared",
        || async { counts(&s, &b).await.0 == 1 },
    ));
    let health = rt.block_on(async {
        let url = format!("http://127.0.0.1:{}/health", cfg.api.port);
        let mut code = 0;
        for _ in 0..100 {
            code = reqwest::get(&url)
                .await
                .expect("GET /health")
                .status()
                .as_u16();
            if code == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        code
    });
    assert_eq!(health, 200);
    let status = rt.block_on(async {
        reqwest::get(format!("http://127.0.0.1:{}/status", cfg.api.port))
            .await
            .expect("GET /status")
            .json::<serde_json::Value>()
            .await
            .expect("JSON")
    });
    assert_eq!(status["missing_folders"], serde_json::json!([]), "{status}");
    let out = std::process::Command::new(agent_exe())
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("status runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("warning: watched folder"), "{stdout}");

    agent.signal(libc::SIGTERM);
    let st = agent.wait();
    assert!(
        st.success(),
        "SIGTERM ends it with status 0, got {st:?}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// A watched folder that goes away is reported while it is missing and watched again once it
/// is back. Moved off and back (an unmounted disk looks the same): nothing is deleted while it
/// is away, nothing embedded again when it returns. Deleted and created again: what it held is
/// deleted, what it holds now is indexed, and so is a file written into it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_that_goes_away_is_reported_and_watched_again() {
    let rig = rig(200);
    let s = rig.syncer().await;
    let agent = rig.start().await;
    write_file(&rig.root.join("a.pdf"), &pdf_pages("folder-away-a", 0, 1));
    let a = rig.doc_id("a.pdf");
    until("a.pdf indexed", || async { counts(&s, &a).await.0 == 2 }).await;
    quiet(&agent).await;
    assert!(agent.telemetry.missing_folders().is_empty());
    let extracted = agent.telemetry.files_extracted.get();

    let away = rig.root.with_extension("away");
    std::fs::rename(&rig.root, &away).expect("move the watched folder away");
    until("the folder reported missing", || async {
        agent.telemetry.missing_folders() == [rig.root.clone()]
    })
    .await;
    // A full reconcile while it is missing (the periodic one, `POST /rescan`) deletes nothing.
    agent.tracker.reconcile_all().expect("reconcile");
    quiet(&agent).await;
    assert_eq!(
        counts(&s, &a).await.0,
        2,
        "its records stay while it is away"
    );

    std::fs::rename(&away, &rig.root).expect("move it back");
    until("the folder no longer missing", || async {
        agent.telemetry.missing_folders().is_empty()
    })
    .await;
    write_file(&rig.root.join("b.pdf"), &pdf_pages("folder-away-b", 0, 0));
    let b = rig.doc_id("b.pdf");
    until("b.pdf, written after the return, indexed", || async {
        counts(&s, &b).await.0 == 1
    })
    .await;
    quiet(&agent).await;
    assert_eq!(
        agent.telemetry.files_extracted.get(),
        extracted + 1,
        "only b.pdf went through the pipeline: a.pdf came back unchanged"
    );
    assert_eq!(counts(&s, &a).await.0, 2);

    std::fs::remove_dir_all(&rig.root).expect("rm -r the watched folder");
    std::fs::create_dir(&rig.root).expect("create it again");
    write_file(&rig.root.join("c.pdf"), &pdf_pages("folder-away-c", 0, 0));
    let c = rig.doc_id("c.pdf");
    until("the old documents deleted, the new one indexed", || async {
        counts(&s, &a).await == (0, 0)
            && counts(&s, &b).await == (0, 0)
            && counts(&s, &c).await.0 == 1
    })
    .await;
    quiet(&agent).await;
    assert!(agent.telemetry.missing_folders().is_empty());
    write_file(&rig.root.join("d.pdf"), &pdf_pages("folder-away-d", 0, 0));
    let d = rig.doc_id("d.pdf");
    until("d.pdf indexed", || async { counts(&s, &d).await.0 == 1 }).await;
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_loads_on_the_first_page_and_unloads_when_idle() {
    let mut rig = rig(200);
    rig.cfg.model.idle_unload_s = 1;
    let s = rig.syncer().await;
    let agent = rig.start().await;
    quiet(&agent).await;
    assert_eq!(agent.telemetry.model().loads, 0, "no work, no model");

    write_file(&rig.root.join("a.pdf"), &pdf_pages("first", 0, 0));
    let a = rig.doc_id("a.pdf");
    until("a.pdf indexed", || async { counts(&s, &a).await.0 == 1 }).await;
    assert_eq!(agent.telemetry.model().loads, 1);
    until("the model unloaded after the idle period", || async {
        !(agent.telemetry.model().state == ModelState::Loaded)
    })
    .await;

    write_file(&rig.root.join("b.pdf"), &pdf_pages("second", 0, 0));
    let b = rig.doc_id("b.pdf");
    until("b.pdf indexed", || async { counts(&s, &b).await.0 == 1 }).await;
    assert_eq!(
        agent.telemetry.model().loads,
        2,
        "loaded again for new work"
    );
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_while_being_processed_ends_with_its_last_content() {
    let rig = rig(200);
    let s = rig.syncer().await;
    let agent = rig.start().await;
    let path = rig.root.join("manual.pdf");
    std::fs::copy(common::corpus().join("R-intro.pdf"), &path).expect("copy");
    let id = rig.doc_id("manual.pdf");
    until("the first pages written", || async {
        counts(&s, &id).await.0 > 0
    })
    .await;
    // Replaced while its 113 pages are still being processed.
    write_file(&path, &pdf_pages("replacement", 0, 1));
    until("the replacement indexed", || async {
        agent.store().file(&path).ok().flatten().is_some_and(|r| {
            r.content_hash == docusearch_agent::types::ContentHash::of_file(&path).expect("hash")
        })
    })
    .await;
    quiet(&agent).await;
    assert_eq!(
        counts(&s, &id).await.0,
        2,
        "no page of the old content is left"
    );
    assert!(agent.telemetry.files_extracted.get() >= 1);
    agent.shutdown().await.expect("shutdown");
}
