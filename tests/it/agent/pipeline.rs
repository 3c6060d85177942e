//! The whole agent on the real stages: real file-system events, real PDFium (isolated
//! worker), the real model code on the tiny checkpoint, a real Chroma server.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use docusearch_agent::agent::real::{RealExtract, RealModelLoader, RealSink};
use docusearch_agent::agent::runtime::{index_paths, Agent};
use docusearch_agent::config::{Config, DeviceChoice};
use docusearch_agent::state::Store;
use docusearch_agent::sync::Syncer;
use docusearch_agent::telemetry::{ModelState, Telemetry};
use docusearch_agent::types::DocId;

use crate::common::{self, TestChroma};
use crate::watch::canonical_tempdir;

pub struct Rig {
    pub chroma: TestChroma,
    pub cfg: Config,
    pub root: PathBuf,
    _root: tempfile::TempDir,
    _state: tempfile::TempDir,
}

pub fn rig(settle_ms: u64) -> Rig {
    let chroma = common::start_chroma();
    let (root_t, root) = canonical_tempdir();
    let state = tempfile::tempdir().expect("state dir");
    let model = common::fixture("tiny-colpali");
    assert!(
        model.join("config.json").is_file(),
        "the tiny test checkpoint is missing at {} — run `scripts/setup`",
        model.display()
    );
    let mut cfg = Config::default();
    cfg.agent_id = "test-agent".into();
    cfg.state_dir = state.path().to_path_buf();
    cfg.chroma.url = Some(chroma.url());
    cfg.model.name = model.to_string_lossy().into_owned();
    cfg.model.device = DeviceChoice::Cpu;
    cfg.model.idle_unload_s = 0;
    cfg.watch.folders = vec![root.clone()];
    cfg.watch.settle_ms = settle_ms;
    cfg.watch.rescan_interval_s = 0;
    cfg.pipeline.retry_base_s = 1;
    cfg.extract.render_dpi = 72;
    Rig {
        chroma,
        cfg,
        root,
        _root: root_t,
        _state: state,
    }
}

pub fn worker_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_docusearch-agent"))
}

impl Rig {
    pub async fn syncer(&self) -> Syncer {
        Syncer::connect(&self.chroma.url(), &self.cfg)
            .await
            .expect("connect to the test Chroma")
    }

    pub async fn start(&self) -> Agent {
        let store = Store::open(&self.cfg.store_dir()).expect("store");
        let extract = RealExtract::new(&self.cfg, worker_exe()).expect("extractor");
        let loader = RealModelLoader {
            cfg: self.cfg.model.clone(),
        };
        let sink = RealSink(self.syncer().await);
        Agent::start(
            &self.cfg,
            std::slice::from_ref(&self.root),
            store,
            extract,
            loader,
            sink,
        )
        .await
        .expect("agent starts")
    }

    pub fn doc_id(&self, rel: &str) -> DocId {
        DocId::new(&self.cfg.agent_id, &self.root.join(rel))
    }
}

/// A real PDF (written here, so the test process never binds PDFium, which binds once per
/// process) with one page per text; `tag` makes the content (and hash) unique.
pub fn pdf_pages(tag: &str, first: u16, last: u16) -> Vec<u8> {
    let texts: Vec<String> = (first..=last)
        .map(|i| {
            format!(
                "{tag} page {} about rivers mountains and the history of printing number {i}",
                i + 1
            )
        })
        .collect();
    make_pdf(&texts)
}

pub fn make_pdf(texts: &[String]) -> Vec<u8> {
    let n = texts.len();
    // Objects: 1 catalog, 2 pages, 3 font, then (page, content) pairs.
    let mut objs: Vec<String> = Vec::new();
    objs.push("<< /Type /Catalog /Pages 2 0 R >>".into());
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objs.push(format!(
        "<< /Type /Pages /Kids [{}] /Count {n} >>",
        kids.join(" ")
    ));
    objs.push("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into());
    for (i, t) in texts.iter().enumerate() {
        let esc = t
            .replace('\\', "\\\\")
            .replace('(', "\\(")
            .replace(')', "\\)");
        let stream = format!("BT /F1 14 Tf 40 700 Td ({esc}) Tj ET");
        objs.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            5 + 2 * i
        ));
        objs.push(format!(
            "<< /Length {} >>\nstream\n{stream}\nendstream",
            stream.len()
        ));
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
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

/// Polls `cond` (with a generous guard so a broken agent fails instead of hanging).
pub async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..600 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub async fn counts(s: &Syncer, id: &DocId) -> (usize, usize) {
    s.count_document(id).await.expect("count records")
}

/// Waits until the agent has nothing queued or running.
async fn quiet(agent: &Agent) {
    until("the queue to drain", || async {
        let c = agent.store().queue_counts().expect("counts");
        c.queued == 0 && c.in_progress == 0 && agent.telemetry.in_flight.get() == 0
    })
    .await;
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("create folders");
    }
    std::fs::write(path, bytes).expect("write file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_dropped_edited_saved_renamed_and_deleted() {
    let rig = rig(300);
    let s = rig.syncer().await;
    let agent = rig.start().await;

    // Dropped in: searchable.
    write(&rig.root.join("a.pdf"), &pdf_pages("asyRefCard.pdf", 0, 1));
    let a = rig.doc_id("a.pdf");
    until("a.pdf indexed", || async { counts(&s, &a).await.0 == 2 }).await;
    quiet(&agent).await;
    assert!(counts(&s, &a).await.1 > 0, "text chunks are indexed too");
    let extracted = agent.telemetry.files_extracted.get();

    // Edited in place: the same doc_id, one page less, nothing stale left.
    write(&rig.root.join("a.pdf"), &pdf_pages("asyRefCard.pdf", 2, 2));
    until("a.pdf re-indexed with one page", || async {
        counts(&s, &a).await.0 == 1
    })
    .await;
    quiet(&agent).await;
    assert_eq!(agent.telemetry.files_extracted.get(), extracted + 1);

    // Saved atomically (temp file renamed over it): processed once.
    let tmp = rig.root.join(".a.pdf.tmp");
    write(&tmp, &pdf_pages("xfig-howto.pdf", 0, 2));
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
    write(
        &rig.root.join("sub/x.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 0),
    );
    write(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_stopped_are_caught_up_at_start() {
    let rig = rig(200);
    let s = rig.syncer().await;
    write(
        &rig.root.join("keep.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 0),
    );
    write(
        &rig.root.join("edit.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 2),
    );
    write(
        &rig.root.join("gone.pdf"),
        &pdf_pages("asyRefCard.pdf", 1, 1),
    );
    write(
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

    write(
        &rig.root.join("edit.pdf"),
        &pdf_pages("xfig-howto.pdf", 1, 2),
    );
    std::fs::remove_file(rig.root.join("gone.pdf")).expect("rm");
    std::fs::rename(rig.root.join("move.pdf"), rig.root.join("moved.pdf")).expect("mv");
    write(
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
    write(&doc, &pdf_pages("asyRefCard.pdf", 0, 2));
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
        write(&staging.join(format!("f{i:03}.pdf")), &one);
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
    write(
        &rig.root.join("one.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 1),
    );
    write(
        &rig.root.join("broken.pdf"),
        b"%PDF-1.4 this is not really a PDF",
    );
    let run = || async {
        let store = Store::open(&rig.cfg.store_dir()).expect("store");
        let extract = RealExtract::new(&rig.cfg, worker_exe()).expect("extractor");
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

/// The `run` command as a service manager runs it.
struct RunningAgent {
    child: std::process::Child,
}

impl RunningAgent {
    fn start(rig: &Rig, config: &Path, log: &Path) -> RunningAgent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = std::process::Command::new(worker_exe())
            .arg("--config")
            .arg(config)
            .arg("run")
            .arg(&rig.root)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the agent");
        RunningAgent { child }
    }

    fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the exit (with a guard against a hang).
    fn wait(mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("the agent did not exit");
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn killed_mid_batch_then_restarted_converges_and_sigterm_exits_cleanly() {
    let rig = rig(200);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let s = rt.block_on(rig.syncer());
    let mut cfg = rig.cfg.clone();
    // The status API on a free port, so that `status` can ask the running agent.
    cfg.api.port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
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
        write(
            &rig.root.join(&name),
            &pdf_pages("xfig-howto.pdf", i * 3, i * 3 + 2),
        );
        expected.push((name, 3));
    }
    let total: usize = expected.iter().map(|(_, n)| n).sum();
    let visual = s.visual_collection().clone();
    let count = || rt.block_on(async { visual.count().await.unwrap_or(0) });

    // Killed while records are being written.
    let agent = RunningAgent::start(&rig, &config, &log);
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
    write(
        &rig.root.join("doc0.pdf"),
        &pdf_pages("asyRefCard.pdf", 0, 0),
    );
    expected[1].1 = 1;
    std::fs::remove_file(rig.root.join("doc1.pdf")).expect("rm");
    let gone = expected.remove(2);
    let total: usize = expected.iter().map(|(_, n)| n).sum();

    // Restarted: converges. SIGTERM: exits 0.
    let agent = RunningAgent::start(&rig, &config, &log);
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
        let out = std::process::Command::new(worker_exe())
            .arg("--config")
            .arg(&config)
            .args(["status", "--json"])
            .output()
            .expect("status runs");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        live = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
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
        std::process::Command::new(worker_exe())
            .arg("--config")
            .arg(&config)
            .arg("index")
            .args(args)
            .output()
            .expect("index runs")
    };
    let late = rig.root.join("late.pdf");
    write(&late, &pdf_pages("xfig-howto.pdf", 0, 1));
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
    let out = std::process::Command::new(worker_exe())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_loads_on_the_first_page_and_unloads_when_idle() {
    let mut rig = rig(200);
    rig.cfg.model.idle_unload_s = 1;
    let s = rig.syncer().await;
    let agent = rig.start().await;
    quiet(&agent).await;
    assert_eq!(agent.telemetry.model().loads, 0, "no work, no model");

    write(&rig.root.join("a.pdf"), &pdf_pages("first", 0, 0));
    let a = rig.doc_id("a.pdf");
    until("a.pdf indexed", || async { counts(&s, &a).await.0 == 1 }).await;
    assert_eq!(agent.telemetry.model().loads, 1);
    until("the model unloaded after the idle period", || async {
        !(agent.telemetry.model().state == ModelState::Loaded)
    })
    .await;

    write(&rig.root.join("b.pdf"), &pdf_pages("second", 0, 0));
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
    write(&path, &pdf_pages("replacement", 0, 1));
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
