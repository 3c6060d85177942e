//! Extraction: every supported file becomes page images, page text and text chunks. Issue 4.
//!
//! The parent side (this module) checks what it can without parsing (size, magic bytes, the
//! PDF end marker), converts office files with LibreOffice when it is installed, then hands the
//! document to an isolated child process (`docusearch-agent extract-worker`, see `worker`;
//! kept for the next document when it finishes cleanly, see `isolate`) under a time limit and
//! an address-space bound. The child renders with PDFium (or decodes the image,
//! or reads the text) and streams pages back over a framed pipe (`protocol`), so a hostile file
//! can crash or hang only its own child, and a long PDF never sits in memory as a whole.

mod chunk;
mod images;
mod isolate;
mod office;
mod pdf;
pub mod pdfium;
mod protocol;
mod sniff;
mod text;
mod worker;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ExtractConfig;
use crate::types::DocFormat;

pub use chunk::{chunk_page, TextChunk};
pub use office::find_soffice;
pub use worker::worker_main;

/// Environment variable honoured by the worker only to let tests inject a renderer crash or hang
/// at a known point (`crash:<file name>` or `hang:<file name>`). It exercises the parent's real
/// crash and timeout handling; nothing sets it outside tests.
pub const TEST_FAULT_ENV: &str = "DOCUSEARCH_TEST_WORKER_FAULT";

/// What extraction needs, taken from the validated configuration.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub render_dpi: u32,
    /// Words per text chunk.
    pub chunk_size: usize,
    /// Words shared by consecutive chunks.
    pub chunk_overlap: usize,
    /// Longest text kept per chunk, in characters.
    pub max_chunk_chars: usize,
    /// Files above this size are refused.
    pub max_file_bytes: u64,
    /// Documents with more pages are refused.
    pub max_pages: u32,
    /// Worker time allowed per document (time spent downstream in the sink is not counted).
    pub render_timeout: Duration,
    /// Address-space bound for the worker in MiB (0 = none).
    pub worker_memory_mb: u64,
    pub pdfium_path: Option<PathBuf>,
    pub libreoffice: Option<PathBuf>,
    /// The model's square input size: page images come out `image_size`×`image_size`.
    pub image_size: u32,
    /// The `docusearch-agent` executable that runs `extract-worker`.
    pub worker_exe: PathBuf,
    /// Extra environment for the worker process (tests use it for [`TEST_FAULT_ENV`]).
    pub worker_env: Vec<(String, String)>,
}

impl ExtractOptions {
    pub fn from_config(cfg: &ExtractConfig, image_size: u32, worker_exe: PathBuf) -> Self {
        ExtractOptions {
            render_dpi: cfg.render_dpi,
            chunk_size: cfg.chunk_size,
            chunk_overlap: cfg.chunk_overlap,
            max_chunk_chars: cfg.max_chunk_chars,
            max_file_bytes: cfg.max_file_mb.saturating_mul(1024 * 1024),
            max_pages: cfg.max_pages,
            render_timeout: Duration::from_secs(cfg.render_timeout_s),
            worker_memory_mb: cfg.worker_memory_mb,
            pdfium_path: cfg.pdfium_path.clone(),
            libreoffice: cfg.libreoffice.clone(),
            image_size,
            worker_exe,
            worker_env: Vec::new(),
        }
    }
}

/// The size an image of `width`×`height` is resized to: the model's square (`size`×`size`), or
/// with its proportions kept and its longest side at most `size` (a thumbnail).
pub(crate) fn fitted_size(width: u32, height: u32, size: u32, keep_aspect: bool) -> (u32, u32) {
    if !keep_aspect {
        return (size, size);
    }
    let (w, h) = (width.max(1) as f64, height.max(1) as f64);
    let scale = (size as f64 / w.max(h)).min(1.0);
    (
        ((w * scale).round() as u32).max(1),
        ((h * scale).round() as u32).max(1),
    )
}

/// `img` resized to [`fitted_size`].
pub(crate) fn fit(img: &image::RgbImage, size: u32, keep_aspect: bool) -> image::RgbImage {
    let (w, h) = fitted_size(img.width(), img.height(), size, keep_aspect);
    crate::embed::preprocess::resize_for_model(img, w, h)
}

/// What is known about a document before its pages arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentInfo {
    pub format: DocFormat,
    pub num_pages: u32,
    pub title: Option<String>,
    /// False when only text comes out (text files, office files without LibreOffice).
    pub visual: bool,
    /// Things the user should know, e.g. "visual indexing needs LibreOffice".
    pub notes: Vec<String>,
}

/// One page, as it goes downstream: from the worker to the model, until its record is made.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// 1-based.
    pub number: u32,
    /// Already resized to `image_size`×`image_size` for the model; `None` for text-only pages.
    pub image: Option<image::RgbImage>,
    pub text: String,
    /// `text` cut into chunks, numbered across the document. [`Extractor::extract`] cuts them
    /// (in this process); the worker sends none.
    pub chunks: Vec<TextChunk>,
}

#[derive(Debug, Clone)]
pub enum ExtractEvent {
    /// Always first.
    Info(DocumentInfo),
    /// Then the pages, in order.
    Page(Page),
}

/// Why a file could not be extracted. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{path}: not a supported document type ({detail})")]
    Unsupported { path: PathBuf, detail: String },
    #[error("{path}: the file is empty (0 bytes)")]
    Empty { path: PathBuf },
    #[error("{path}: {} is above the {} limit (extract.max_file_mb)", mib(*.size), mib(*.limit))]
    TooLarge {
        path: PathBuf,
        /// Bytes.
        size: u64,
        /// Bytes.
        limit: u64,
    },
    #[error("{path}: {pages} pages is above the {limit}-page limit (extract.max_pages)")]
    TooManyPages {
        path: PathBuf,
        pages: u32,
        limit: u32,
    },
    #[error("{path}: the extension says {expected} but the content is {found}")]
    WrongContent {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the PDF is password protected; remove the password to index it")]
    Encrypted { path: PathBuf },
    #[error("{path}: the file is truncated ({detail})")]
    Truncated { path: PathBuf, detail: String },
    #[error("{path}: corrupt or unreadable {format}: {detail}")]
    Corrupt {
        path: PathBuf,
        format: String,
        detail: String,
    },
    #[error("{path}: LibreOffice could not convert it to PDF: {detail}")]
    Conversion { path: PathBuf, detail: String },
    #[error("{path}: rendering took longer than {seconds} s (extract.render_timeout_s); the renderer was stopped")]
    Timeout { path: PathBuf, seconds: u64 },
    #[error(
        "{path}: the renderer needed more than its {limit_mb} MiB memory bound (extract.worker_memory_mb) and stopped"
    )]
    OutOfMemory { path: PathBuf, limit_mb: u64 },
    #[error("{path}: the renderer crashed ({status}){}", stderr_suffix(.stderr))]
    Crashed {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{path}: could not read the file: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: could not start the renderer {exe}: {detail}")]
    WorkerStart {
        path: PathBuf,
        exe: PathBuf,
        detail: String,
    },
    #[error("{path}: the renderer could not be set up: {detail}")]
    Setup { path: PathBuf, detail: String },
    #[error("{path}: extraction stopped early (the agent is shutting down)")]
    Stopped { path: PathBuf },
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!("; its last words: {s}")
    }
}

impl ExtractError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        use ExtractError::*;
        match self {
            Unsupported { path, .. }
            | Empty { path }
            | TooLarge { path, .. }
            | TooManyPages { path, .. }
            | WrongContent { path, .. }
            | Encrypted { path }
            | Truncated { path, .. }
            | Corrupt { path, .. }
            | Conversion { path, .. }
            | Timeout { path, .. }
            | OutOfMemory { path, .. }
            | Crashed { path, .. }
            | Unreadable { path, .. }
            | WorkerStart { path, .. }
            | Setup { path, .. }
            | Stopped { path } => path,
        }
    }

    /// A short reason for the state store and `status` (the file is recorded next to it).
    pub fn reason(&self) -> String {
        use ExtractError::*;
        match self {
            Unsupported { detail, .. } => format!("unsupported: {detail}"),
            Empty { .. } => "empty file".into(),
            TooLarge { size, limit, .. } => format!("too large: {} > {}", mib(*size), mib(*limit)),
            TooManyPages { pages, limit, .. } => format!("too many pages: {pages} > {limit}"),
            WrongContent {
                expected, found, ..
            } => {
                format!("extension says {expected}, content is {found}")
            }
            Encrypted { .. } => "password protected".into(),
            Truncated { .. } => "truncated file".into(),
            Corrupt { format, detail, .. } => format!("corrupt {format}: {detail}"),
            Conversion { detail, .. } => format!("LibreOffice conversion failed: {detail}"),
            Timeout { seconds, .. } => format!("renderer timed out after {seconds} s"),
            OutOfMemory { limit_mb, .. } => format!("renderer needed more than its {limit_mb} MiB memory bound (extract.worker_memory_mb)"),
            Crashed { status, .. } => format!("renderer crashed ({status})"),
            Unreadable { source, .. } => format!("unreadable: {source}"),
            WorkerStart { detail, .. } => format!("renderer could not start: {detail}"),
            Setup { detail, .. } => format!("renderer setup failed: {detail}"),
            Stopped { .. } => "stopped early".into(),
        }
    }

    /// True when trying again cannot help until the file itself changes (the state store marks
    /// it failed); false when a retry may succeed (file mid-copy, renderer could not start).
    pub fn is_permanent(&self) -> bool {
        use ExtractError::*;
        match self {
            Unsupported { .. }
            | Empty { .. }
            | TooLarge { .. }
            | TooManyPages { .. }
            | WrongContent { .. }
            | Encrypted { .. }
            | Truncated { .. }
            | Corrupt { .. }
            | Conversion { .. }
            | Timeout { .. }
            | OutOfMemory { .. }
            | Crashed { .. } => true,
            Unreadable { .. } | WorkerStart { .. } | Setup { .. } | Stopped { .. } => false,
        }
    }
}

/// Runs extraction jobs. Cheap to share; clones share the worker processes kept between
/// documents, and calls at the same time each get a worker of their own.
#[derive(Debug, Clone)]
pub struct Extractor {
    opts: ExtractOptions,
    pdfium: PathBuf,
    soffice: Option<PathBuf>,
    workers: Arc<isolate::WorkerPool>,
}

impl Extractor {
    /// The same extractor rendering pages at `image_size`×`image_size` (the model's input).
    pub fn with_image_size(&self, image_size: u32) -> Extractor {
        let mut x = self.clone();
        x.opts.image_size = image_size;
        x
    }

    /// Checks that the worker executable and PDFium exist, and looks for LibreOffice once.
    pub fn new(opts: ExtractOptions) -> Result<Extractor, ExtractError> {
        if !opts.worker_exe.is_file() {
            return Err(ExtractError::WorkerStart {
                path: PathBuf::from("(no file yet)"),
                exe: opts.worker_exe.clone(),
                detail: "the executable does not exist; reinstall docusearch-agent".into(),
            });
        }
        let pdfium =
            crate::runtime_paths::find_pdfium(opts.pdfium_path.as_deref()).map_err(|e| {
                ExtractError::Setup {
                    path: PathBuf::from("(no file yet)"),
                    detail: e.to_string(),
                }
            })?;
        let soffice = find_soffice(opts.libreoffice.as_deref());
        match &soffice {
            Some(s) => tracing::info!(soffice = %s.display(), "LibreOffice found: office files are indexed visually"),
            None => tracing::warn!(
                "LibreOffice not found: office files are indexed as text only (visual indexing needs LibreOffice)"
            ),
        }
        Ok(Extractor {
            opts,
            pdfium,
            soffice,
            workers: Arc::default(),
        })
    }

    pub fn options(&self) -> &ExtractOptions {
        &self.opts
    }

    /// Worker processes started so far by this extractor and its clones.
    pub fn workers_started(&self) -> u64 {
        self.workers.started()
    }

    /// LibreOffice's `soffice`, when found.
    pub fn soffice(&self) -> Option<&Path> {
        self.soffice.as_deref()
    }

    /// What `status` should tell the user about office files: `Some` when LibreOffice is
    /// missing and they are indexed as text only.
    pub fn office_note(&self) -> Option<&'static str> {
        self.soffice.is_none().then_some(office::NEEDS_LIBREOFFICE)
    }

    /// Blocking. Renders page `page` (1-based) of `path` alone, in the isolated worker, its
    /// longest side `max_side` pixels and its proportions kept: a thumbnail. `None` when the
    /// document has no such page or the page has no image (text files, office files without
    /// LibreOffice).
    pub fn render_page(
        &self,
        path: &Path,
        page: u32,
        max_side: u32,
    ) -> Result<Option<image::RgbImage>, ExtractError> {
        let (mut request, _converted) = self.request(path)?;
        if matches!(
            request.kind,
            protocol::WorkKind::Text | protocol::WorkKind::OfficeText
        ) {
            return Ok(None);
        }
        request.only_page = Some(page);
        request.keep_aspect = true;
        request.image_size = max_side;
        let mut found = None;
        isolate::run_worker(
            &self.opts,
            &self.workers,
            path,
            &request,
            &mut |ev| match ev {
                ExtractEvent::Page(p) => {
                    found = p.image.filter(|_| p.number == page);
                    ControlFlow::Continue(())
                }
                ExtractEvent::Info(_) => ControlFlow::Continue(()),
            },
        )?;
        Ok(found)
    }

    /// What the worker is asked to do with `path` (an office file is converted to PDF first:
    /// the converted copy lives as long as the second value).
    fn request(
        &self,
        path: &Path,
    ) -> Result<(protocol::WorkRequest, Option<office::Converted>), ExtractError> {
        let format = DocFormat::from_path(path).ok_or_else(|| ExtractError::Unsupported {
            path: path.to_path_buf(),
            detail: "unknown file extension".into(),
        })?;
        let kind = sniff::check_file(path, format, self.opts.max_file_bytes)?;
        let mut notes = Vec::new();
        let legacy = matches!(format, DocFormat::Doc | DocFormat::Ppt);
        let (source, kind, converted) = match (kind, &self.soffice) {
            (protocol::WorkKind::OfficeText, Some(soffice)) => {
                match office::convert_to_pdf(soffice, path, self.opts.render_timeout) {
                    Ok(converted) => (converted.pdf.clone(), protocol::WorkKind::Pdf, Some(converted)),
                    Err(e) if legacy => return Err(e),
                    // A partial install (Writer without Impress, say) or a file LibreOffice
                    // rejects: the text in the package is still worth indexing.
                    Err(e) => {
                        tracing::warn!("{e}; indexing its text only");
                        notes.push(format!(
                            "visual indexing failed ({}): only the text was indexed",
                            e.reason()
                        ));
                        (path.to_path_buf(), kind, None)
                    }
                }
            }
            (protocol::WorkKind::OfficeText, None) if legacy => {
                return Err(ExtractError::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!(
                        "legacy .{} files need LibreOffice (not found); install it or set extract.libreoffice",
                        format.as_str()
                    ),
                })
            }
            (protocol::WorkKind::OfficeText, None) => {
                notes.push(office::NEEDS_LIBREOFFICE.to_string());
                (path.to_path_buf(), kind, None)
            }
            (other, _) => (path.to_path_buf(), other, None),
        };
        let request = protocol::WorkRequest {
            source,
            format,
            kind,
            render_dpi: self.opts.render_dpi,
            image_size: self.opts.image_size,
            max_pages: self.opts.max_pages,
            pdfium_path: self.pdfium.clone(),
            notes,
            only_page: None,
            keep_aspect: false,
        };
        Ok((request, converted))
    }

    /// Blocking. Runs the isolated worker on one file and streams events as pages are rendered
    /// (never all pages in memory). The sink returns `ControlFlow::Break(())` to stop early.
    pub fn extract(
        &self,
        path: &Path,
        sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
    ) -> Result<DocumentInfo, ExtractError> {
        let (request, _converted) = self.request(path)?;
        // Chunks are numbered across the document.
        let mut next_chunk = 0u32;
        let o = &self.opts;
        isolate::run_worker(
            &self.opts,
            &self.workers,
            path,
            &request,
            &mut |ev| match ev {
                ExtractEvent::Page(mut page) => {
                    page.chunks = chunk_page(
                        page.number,
                        &page.text,
                        o.chunk_size,
                        o.chunk_overlap,
                        o.max_chunk_chars,
                        next_chunk,
                    );
                    next_chunk += page.chunks.len() as u32;
                    sink(ExtractEvent::Page(page))
                }
                info => sink(info),
            },
        )
    }
}
