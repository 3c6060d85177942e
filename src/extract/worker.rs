//! The isolated renderer child (`docusearch-agent extract-worker`): reads one request on stdin,
//! streams the document's frames on stdout, and exits. Anything that goes wrong in here (a
//! crash in PDFium, an endless loop, running out of its memory bound) ends only this process.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use super::protocol::{self, Emit, WorkKind, WorkRequest, WorkerFailure};
use super::{DocumentInfo, Page, TEST_FAULT_ENV};

/// Exit status for a request the worker could not even read (the parent's bug, not the file's).
const EXIT_BAD_REQUEST: u8 = 3;

/// Entry point of the isolated renderer child (`docusearch-agent extract-worker`).
pub fn worker_main() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("extract-worker: could not read the request on stdin: {e}");
        return ExitCode::from(EXIT_BAD_REQUEST);
    }
    let req: WorkRequest = match serde_json::from_str(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("extract-worker: malformed request (this process is started by the agent, not by hand): {e}");
            return ExitCode::from(EXIT_BAD_REQUEST);
        }
    };
    let pipe = match protocol_pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("extract-worker: could not set up its output: {e}");
            return ExitCode::from(EXIT_BAD_REQUEST);
        }
    };
    let mut out = Frames {
        out: BufWriter::with_capacity(1 << 20, pipe),
        fault: TestFault::from_env(&req.source),
    };
    let result = run(&req, &mut out);
    let written = match &result {
        Ok(()) => protocol::write_done(&mut out.out),
        Err(f) => protocol::write_failure(&mut out.out, f),
    };
    match (result, written) {
        (_, Err(_)) => ExitCode::FAILURE, // the agent stopped listening; nothing more to say
        _ => ExitCode::SUCCESS,
    }
}

fn run(req: &WorkRequest, out: &mut Frames) -> Result<(), WorkerFailure> {
    let notes = req.notes.clone();
    match req.kind {
        WorkKind::Pdf => {
            let (pdfium, _) =
                super::pdfium::load(Some(&req.pdfium_path)).map_err(|e| WorkerFailure::Setup {
                    detail: e.to_string(),
                })?;
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
            super::pdf::extract(&pdfium, job, out)
        }
        WorkKind::Image => {
            super::images::extract(&req.source, req.image_size, req.keep_aspect, notes, out)
        }
        WorkKind::OfficeText => super::office::extract_text(&req.source, req.format, notes, out),
        WorkKind::Text => super::text::extract(&req.source, req.format, notes, out),
    }
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
