//! The three stages the pipeline drives, as narrow traits: extraction, the model and the
//! index. The real implementations (PDFium worker, ColPali on candle, Chroma) live in
//! `agent::real`; the traits keep the scheduling code apart from them.

use std::future::Future;
use std::ops::ControlFlow;
use std::path::Path;

pub use crate::telemetry::Stage;
use crate::types::{DocFormat, DocId, MultiVector};

/// A stage failure: what failed and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stage}: {reason}")]
pub struct StageError {
    pub stage: Stage,
    pub reason: String,
    /// Retrying will not help until the file changes (a corrupt or encrypted document).
    pub permanent: bool,
}

impl StageError {
    pub fn transient(stage: Stage, reason: impl Into<String>) -> StageError {
        StageError {
            stage,
            reason: reason.into(),
            permanent: false,
        }
    }
    pub fn permanent(stage: Stage, reason: impl Into<String>) -> StageError {
        StageError {
            stage,
            reason: reason.into(),
            permanent: true,
        }
    }
}

/// What extraction knows about a document before its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocInfo {
    pub format: DocFormat,
    pub num_pages: u32,
}

/// A text chunk of a page, as embedded and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub page: u32,
    pub chunk_index: u32,
    pub text: String,
    pub word_count: usize,
}

/// One rendered page with its text, cut into chunks.
#[derive(Debug, Clone)]
pub struct PageContent {
    /// 1-based.
    pub number: u32,
    /// `None` for documents without a visual rendering (plain text).
    pub image: Option<image::RgbImage>,
    pub text: String,
    pub chunks: Vec<Chunk>,
}

/// What extraction streams.
pub enum Extracted {
    Info(DocInfo),
    Page(PageContent),
}

/// Renders a document page by page. Blocking; the sink may stop it early.
pub trait Extract: Send + Sync + 'static {
    fn extract(
        &self,
        path: &Path,
        sink: &mut dyn FnMut(Extracted) -> ControlFlow<()>,
    ) -> Result<DocInfo, StageError>;
}

/// A loaded model.
pub trait Embed: Send + 'static {
    fn embed_images(&self, images: &[image::RgbImage]) -> Result<Vec<MultiVector>, StageError>;
    /// Text chunks go through the query prompt, as DocuSearch does.
    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<MultiVector>, StageError>;
    /// Where it runs, in what, and whether that is a fall-back to the CPU.
    fn placement(&self) -> Placement;
}

/// Where a loaded model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub device: String,
    pub dtype: String,
    pub fell_back_to_cpu: bool,
}

/// Loads the model when the first page needs it (the agent unloads it when idle).
pub trait EmbedLoader: Send + Sync + 'static {
    type Model: Embed;
    fn load(&self) -> Result<Self::Model, StageError>;
    /// The model's name as recorded with every record (known without loading it).
    fn model_id(&self) -> String;
}

/// The document a batch of records belongs to, and one embedded page: the sync layer's own
/// types, so the sink hands them over as they are.
pub use crate::sync::{DocumentMeta, PageRecord};

#[derive(Debug, Clone)]
pub struct ChunkVectors {
    pub chunk: Chunk,
    pub embedding: MultiVector,
}

/// Where records go. Upserts first, then `finish_document` prunes what no longer exists, so a
/// changed document is never missing from search.
pub trait Sink: Send + Sync + 'static {
    fn upsert_pages(
        &self,
        doc: &DocumentMeta,
        pages: &[PageRecord],
    ) -> impl Future<Output = Result<(), StageError>> + Send;
    fn upsert_chunks(
        &self,
        doc: &DocumentMeta,
        chunks: &[ChunkVectors],
    ) -> impl Future<Output = Result<(), StageError>> + Send;
    fn finish_document(
        &self,
        doc: &DocumentMeta,
        num_pages: u32,
        num_chunks: u32,
    ) -> impl Future<Output = Result<(), StageError>> + Send;
    fn delete_document(
        &self,
        doc_id: &DocId,
    ) -> impl Future<Output = Result<(), StageError>> + Send;
    /// Re-keys `old`'s records as `new` without the model; `false` when there was nothing.
    fn move_document(
        &self,
        old: &DocId,
        new: &DocumentMeta,
    ) -> impl Future<Output = Result<bool, StageError>> + Send;
}
