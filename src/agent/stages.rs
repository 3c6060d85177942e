//! The three stages the pipeline drives, as narrow traits: extraction, the model and the
//! index. The real implementations (PDFium worker, ColPali on candle, Chroma) live in
//! `agent::real`; the traits keep the scheduling code apart from them.

use std::future::Future;
use std::ops::ControlFlow;
use std::path::Path;

pub use crate::telemetry::Stage;
use crate::types::{DocId, MultiVector};

/// A stage failure: what failed and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stage}: {reason}")]
pub struct StageError {
    pub stage: Stage,
    pub reason: String,
    /// Retrying will not help until the file changes (a corrupt or encrypted document).
    pub permanent: bool,
    /// The stage cannot work yet (the model's files are not here and cannot be fetched now):
    /// in `run` the job waits, using up no attempt, and is tried again with back-off.
    pub waits: bool,
}

impl StageError {
    pub fn transient(stage: Stage, reason: impl Into<String>) -> StageError {
        StageError {
            stage,
            reason: reason.into(),
            permanent: false,
            waits: false,
        }
    }
    pub fn permanent(stage: Stage, reason: impl Into<String>) -> StageError {
        StageError {
            permanent: true,
            ..StageError::transient(stage, reason)
        }
    }
    pub fn unavailable(stage: Stage, reason: impl Into<String>) -> StageError {
        StageError {
            waits: true,
            ..StageError::transient(stage, reason)
        }
    }
}

/// Renders a document page by page (its info first, then its pages with their text chunks).
/// Blocking; the sink may stop it early.
pub trait Extract: Send + Sync + 'static {
    fn extract(
        &self,
        path: &Path,
        sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
    ) -> Result<DocumentInfo, StageError>;
}

/// A loaded model.
pub trait Embed: Send + 'static {
    fn embed_images(&self, images: &[image::RgbImage]) -> Result<Vec<MultiVector>, StageError>;
    /// Text chunks go through the query prompt, as DocuSearch does.
    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<MultiVector>, StageError>;
    /// Where it runs, in what, and whether that is a fall-back to the CPU.
    fn placement(&self) -> Placement;
}

/// Where a loaded model runs (device, dtype, whether that is a fall-back, and why).
pub use crate::telemetry::ModelPlacement as Placement;

/// Loads the model when the first page needs it (the agent unloads it when idle).
pub trait EmbedLoader: Send + Sync + 'static {
    type Model: Embed;
    fn load(&self) -> Result<Self::Model, StageError>;
    /// The model's name as recorded with every record (known without loading it).
    fn model_id(&self) -> String;
}

/// A document as extraction reads it, one page of it, and one text chunk: extraction's own
/// types. The document every record shares, and a page or chunk with its vectors: the
/// records' own types. The stages hand them over as they are.
pub use crate::extract::{DocumentInfo, ExtractEvent, Page, TextChunk};
pub use crate::records::{ChunkRecord, DocumentMeta, PageRecord};

/// Where records go. Upserts first, then `finish_document` prunes what no longer exists, so a
/// changed document is never missing from search.
pub trait Sink: Send + Sync + 'static {
    /// Writes page records of one or more documents, in as few requests as the sink takes.
    fn upsert_pages(
        &self,
        docs: &[(&DocumentMeta, &[PageRecord])],
    ) -> impl Future<Output = Result<(), StageError>> + Send;
    /// Writes text-chunk records of one or more documents, in as few requests as it takes.
    fn upsert_chunks(
        &self,
        docs: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> impl Future<Output = Result<(), StageError>> + Send;
    /// Writes page records, then text-chunk records, of one or more documents; the chunks only
    /// once the pages are in. A sink may prepare the chunks while the pages are in flight.
    fn upsert_records(
        &self,
        pages: &[(&DocumentMeta, &[PageRecord])],
        chunks: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async move {
            if !pages.is_empty() {
                self.upsert_pages(pages).await?;
            }
            if !chunks.is_empty() {
                self.upsert_chunks(chunks).await?;
            }
            Ok(())
        }
    }
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
