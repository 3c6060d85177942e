//! The test harness: real prerequisites, found the way the agent finds them, and the helpers
//! the test modules share (temporary folders, files, PDFs, polling, processes, the agent rig).
//! A missing prerequisite fails the test with the fix (run `scripts/setup`); nothing is
//! silently skipped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use docusearch_agent::api::{AgentStatus, ApiClient, Health};

use docusearch_agent::agent::real::{RealExtract, RealModelLoader, RealSink};
use docusearch_agent::agent::runtime::Agent;
use docusearch_agent::agent::stages::{EmbedLoader, Extract, Sink};
use docusearch_agent::chroma::managed::ManagedChroma;
use docusearch_agent::config::{Config, DeviceChoice};
use docusearch_agent::runtime_paths;
use docusearch_agent::state::Store;
use docusearch_agent::sync::Syncer;
use docusearch_agent::types::DocId;

/// A real Chroma server on a free loopback port, with its data in a temporary directory.
/// Stopped (and its data removed) on drop.
pub struct TestChroma {
    pub server: ManagedChroma,
    pub dir: tempfile::TempDir,
}

impl TestChroma {
    pub fn url(&self) -> String {
        self.server.url()
    }
}

pub fn chroma_bin() -> PathBuf {
    runtime_paths::find_chroma(None)
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"))
}

pub fn start_chroma() -> TestChroma {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = ManagedChroma::start(&chroma_bin(), &dir.path().join("chroma"))
        .unwrap_or_else(|e| panic!("could not start a Chroma server for the test: {e}"));
    TestChroma { server, dir }
}

pub fn pdfium_path() -> PathBuf {
    runtime_paths::find_pdfium(None)
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"))
}

/// `tests/fixtures/corpus`: real documents nobody on this project wrote (see its SOURCES.md).
pub fn corpus() -> PathBuf {
    let dir = fixture("corpus");
    assert!(
        dir.join("R-intro.pdf").is_file(),
        "the test corpus is missing: expected real documents in {} (they are part of the repository: check out the whole tree)",
        dir.display()
    );
    dir
}

/// `tests/fixtures/...`
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The agent's own executable (also its isolated renderer).
pub fn agent_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_docusearch-agent"))
}

/// A temporary directory and its canonical path (event paths are canonical; on macOS the
/// temporary directory is behind a symlink).
pub fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = std::fs::canonicalize(dir.path()).expect("canonical temp path");
    (dir, path)
}

/// Writes `bytes` to `path`, creating its folders.
pub fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("create folders");
    }
    std::fs::write(path, bytes).expect("write file");
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends `sig` to a process the test started.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a process this test's harness started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Polls `f` every 100 ms until it holds (true) or `limit` has passed (false). Blocking.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Polls `cond` every 200 ms, failing the test after two minutes (so a broken agent fails
/// instead of hanging). Async.
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

/// The agent's parts on real things: a Chroma server, a watched temporary folder, a state
/// directory, the tiny checkpoint on the CPU.
pub struct Rig {
    pub chroma: TestChroma,
    pub cfg: Config,
    pub root: PathBuf,
    _root: tempfile::TempDir,
    _state: tempfile::TempDir,
}

/// A [`Rig`] whose watcher waits `settle_ms` for a file to stop changing.
pub fn rig(settle_ms: u64) -> Rig {
    let chroma = start_chroma();
    let (root_t, root) = canonical_tempdir();
    let state = tempfile::tempdir().expect("state dir");
    let model = fixture("tiny-colpali");
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

impl Rig {
    pub async fn syncer(&self) -> Syncer {
        Syncer::connect(&self.chroma.url(), &self.cfg)
            .await
            .expect("connect to the test Chroma")
    }

    pub async fn start(&self) -> Agent {
        let extract = RealExtract::new(&self.cfg, agent_exe()).expect("extractor");
        let loader = RealModelLoader {
            cfg: self.cfg.model.clone(),
        };
        let sink = RealSink(self.syncer().await);
        self.start_with(extract, loader, sink).await
    }

    /// The agent on the rig's store and folder with these stages (the real ones, or wrappers
    /// of them that fail on purpose).
    pub async fn start_with<X: Extract, L: EmbedLoader, S: Sink>(
        &self,
        extract: X,
        loader: L,
        sink: S,
    ) -> Agent {
        let store = Store::open(&self.cfg.store_dir()).expect("store");
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

/// A minimal PDF with one page of Helvetica text per entry of `texts`.
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

/// (page records, chunk records) of a document.
pub async fn counts(s: &Syncer, id: &DocId) -> (usize, usize) {
    s.count_document(id).await.expect("count records")
}

/// The `run` command as a service manager runs it.
pub struct RunningAgent {
    pub child: std::process::Child,
}

impl RunningAgent {
    /// `run` with `config`, watching `folders` (none: the configured ones), its output
    /// appended to `log`.
    pub fn start(config: &Path, folders: &[PathBuf], log: &Path) -> RunningAgent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = std::process::Command::new(agent_exe())
            .arg("--config")
            .arg(config)
            .arg("run")
            .args(folders)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the agent");
        RunningAgent { child }
    }

    pub fn signal(&self, sig: i32) {
        signal(self.child.id(), sig);
    }

    /// Waits for the exit (with a guard against a hang).
    pub fn wait(mut self) -> std::process::ExitStatus {
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

/// `status --json` for the configuration at `config`, as a user types it.
pub fn status_json(config: &Path) -> serde_json::Value {
    let out = std::process::Command::new(agent_exe())
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .output()
        .expect("status runs");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// `run` on the rig's folder with its status API on a free port, and `env` set.
pub struct ServedAgent {
    pub child: Child,
    pub api: ApiClient,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// The agent run as another user reads its binary, the tiny checkpoint and PDFium from the
/// checkout and the target folder: every folder above them must let others through (a clone
/// under `mktemp -d`, mode 0700, does not, and the agent would fail for a reason not the test's).
fn reachable_by_others(uid: u32, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in path.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).map_or(0, |m| m.permissions().mode());
        assert!(
            mode & 0o001 != 0,
            "prerequisite missing for this test: it runs the agent as user {uid}, who must reach {}, but {} (mode {:o}) lets no other user through. Fix: chmod o+x {}, or clone the project under a folder others may enter",
            path.display(),
            dir.display(),
            mode & 0o777,
            dir.display()
        );
    }
}

/// How [`ServedAgent::launch`] starts `run`.
#[derive(Default, Clone, Copy)]
pub struct Launch {
    /// Run as this user (and group) instead of the test's: root reads what nobody may.
    pub uid: Option<u32>,
    /// Return at once instead of waiting for the status API (an agent expected to exit).
    pub no_wait: bool,
}

impl ServedAgent {
    pub fn start(rig: &Rig, cfg: &Config, env: &[(&str, &str)]) -> ServedAgent {
        Self::launch(rig, cfg, env, Launch::default())
    }

    /// [`ServedAgent::start`], as `how` says. The configuration is written beside the rig's
    /// state (not `cfg.state_dir`, which a test may fill or take away).
    pub fn launch(rig: &Rig, cfg: &Config, env: &[(&str, &str)], how: Launch) -> ServedAgent {
        let mut cfg = cfg.clone();
        cfg.api.port = free_port();
        let config = rig.cfg.state_dir.join("config.toml");
        std::fs::write(&config, toml::to_string(&cfg).expect("config as TOML"))
            .expect("write config");
        let log = rig.cfg.state_dir.join("agent.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(agent_exe());
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .arg(&rig.root)
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(uid) = how.uid {
            use std::os::unix::process::CommandExt;
            reachable_by_others(uid, Path::new(env!("CARGO_MANIFEST_DIR")));
            reachable_by_others(uid, &agent_exe());
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().expect("start the agent");
        let addr = SocketAddr::from(([127, 0, 0, 1], cfg.api.port));
        let api = ApiClient::at(addr, Duration::from_secs(10)).expect("API client");
        let agent = ServedAgent {
            child,
            api,
            addr,
            config,
            log,
        };
        if !how.no_wait {
            agent.wait_for_api();
        }
        agent
    }

    pub fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    pub fn wait_for_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = Self::rt().block_on(self.api.status()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the agent's API never answered; log:\n{}", self.log_text());
    }

    pub fn status(&self) -> AgentStatus {
        Self::rt()
            .block_on(self.api.status())
            .expect("GET /status")
            .expect("the agent answers")
    }

    /// `None` once nothing listens.
    pub fn health(&self) -> Option<Health> {
        Self::rt().block_on(self.api.health()).ok().flatten()
    }

    pub fn metrics(&self) -> HashMap<String, f64> {
        let body = Self::rt().block_on(async {
            reqwest::Client::new()
                .get(format!("http://{}/metrics", self.addr))
                .send()
                .await
                .expect("GET /metrics")
                .text()
                .await
                .expect("body")
        });
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// `status --json`, the command a user types.
    pub fn status_command(&self) -> serde_json::Value {
        status_json(&self.config)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(mut self) -> ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(Duration::from_secs(30))
            .expect("the agent exits after SIGTERM")
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ServedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `limit`.
pub fn poll<T>(
    what: &str,
    limit: Duration,
    agent: &ServedAgent,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}; log:\n{}", agent.log_text());
}

/// A current-thread runtime for a blocking test's async calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
