//! The isolated renderer child (`docusearch-agent extract-worker`): reads requests on stdin, one
//! JSON object a line, answers each with the document's frames on stdout, and waits for the
//! next. It exits at the end of its input or after [`IDLE_EXIT`] without a request. Anything
//! that goes wrong in here (a crash in PDFium, an endless loop, running out of its memory
//! bound) ends only this process; the agent then fails that one file and starts another.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use pdfium_render::prelude::Pdfium;

use super::protocol::{self, Emit, WorkKind, WorkRequest, WorkerFailure};
use super::{DocumentInfo, Page, TEST_FAULT_ENV};

/// Exit status for a request the worker could not even read (the parent's bug, not the file's).
const EXIT_BAD_REQUEST: u8 = 3;

/// An idle worker ends itself after this long, so an agent with nothing to do holds no
/// renderer's memory. The parent reuses only workers idle for less (see `isolate`).
pub(crate) const IDLE_EXIT: Duration = Duration::from_secs(60);

/// Entry point of the isolated renderer child (`docusearch-agent extract-worker`).
pub fn worker_main() -> ExitCode {
    let (input, pipe) = match (stdin_file(), protocol_pipe()) {
        (Ok(i), Ok(p)) => (i, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("extract-worker: could not set up its input and output: {e}");
            return ExitCode::from(EXIT_BAD_REQUEST);
        }
    };
    let mut input = BufReader::new(input);
    let mut out = Frames {
        out: BufWriter::with_capacity(1 << 20, pipe),
        fault: None,
    };
    // Bound once, for every document this worker renders.
    let mut pdfium: Option<Pdfium> = None;
    let mut line = String::new();
    loop {
        if input.buffer().is_empty() && !request_arrives(IDLE_EXIT) {
            return ExitCode::SUCCESS;
        }
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => return ExitCode::SUCCESS, // the agent hung up: nothing more to do
            Ok(_) => {}
            Err(e) => {
                eprintln!("extract-worker: could not read the request on stdin: {e}");
                return ExitCode::from(EXIT_BAD_REQUEST);
            }
        }
        let req: WorkRequest = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("extract-worker: malformed request (this process is started by the agent, not by hand): {e}");
                return ExitCode::from(EXIT_BAD_REQUEST);
            }
        };
        out.fault = TestFault::from_env(&req.source);
        let result = run(&req, &mut pdfium, &mut out);
        let written = match &result {
            Ok(()) => protocol::write_done(&mut out.out),
            Err(f) => protocol::write_failure(&mut out.out, f),
        };
        if written.is_err() {
            return ExitCode::FAILURE; // the agent stopped listening; nothing more to say
        }
    }
}

fn run(
    req: &WorkRequest,
    pdfium: &mut Option<Pdfium>,
    out: &mut Frames,
) -> Result<(), WorkerFailure> {
    let notes = req.notes.clone();
    match req.kind {
        WorkKind::Pdf => {
            let pdfium = match pdfium {
                Some(p) => p,
                None => pdfium.insert(
                    super::pdfium::load(Some(&req.pdfium_path))
                        .map_err(|e| WorkerFailure::Setup {
                            detail: e.to_string(),
                        })?
                        .0,
                ),
            };
            let job = super::pdf::PdfJob {
                path: &req.source,
                format: req.format,
                render_dpi: req.render_dpi,
                image_size: req.image_size,
                max_pages: req.max_pages,
                notes,
                only_page: req.only_page,
                keep_aspect: req.keep_aspect,
            };
            super::pdf::extract(pdfium, job, out)
        }
        WorkKind::Image => {
            super::images::extract(&req.source, req.image_size, req.keep_aspect, notes, out)
        }
        WorkKind::OfficeText => super::office::extract_text(&req.source, req.format, notes, out),
        WorkKind::Text => super::text::extract(&req.source, req.format, notes, out),
    }
}

/// Stdin as a plain file: a buffer of our own can say whether a request is already waiting.
#[cfg(unix)]
fn stdin_file() -> std::io::Result<File> {
    use std::os::fd::AsFd;
    Ok(File::from(std::io::stdin().as_fd().try_clone_to_owned()?))
}

#[cfg(not(unix))]
fn stdin_file() -> std::io::Result<File> {
    Err(std::io::Error::other(
        "the isolated renderer needs a Unix system",
    ))
}

/// Whether stdin becomes readable (a request, or the agent hanging up) within `wait`.
#[cfg(unix)]
fn request_arrives(wait: Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd on fd 0, which this process owns.
        let n = unsafe { libc::poll(&mut fds, 1, ms) };
        if n >= 0 {
            return n > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true; // let the read itself report what is wrong
        }
    }
}

#[cfg(not(unix))]
fn request_arrives(_wait: Duration) -> bool {
    true
}

/// The protocol gets the original stdout to itself; fd 1 then points at stderr, so a library
/// that prints cannot corrupt the frames.
#[cfg(unix)]
fn protocol_pipe() -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain descriptor calls on fds 1 and 2, which this process owns; the new fd is
    // owned by the returned File alone.
    unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(File::from_raw_fd(fd))
    }
}

#[cfg(not(unix))]
fn protocol_pipe() -> std::io::Result<File> {
    Err(std::io::Error::other(
        "the isolated renderer needs a Unix system",
    ))
}

/// Frames on the protocol pipe, flushed per frame so pages stream.
struct Frames {
    out: BufWriter<File>,
    fault: Option<TestFault>,
}

fn pipe_closed(e: std::io::Error) -> WorkerFailure {
    WorkerFailure::Unreadable {
        detail: format!("the agent stopped reading: {e}"),
    }
}

impl Emit for Frames {
    fn info(&mut self, info: &DocumentInfo) -> Result<(), WorkerFailure> {
        protocol::write_info(&mut self.out, info).map_err(pipe_closed)
    }

    fn page(&mut self, page: &Page) -> Result<(), WorkerFailure> {
        protocol::write_page(&mut self.out, page).map_err(pipe_closed)?;
        if let Some(fault) = self.fault {
            // After a page went out, so the parent sees a failure mid-document.
            let _ = self.out.flush();
            fault.trigger();
        }
        Ok(())
    }
}

/// Test hook (see [`TEST_FAULT_ENV`]): makes the worker die or hang on one named file, so tests
/// exercise the parent's real crash and timeout handling.
#[derive(Debug, Clone, Copy)]
enum TestFault {
    Crash,
    Hang,
}

impl TestFault {
    fn from_env(source: &Path) -> Option<TestFault> {
        let spec = std::env::var(TEST_FAULT_ENV).ok()?;
        let (kind, name) = spec.split_once(':')?;
        if source.file_name()?.to_str()? != name {
            return None;
        }
        match kind {
            "crash" => Some(TestFault::Crash),
            "hang" => Some(TestFault::Hang),
            _ => None,
        }
    }

    fn trigger(self) {
        match self {
            TestFault::Crash => {
                eprintln!("extract-worker: {TEST_FAULT_ENV} asked for a crash");
                std::process::abort();
            }
            TestFault::Hang => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
        }
    }
}
