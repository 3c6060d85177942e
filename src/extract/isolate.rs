//! The parent side of isolation: start a worker under an address-space bound, feed it a
//! request, pass its pages on as they arrive, and stop it when its time is up. A crash or a
//! hang costs one file, never the agent.
//!
//! A worker that finished a document cleanly is kept for the next one (starting one costs
//! about a page's rendering: a process, the dynamic loader, PDFium's setup). One that crashed,
//! hung, broke the protocol or was stopped is never reused. A reused worker carries what its
//! earlier documents left in its address space, so when it dies on a file, the file gets one
//! more try in a fresh worker before it is blamed: a file fails exactly when it would fail in
//! a worker of its own.

use std::io::{BufReader, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::protocol::{self, Frame, WorkRequest, WorkerFailure};
use super::worker::IDLE_EXIT;
use super::{DocumentInfo, ExtractError, ExtractEvent, ExtractOptions};

/// Kept from the worker's stderr for the error message.
const STDERR_TAIL: usize = 2048;
const POLL: Duration = Duration::from_millis(10);
/// How long a worker whose output ended may take to exit by itself.
const EXIT_GRACE: Duration = Duration::from_secs(3);
/// A worker idle for longer is not reused: it is about to end itself (at [`IDLE_EXIT`]).
const REUSE_WITHIN: Duration = Duration::from_secs(IDLE_EXIT.as_secs() / 2);
/// Documents one worker renders before it is replaced, so slow leaks and heap fragmentation
/// in PDFium stay bounded.
const MAX_DOCUMENTS_PER_WORKER: u32 = 200;
/// Idle workers kept (the pipeline uses one; a thumbnail request may run beside it).
const MAX_IDLE: usize = 2;

enum Clock {
    Pause,
    Resume,
}

enum Outcome {
    Done,
    Failed(WorkerFailure),
    /// Output ended or broke off without a final frame: the worker died (or was killed).
    Ended(Option<String>),
    Stopped,
}

/// Workers kept between documents, shared by an extractor and its clones.
#[derive(Default)]
pub(crate) struct WorkerPool {
    idle: Mutex<Vec<Worker>>,
    started: AtomicU64,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |v| v.len());
        f.debug_struct("WorkerPool")
            .field("idle", &idle)
            .field("started", &self.started.load(Ordering::Relaxed))
            .finish()
    }
}

impl WorkerPool {
    /// Workers started so far (each document does not need its own).
    pub(crate) fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// A kept worker still fit for a document, if there is one.
    fn take(&self) -> Option<Worker> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut w) = idle.pop() {
            if w.idle_since.elapsed() < REUSE_WITHIN && w.is_running() {
                return Some(w);
            }
            w.end();
        }
        None
    }

    fn keep(&self, mut worker: Worker) {
        if worker.documents >= MAX_DOCUMENTS_PER_WORKER {
            worker.end();
            return;
        }
        worker.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(worker);
        } else {
            drop(idle);
            worker.end();
        }
    }
}

/// One running `extract-worker` process and its pipes.
struct Worker {
    child: Arc<Mutex<Child>>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The last words on its stderr, read by a thread of its own.
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    /// Documents it has finished.
    documents: u32,
    idle_since: Instant,
}

impl Worker {
    fn start(
        opts: &ExtractOptions,
        path: &Path,
        pool: &WorkerPool,
    ) -> Result<Worker, ExtractError> {
        let mut cmd = Command::new(&opts.worker_exe);
        cmd.arg("extract-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(
                opts.worker_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
        confine(&mut cmd, opts.worker_memory_mb);
        let start_failed = |detail: String| ExtractError::WorkerStart {
            path: path.to_path_buf(),
            exe: opts.worker_exe.clone(),
            detail,
        };
        let mut child = cmd.spawn().map_err(|e| start_failed(e.to_string()))?;
        pool.started.fetch_add(1, Ordering::Relaxed);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(start_failed("its pipes were not set up".into()));
        };
        widen_pipe(&stdout);
        let tail = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = {
            let tail = tail.clone();
            thread::spawn(move || read_tail(stderr, &tail))
        };
        Ok(Worker {
            child: Arc::new(Mutex::new(child)),
            stdin,
            stdout: BufReader::with_capacity(1 << 20, stdout),
            stderr: tail,
            stderr_reader: Some(stderr_reader),
            documents: 0,
            idle_since: Instant::now(),
        })
    }

    fn is_running(&self) -> bool {
        self.child
            .lock()
            .is_ok_and(|mut c| matches!(c.try_wait(), Ok(None)))
    }

    /// The end of what it said on stderr during this document; call once it has ended, so
    /// its last words are in.
    fn stderr_tail(&mut self) -> String {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let start = tail.len().saturating_sub(STDERR_TAIL);
        String::from_utf8_lossy(&tail[start..]).trim().to_string()
    }

    /// Kills it (harmless if already gone) and reaps it.
    fn end(&mut self) -> Option<ExitStatus> {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
        }
        wait(&self.child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // An idle worker ends by itself once its input closes; killing it is just quicker.
        self.end();
    }
}

/// Room in the page pipe for a whole page frame (a 448×448 page is 602 KB; Linux's default
/// pipe holds 64 KB): the worker writes a page in one go and goes on rendering while the agent
/// is busy, instead of waiting for the agent to be scheduled ten times a page. Best effort: a
/// system that refuses (a lower `/proc/sys/fs/pipe-max-size`) keeps the default.
#[cfg(target_os = "linux")]
fn widen_pipe(stdout: &ChildStdout) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a pipe descriptor this process owns; no memory is passed.
    unsafe {
        libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

#[cfg(not(target_os = "linux"))]
fn widen_pipe(_stdout: &ChildStdout) {}

/// Where a document stands across tries: what reached the sink already is not sent again.
struct Delivered {
    info: Option<DocumentInfo>,
    /// The next page the sink expects (1-based).
    next_page: u32,
    sent: u32,
}

/// Runs one document through a worker, kept from an earlier document or fresh. `path` is the
/// user's file (for messages); the request may point at a converted copy.
pub(crate) fn run_worker(
    opts: &ExtractOptions,
    pool: &WorkerPool,
    path: &Path,
    request: &WorkRequest,
    sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
) -> Result<DocumentInfo, ExtractError> {
    let mut delivered = Delivered {
        info: None,
        // A thumbnail request asks for one page alone.
        next_page: request.only_page.unwrap_or(1),
        sent: 0,
    };
    let (mut worker, mut reused) = match pool.take() {
        Some(w) => (w, true),
        None => (Worker::start(opts, path, pool)?, false),
    };
    loop {
        let (outcome, timed_out) = run_document(opts, &mut worker, request, &mut delivered, sink);
        match outcome {
            Outcome::Done => match check_done(request, &delivered) {
                Ok(info) => {
                    if !timed_out {
                        worker.documents += 1;
                        pool.keep(worker);
                    }
                    return Ok(info);
                }
                Err(what) => {
                    // Talking nonsense: it must not run on.
                    worker.end();
                    return Err(crashed(path, &what, &worker.stderr_tail()));
                }
            },
            Outcome::Failed(f) => {
                // It understood the file and said why it fails: it is as fit as after a success.
                if !timed_out {
                    worker.documents += 1;
                    pool.keep(worker);
                }
                return Err(from_failure(path, f, opts.max_pages));
            }
            Outcome::Stopped => {
                worker.end();
                return Err(ExtractError::Stopped {
                    path: path.to_path_buf(),
                });
            }
            Outcome::Ended(broken) => {
                if broken.is_none() {
                    // Its output ended: it may still be on its way out (a panic unwinds and
                    // frees first). Its own exit status and last words say why, so it gets a
                    // moment before the kill.
                    let deadline = Instant::now() + EXIT_GRACE;
                    while Instant::now() < deadline && worker.is_running() {
                        thread::sleep(POLL);
                    }
                }
                let status = worker.end();
                let stderr = worker.stderr_tail();
                if reused && !timed_out {
                    tracing::debug!(
                        file = %path.display(),
                        "a reused renderer ended on this file; trying it in a fresh one"
                    );
                    worker = Worker::start(opts, path, pool)?;
                    reused = false;
                    continue;
                }
                return Err(ended(opts, path, status, broken, stderr, timed_out));
            }
        }
    }
}

/// A document the worker called done: every page it announced must have arrived.
fn check_done(request: &WorkRequest, d: &Delivered) -> Result<DocumentInfo, String> {
    let info = d
        .info
        .clone()
        .ok_or_else(|| "finished without describing the document".to_string())?;
    let expected = match request.only_page {
        Some(n) => u32::from(n <= info.num_pages),
        None => info.num_pages,
    };
    if d.sent != expected {
        return Err(format!("sent {} of {expected} pages", d.sent));
    }
    Ok(info)
}

/// One try of one document on `worker`: sends the request, passes the frames on, and says how
/// it ended and whether the watchdog stopped it.
fn run_document(
    opts: &ExtractOptions,
    worker: &mut Worker,
    request: &WorkRequest,
    delivered: &mut Delivered,
    sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
) -> (Outcome, bool) {
    worker
        .stderr
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    let timed_out = Arc::new(AtomicBool::new(false));
    let (clock, ticks) = mpsc::channel();
    let watchdog = {
        let (child, timed_out, budget) =
            (worker.child.clone(), timed_out.clone(), opts.render_timeout);
        thread::spawn(move || watch(ticks, budget, &child, &timed_out))
    };

    // One line each (JSON has no raw line breaks). A worker that died at once closed its
    // stdin; its exit status and what it said on stderr tell why.
    let sent = serde_json::to_vec(request)
        .map_err(std::io::Error::other)
        .and_then(|mut json| {
            json.push(b'\n');
            worker.stdin.write_all(&json)?;
            worker.stdin.flush()
        });
    let _ = sent;

    let mut deliver = |event: ExtractEvent| {
        // Time spent downstream (embedding) is not the renderer's.
        let _ = clock.send(Clock::Pause);
        let flow = sink(event);
        let _ = clock.send(Clock::Resume);
        flow
    };
    // This try's own place in the document; an earlier try may have delivered its start.
    let mut described = false;
    let mut next_page = request.only_page.unwrap_or(1);
    let outcome = loop {
        match protocol::read_frame(&mut worker.stdout) {
            Ok(Some(Frame::Info(i))) if !described => {
                described = true;
                if delivered.info.is_none() {
                    delivered.info = Some(i.clone());
                    if deliver(ExtractEvent::Info(i)).is_break() {
                        break Outcome::Stopped;
                    }
                }
            }
            Ok(Some(Frame::Page(p))) if described && p.number == next_page => {
                next_page += 1;
                if p.number < delivered.next_page {
                    continue; // the sink has it from the earlier try
                }
                delivered.next_page += 1;
                delivered.sent += 1;
                if deliver(ExtractEvent::Page(p)).is_break() {
                    break Outcome::Stopped;
                }
            }
            Ok(Some(Frame::Info(_) | Frame::Page(_))) => {
                break Outcome::Ended(Some("frames out of order".into()));
            }
            Ok(Some(Frame::Done)) => break Outcome::Done,
            Ok(Some(Frame::Failed(f))) => break Outcome::Failed(f),
            Ok(None) => break Outcome::Ended(None),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Outcome::Ended(None),
            Err(e) => break Outcome::Ended(Some(e.to_string())),
        }
    };
    drop(clock);
    let _ = watchdog.join();
    (outcome, timed_out.load(Ordering::SeqCst))
}

/// Why a worker whose output ended (it died, or was killed) failed its file.
fn ended(
    opts: &ExtractOptions,
    path: &Path,
    status: Option<ExitStatus>,
    broken: Option<String>,
    stderr: String,
    timed_out: bool,
) -> ExtractError {
    let file = path.to_path_buf();
    if timed_out {
        return ExtractError::Timeout {
            path: file,
            seconds: opts.render_timeout.as_secs_f64().ceil() as u64,
        };
    }
    let status_code = status;
    let status = match (status, broken) {
        (_, Some(protocol_error)) => format!("garbled output: {protocol_error}"),
        (Some(s), None) => describe_status(s),
        (None, None) => "exit status unknown".into(),
    };
    let lower = stderr.to_ascii_lowercase();
    // Rust's allocator, `try_reserve` callers (the image crate) and C++ (PDFium) say it each
    // their own way.
    const OUT_OF_MEMORY: [&str; 5] = [
        "memory allocation of",
        "out of memory",
        "allocerror",
        "cannot allocate memory",
        "bad_alloc",
    ];
    if opts.worker_memory_mb > 0 && OUT_OF_MEMORY.iter().any(|m| lower.contains(m)) {
        return ExtractError::OutOfMemory {
            path: file,
            limit_mb: opts.worker_memory_mb,
        };
    }
    // PDFium's allocator aborts on a failed allocation without a word: a silent abort under a
    // memory bound is most often that bound.
    let status = match (status_signal(status_code), opts.worker_memory_mb) {
        (Some(_), mb) if mb > 0 && stderr.is_empty() => format!(
            "{status}; it said nothing, which is most often its {mb} MiB memory bound running out: raise extract.worker_memory_mb if such files matter"
        ),
        _ => status,
    };
    ExtractError::Crashed {
        path: file,
        status,
        stderr,
    }
}

fn crashed(path: &Path, what: &str, stderr: &str) -> ExtractError {
    ExtractError::Crashed {
        path: path.to_path_buf(),
        status: what.to_string(),
        stderr: stderr.to_string(),
    }
}

fn from_failure(path: &Path, f: WorkerFailure, max_pages: u32) -> ExtractError {
    let path = path.to_path_buf();
    match f {
        WorkerFailure::Encrypted => ExtractError::Encrypted { path },
        WorkerFailure::Corrupt { format, detail } => ExtractError::Corrupt {
            path,
            format,
            detail,
        },
        WorkerFailure::TooManyPages { pages } => ExtractError::TooManyPages {
            path,
            pages,
            limit: max_pages,
        },
        WorkerFailure::Unreadable { detail } => ExtractError::Unreadable {
            path,
            source: std::io::Error::other(detail),
        },
        WorkerFailure::Setup { detail } => ExtractError::Setup { path, detail },
        WorkerFailure::Unsupported { detail } => ExtractError::Unsupported { path, detail },
    }
}

/// Stops the worker when it has used up its time; time paused while the sink runs is not
/// counted. Ends when the parent hangs up.
fn watch(
    ticks: mpsc::Receiver<Clock>,
    budget: Duration,
    child: &Mutex<Child>,
    timed_out: &AtomicBool,
) {
    let mut left = budget;
    let mut running = true;
    loop {
        let started = Instant::now();
        let tick = if running {
            ticks.recv_timeout(left)
        } else {
            ticks.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        match tick {
            Ok(Clock::Pause) => {
                left = left.saturating_sub(started.elapsed());
                running = false;
            }
            Ok(Clock::Resume) => running = true,
            Err(RecvTimeoutError::Timeout) => {
                timed_out.store(true, Ordering::SeqCst);
                if let Ok(mut c) = child.lock() {
                    let _ = c.kill();
                }
                return;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Reaps the worker without holding the lock, so the watchdog can still kill it meanwhile.
fn wait(child: &Mutex<Child>) -> Option<ExitStatus> {
    loop {
        match child.lock().ok()?.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => thread::sleep(POLL),
            Err(_) => return None,
        }
    }
}

fn read_tail(mut stderr: impl Read, tail: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            let cut = tail.len() - STDERR_TAIL;
            tail.drain(..cut);
        }
    }
}

/// The signal that ended the worker, if one did.
fn status_signal(status: Option<ExitStatus>) -> Option<i32> {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.and_then(|s| s.signal())
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        None
    }
}

fn describe_status(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            return format!("killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

/// Own process group (a Ctrl-C meant for the agent is handled by the agent, which then stops
/// its worker), an address-space bound, and on Linux death with the parent.
#[cfg(unix)]
fn confine(cmd: &mut Command, memory_mb: u64) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let bytes = memory_mb.saturating_mul(1024 * 1024);
    // SAFETY: only async-signal-safe calls (setrlimit, prctl, nice) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Rendering is bulk work: it yields the CPU (crate::priority says why).
            crate::priority::lower_child_before_exec();
            if bytes > 0 {
                let limit = libc::rlimit {
                    rlim_cur: bytes as libc::rlim_t,
                    rlim_max: bytes as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn confine(_cmd: &mut Command, _memory_mb: u64) {}

/// Why [`run_with_timeout`] gave up.
pub(crate) enum TimedRun {
    Spawn(std::io::Error),
    Timeout,
}

/// Runs a helper program (LibreOffice) in its own process group and kills the whole group if
/// it takes longer than `timeout` (soffice starts children of its own).
pub(crate) fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
) -> Result<ExitStatus, TimedRun> {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(TimedRun::Spawn)?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                // Not reaped yet, so the group id is still ours.
                #[cfg(unix)]
                // SAFETY: kill(2) on the process group this function created.
                unsafe {
                    libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(TimedRun::Timeout);
            }
        }
    }
}

/// A fresh private folder under the system temporary directory.
pub(crate) fn private_temp_dir() -> std::io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "docusearch-extract-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(&dir)?;
    Ok(dir)
}
