//! Binding the PDFium shared library, in one place.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pdfium_render::prelude::Pdfium;

use crate::runtime_paths::{find_pdfium, NotFound};

#[derive(Debug, thiserror::Error)]
pub enum PdfiumLoadError {
    #[error("{0}")]
    NotFound(#[from] NotFound),
    #[error("the PDFium library at {path} could not be loaded: {message}. Fix: run `scripts/setup` to install a matching one, or point extract.pdfium_path at another")]
    Bind { path: PathBuf, message: String },
}

/// The library this process bound: pdfium-render binds one PDFium per process, for good.
static BOUND: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Finds and binds PDFium. The returned handle serialises calls (PDFium is not thread-safe).
/// Loading the same library again in one process shares the first binding.
pub fn load(configured: Option<&Path>) -> Result<(Pdfium, PathBuf), PdfiumLoadError> {
    let path = find_pdfium(configured)?;
    let mut bound = BOUND
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(first) = bound.as_ref() {
        if *first == path {
            // `default()` reuses the existing binding when there is one, as there is here.
            return Ok((Pdfium::default(), path));
        }
        return Err(PdfiumLoadError::Bind {
            message: format!(
                "this process already uses the PDFium library at {}, and one process can bind only one",
                first.display()
            ),
            path,
        });
    }
    let bindings = Pdfium::bind_to_library(&path).map_err(|e| PdfiumLoadError::Bind {
        path: path.clone(),
        message: e.to_string(),
    })?;
    *bound = Some(path.clone());
    Ok((Pdfium::new(bindings), path))
}
