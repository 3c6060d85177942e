//! The parent side of isolation: start the worker under an address-space bound, feed it the
//! request, pass its pages on as they arrive, and stop it when its time is up. A crash or a
//! hang costs one file, never the agent.

use std::io::{BufReader, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::protocol::{self, Frame, WorkRequest, WorkerFailure};
use super::{DocumentInfo, ExtractError, ExtractEvent, ExtractOptions};

/// Kept from the worker's stderr for the error message.
const STDERR_TAIL: usize = 2048;
const POLL: Duration = Duration::from_millis(10);
/// How long a worker whose output ended may take to exit by itself.
const EXIT_GRACE: Duration = Duration::from_secs(3);

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

/// Runs one document through a fresh worker. `path` is the user's file (for messages); the
/// request may point at a converted copy.
pub(crate) fn run_worker(
    opts: &ExtractOptions,
    path: &Path,
    request: &WorkRequest,
    sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
) -> Result<DocumentInfo, ExtractError> {
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
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(start_failed("its pipes were not set up".into()));
    };
    let child = Arc::new(Mutex::new(child));

    let stderr_tail = thread::spawn(move || read_tail(stderr));
    let timed_out = Arc::new(AtomicBool::new(false));
    let (clock, ticks) = mpsc::channel();
    let watchdog = {
        let (child, timed_out, budget) = (child.clone(), timed_out.clone(), opts.render_timeout);
        thread::spawn(move || watch(ticks, budget, &child, &timed_out))
    };

    // A worker that dies at once closes its stdin; what it says on stderr tells why.
    let json = serde_json::to_vec(request).map_err(|e| start_failed(e.to_string()))?;
    let _ = stdin.write_all(&json);
    drop(stdin);

    let mut reader = BufReader::with_capacity(1 << 20, stdout);
    let mut info: Option<DocumentInfo> = None;
    // A thumbnail request asks for one page alone.
    let mut next_page = request.only_page.unwrap_or(1);
    let mut sent = 0u32;
    let mut deliver = |event: ExtractEvent| {
        // Time spent downstream (embedding) is not the renderer's.
        let _ = clock.send(Clock::Pause);
        let flow = sink(event);
        let _ = clock.send(Clock::Resume);
        flow
    };
    let outcome = loop {
        match protocol::read_frame(&mut reader) {
            Ok(Some(Frame::Info(i))) if info.is_none() => {
                info = Some(i.clone());
                if deliver(ExtractEvent::Info(i)).is_break() {
                    break Outcome::Stopped;
                }
            }
            Ok(Some(Frame::Page(p))) if info.is_some() && p.number == next_page => {
                next_page += 1;
                sent += 1;
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
    if matches!(outcome, Outcome::Ended(None)) {
        // Its output ended: it may still be on its way out (a panic unwinds and frees first).
        // Its own exit status and last words say why, so it gets a moment before the kill.
        let deadline = Instant::now() + EXIT_GRACE;
        while Instant::now() < deadline
            && child
                .lock()
                .is_ok_and(|mut c| matches!(c.try_wait(), Ok(None)))
        {
            thread::sleep(POLL);
        }
    }
    if !matches!(outcome, Outcome::Done | Outcome::Failed(_)) {
        // Stopped by us or talking nonsense: it must not run on. (Harmless if already gone.)
        if let Ok(mut c) = child.lock() {
            let _ = c.kill();
        }
    }
    drop(reader);
    let status = wait(&child);
    drop(clock);
    let _ = watchdog.join();
    let stderr = stderr_tail.join().unwrap_or_default();
    let timed_out = timed_out.load(Ordering::SeqCst);

    let file = path.to_path_buf();
    match outcome {
        Outcome::Stopped => Err(ExtractError::Stopped { path: file }),
        Outcome::Done => {
            let info = info.ok_or_else(|| {
                crashed(path, "finished without describing the document", &stderr)
            })?;
            let expected = match request.only_page {
                Some(n) => u32::from(n <= info.num_pages),
                None => info.num_pages,
            };
            if sent != expected {
                return Err(crashed(
                    path,
                    &format!("sent {sent} of {expected} pages"),
                    &stderr,
                ));
            }
            Ok(info)
        }
        Outcome::Failed(f) => Err(from_failure(path, f, opts.max_pages)),
        Outcome::Ended(_) if timed_out => Err(ExtractError::Timeout {
            path: file,
            seconds: opts.render_timeout.as_secs_f64().ceil() as u64,
        }),
        Outcome::Ended(broken) => {
            let status_code = status;
            let status = match (status, broken) {
                (_, Some(protocol_error)) => format!("garbled output: {protocol_error}"),
                (Some(s), None) => describe_status(s),
                (None, None) => "exit status unknown".into(),
            };
            let lower = stderr.to_ascii_lowercase();
            // Rust's allocator, `try_reserve` callers (the image crate) and C++ (PDFium) say
            // it each their own way.
            const OUT_OF_MEMORY: [&str; 5] = [
                "memory allocation of",
                "out of memory",
                "allocerror",
                "cannot allocate memory",
                "bad_alloc",
            ];
            if opts.worker_memory_mb > 0 && OUT_OF_MEMORY.iter().any(|m| lower.contains(m)) {
                return Err(ExtractError::OutOfMemory {
                    path: file,
                    limit_mb: opts.worker_memory_mb,
                });
            }
            // PDFium's allocator aborts on a failed allocation without a word: a silent
            // abort under a memory bound is most often that bound.
            let status = match (status_signal(status_code), opts.worker_memory_mb) {
                (Some(_), mb) if mb > 0 && stderr.is_empty() => format!(
                    "{status_text}; it said nothing, which is most often its {mb} MiB memory bound running out: raise extract.worker_memory_mb if such files matter",
                    status_text = status
                ),
                _ => status,
            };
            Err(ExtractError::Crashed {
                path: file,
                status,
                stderr,
            })
        }
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

fn read_tail(mut stderr: impl Read) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf) {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
    let start = tail.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&tail[start..]).trim().to_string()
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
    // SAFETY: only async-signal-safe calls (setrlimit, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
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
