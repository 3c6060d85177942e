//! Extraction: every supported file becomes page images, page text and text chunks. Issue 4.

pub mod pdfium;

use std::process::ExitCode;

/// Entry point of the isolated renderer child (`docusearch-agent extract-worker`).
pub fn worker_main() -> ExitCode {
    eprintln!("extract-worker: not implemented yet (issue 4)");
    ExitCode::from(crate::cli::EXIT_NOT_IMPLEMENTED)
}
