//! The embedded default: a `chroma run` server the agent starts, supervises and stops itself.
//!
//! Data lives under the agent's state directory, the server listens on loopback only on a free
//! port, and a supervisor thread restarts it if it dies. Every spawn happens on that thread so
//! that, on Linux, the parent-death signal (tied to the spawning thread) stops the server if the
//! agent is killed outright.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ManagedChromaError {
    #[error("{0}")]
    NotFound(#[from] crate::runtime_paths::NotFound),
    #[error("cannot create the Chroma data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {command}: {source}. Fix: run `scripts/setup`, or set chroma.command")]
    Spawn {
        command: PathBuf,
        source: std::io::Error,
    },
    #[error("the managed Chroma server did not answer its heartbeat within {waited:?} (see {log} for its output)")]
    NotReady { waited: Duration, log: PathBuf },
    #[error("no free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
}

/// How long one heartbeat may take.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a fresh server may take to answer its first heartbeat.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the supervisor checks that the server is alive.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// A running `chroma run` under our control. Dropping it stops the server.
pub struct ManagedChroma {
    port: u16,
    log_path: PathBuf,
    shared: Arc<Shared>,
    stop_tx: Option<mpsc::Sender<()>>,
    supervisor: Option<JoinHandle<()>>,
}

struct Shared {
    /// Times the server was (re)started, the first start included.
    starts: Mutex<u32>,
    pid: Mutex<Option<u32>>,
}

impl ManagedChroma {
    /// Starts `chroma run` with `data_dir` as its storage and waits for its heartbeat.
    /// `command` is the `chroma` executable (see [`crate::runtime_paths::find_chroma`]).
    pub fn start(command: &Path, data_dir: &Path) -> Result<ManagedChroma, ManagedChromaError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ManagedChromaError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        kill_stale(data_dir);
        let port = free_port().map_err(ManagedChromaError::Port)?;
        let log_path = data_dir.join("chroma-server.log");
        let shared = Arc::new(Shared {
            starts: Mutex::new(0),
            pid: Mutex::new(None),
        });
        let spec = Spec {
            command: command.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            port,
            log_path: log_path.clone(),
        };
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), ManagedChromaError>>();
        let thread_shared = shared.clone();
        let supervisor = std::thread::Builder::new()
            .name("chroma-supervisor".into())
            .spawn(move || supervise(spec, thread_shared, stop_rx, ready_tx))
            .map_err(|source| ManagedChromaError::Spawn {
                command: command.to_path_buf(),
                source,
            })?;
        let mut managed = ManagedChroma {
            port,
            log_path,
            shared,
            stop_tx: Some(stop_tx),
            supervisor: Some(supervisor),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(managed),
            Ok(Err(e)) => {
                managed.stop();
                Err(e)
            }
            Err(_) => {
                managed.stop();
                Err(ManagedChromaError::NotReady {
                    waited: Duration::ZERO,
                    log: managed.log_path.clone(),
                })
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id right now (changes when it is restarted).
    pub fn pid(&self) -> Option<u32> {
        *lock(&self.shared.pid)
    }

    /// How many times the server was started, the first start included.
    pub fn starts(&self) -> u32 {
        *lock(&self.shared.starts)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the server answers its heartbeat now.
    pub fn is_healthy(&self) -> bool {
        heartbeat(self.port)
    }

    /// Stops the server and its supervisor; waits for both.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.supervisor.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for ManagedChroma {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Spec {
    command: PathBuf,
    data_dir: PathBuf,
    port: u16,
    log_path: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("chroma-server.pid")
}

/// A server left behind by an agent that was killed (macOS has no parent-death signal).
fn kill_stale(data_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file(data_dir)) else {
        return;
    };
    if let Some(Ok(pid)) = text.split_whitespace().next().map(str::parse::<i32>) {
        // Only if it still looks like a chroma server: pids are reused.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_chroma = cmdline.is_empty() && cfg!(target_os = "macos")
            || String::from_utf8_lossy(&cmdline).contains("chroma");
        if pid > 0 && is_chroma {
            tracing::warn!(
                pid,
                "stopping a Chroma server left behind by an earlier agent"
            );
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let _ = std::fs::remove_file(pid_file(data_dir));
}

/// The URL of a managed server that another process (a running agent) started on `data_dir`
/// and that answers now.
pub fn running_server(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(pid_file(data_dir)).ok()?;
    let port: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    heartbeat(port).then(|| format!("http://127.0.0.1:{port}"))
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn spawn(spec: &Spec) -> Result<Child, ManagedChromaError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_path)
        .map_err(|source| ManagedChromaError::DataDir {
            path: spec.log_path.clone(),
            source,
        })?;
    let log_err = log
        .try_clone()
        .map_err(|source| ManagedChromaError::DataDir {
            path: spec.log_path.clone(),
            source,
        })?;
    let mut cmd = Command::new(&spec.command);
    cmd.arg("run")
        .arg("--path")
        .arg(&spec.data_dir)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(spec.port.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // No surprise network traffic from the server.
        .env("ANONYMIZED_TELEMETRY", "False");
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let child = cmd.spawn().map_err(|source| ManagedChromaError::Spawn {
        command: spec.command.clone(),
        source,
    })?;
    // "PID PORT": lets a later agent stop a left-over server, and other commands find a live one.
    let _ = std::fs::write(
        pid_file(&spec.data_dir),
        format!("{} {}", child.id(), spec.port),
    );
    Ok(child)
}

/// Polls the heartbeat until it answers, the child exits, or the timeout passes.
fn wait_ready(child: &mut Child, spec: &Spec) -> Result<(), ManagedChromaError> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if heartbeat(spec.port) {
            return Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(ManagedChromaError::NotReady {
        waited: started.elapsed(),
        log: spec.log_path.clone(),
    })
}

fn supervise(
    spec: Spec,
    shared: Arc<Shared>,
    stop_rx: mpsc::Receiver<()>,
    ready_tx: mpsc::Sender<Result<(), ManagedChromaError>>,
) {
    let start = |shared: &Shared| -> Result<Child, ManagedChromaError> {
        let mut child = spawn(&spec)?;
        *lock(&shared.pid) = Some(child.id());
        *lock(&shared.starts) += 1;
        if let Err(e) = wait_ready(&mut child, &spec) {
            terminate(&mut child);
            return Err(e);
        }
        Ok(child)
    };
    let mut child = match start(&shared) {
        Ok(c) => {
            let _ = ready_tx.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    tracing::info!(
        port = spec.port,
        pid = child.id(),
        "managed Chroma server is up"
    );
    let mut backoff = Duration::from_millis(500);
    loop {
        match stop_rx.recv_timeout(SUPERVISE_EVERY) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let exited = match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        };
        let Some(status) = exited else {
            backoff = Duration::from_millis(500);
            continue;
        };
        tracing::warn!(%status, log = %spec.log_path.display(), "managed Chroma server stopped; restarting it");
        // Restart on the same port so clients keep their URL.
        loop {
            match start(&shared) {
                Ok(c) => {
                    tracing::info!(pid = c.id(), "managed Chroma server restarted");
                    child = c;
                    break;
                }
                Err(e) => {
                    tracing::error!("restarting the managed Chroma server failed: {e}");
                    if stop_rx.recv_timeout(backoff).is_ok() {
                        let _ = std::fs::remove_file(pid_file(&spec.data_dir));
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    terminate(&mut child);
    let _ = std::fs::remove_file(pid_file(&spec.data_dir));
    *lock(&shared.pid) = None;
}

/// SIGTERM, a few seconds' grace, then SIGKILL.
fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether the server on this loopback port answers its heartbeat (the client's, with no token:
/// the managed server has no auth). Blocking, inside or outside an async runtime.
pub fn heartbeat(port: u16) -> bool {
    super::client::probe_blocking(&format!("http://127.0.0.1:{port}"), None, HEARTBEAT_TIMEOUT)
        .is_ok()
}
