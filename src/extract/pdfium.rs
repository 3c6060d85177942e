//! Binding the PDFium shared library, in one place.

use std::path::{Path, PathBuf};

use pdfium_render::prelude::Pdfium;

use crate::runtime_paths::{find_pdfium, NotFound};

#[derive(Debug, thiserror::Error)]
pub enum PdfiumLoadError {
    #[error("{0}")]
    NotFound(#[from] NotFound),
    #[error("the PDFium library at {path} could not be loaded: {message}. Fix: run `scripts/setup` to install a matching one, or point extract.pdfium_path at another")]
    Bind { path: PathBuf, message: String },
}

/// Finds and binds PDFium. The returned handle serialises calls (PDFium is not thread-safe).
pub fn load(configured: Option<&Path>) -> Result<(Pdfium, PathBuf), PdfiumLoadError> {
    let path = find_pdfium(configured)?;
    let bindings = Pdfium::bind_to_library(&path).map_err(|e| PdfiumLoadError::Bind {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((Pdfium::new(bindings), path))
}
