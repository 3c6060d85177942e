//! The stage traits implemented by the real parts: the isolated PDFium/LibreOffice extractor,
//! ColPali on candle, and Chroma through the syncer.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::stages::{
    ChunkRecord, DocumentInfo, DocumentMeta, Embed, EmbedLoader, Extract, ExtractEvent, PageRecord,
    Placement, Sink, Stage, StageError,
};
use crate::config::{Config, ExtractConfig, ModelConfig};
use crate::embed::Embedder;
use crate::extract::{ExtractOptions, Extractor};
use crate::sync::{SyncError, Syncer};
use crate::types::{DocId, MultiVector};

/// Extraction through the isolated worker (which also cuts each page's text into chunks).
pub struct RealExtract {
    /// Checked at start: the worker executable, PDFium, LibreOffice.
    base: Extractor,
    model: ModelConfig,
    /// Pages are rendered at the model's input size, known from its `config.json`: at start,
    /// or once the model's files can be fetched (a laptop starting before its network).
    sized: OnceLock<Extractor>,
}

impl RealExtract {
    /// `worker_exe` is the `docusearch-agent` executable (it runs `extract-worker`).
    pub fn new(cfg: &Config, worker_exe: PathBuf) -> Result<RealExtract, StageError> {
        let x = Self::checked(&cfg.extract, &cfg.model, worker_exe)?;
        match crate::embed::model_image_size(&cfg.model) {
            Ok(size) => {
                let _ = x.sized.set(x.base.with_image_size(size));
            }
            Err(e) if e.is_unavailable() => tracing::warn!(
                "{e}. The agent starts anyway: documents wait in the queue, and the model is fetched when they need it"
            ),
            Err(e) => return Err(StageError::permanent(Stage::Model, e.to_string())),
        }
        Ok(x)
    }

    pub fn with_image_size(
        cfg: &ExtractConfig,
        image_size: u32,
        worker_exe: PathBuf,
    ) -> Result<RealExtract, StageError> {
        let x = Self::checked(cfg, &ModelConfig::default(), worker_exe)?;
        let _ = x.sized.set(x.base.with_image_size(image_size));
        Ok(x)
    }

    fn checked(
        cfg: &ExtractConfig,
        model: &ModelConfig,
        worker_exe: PathBuf,
    ) -> Result<RealExtract, StageError> {
        let opts = ExtractOptions::from_config(cfg, 0, worker_exe);
        let base = Extractor::new(opts)
            .map_err(|e| StageError::permanent(Stage::Extract, e.to_string()))?;
        Ok(RealExtract {
            base,
            model: model.clone(),
            sized: OnceLock::new(),
        })
    }

    /// The extractor at the model's input size, once the model's configuration is known.
    fn extractor(&self) -> Result<&Extractor, StageError> {
        if let Some(x) = self.sized.get() {
            return Ok(x);
        }
        match crate::embed::model_image_size(&self.model) {
            Ok(size) => Ok(self.sized.get_or_init(|| self.base.with_image_size(size))),
            Err(e) if e.is_unavailable() => {
                Err(StageError::unavailable(Stage::Model, e.to_string()))
            }
            Err(e) => Err(StageError::transient(Stage::Model, e.to_string())),
        }
    }
}

impl Extract for RealExtract {
    fn extract(
        &self,
        path: &Path,
        sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
    ) -> Result<DocumentInfo, StageError> {
        self.extractor()?
            .extract(path, sink)
            .map_err(|e| StageError {
                stage: Stage::Extract,
                reason: e.reason(),
                permanent: e.is_permanent(),
                waits: false,
            })
    }
}

/// ColPali, loaded on demand.
pub struct RealModelLoader {
    pub cfg: ModelConfig,
}

pub struct RealModel(Embedder);

impl EmbedLoader for RealModelLoader {
    type Model = RealModel;
    fn load(&self) -> Result<RealModel, StageError> {
        let e = Embedder::load(&self.cfg).map_err(|e| match e.is_unavailable() {
            true => StageError::unavailable(Stage::Model, e.to_string()),
            false => StageError::transient(Stage::Model, e.to_string()),
        })?;
        tracing::info!(model = %e.model_id(), device = %e.device_name(), dtype = %e.dtype_name(), "model loaded");
        Ok(RealModel(e))
    }
    fn model_id(&self) -> String {
        self.cfg.name.clone()
    }
}

impl Embed for RealModel {
    fn embed_images(&self, images: &[image::RgbImage]) -> Result<Vec<MultiVector>, StageError> {
        self.0
            .embed_images(images)
            .map_err(|e| StageError::transient(Stage::Embed, e.to_string()))
    }
    fn embed_texts(&self, texts: &[&str]) -> Result<Vec<MultiVector>, StageError> {
        self.0
            .embed_queries(texts)
            .map_err(|e| StageError::transient(Stage::Embed, e.to_string()))
    }
    fn placement(&self) -> Placement {
        Placement {
            device: self.0.device_name(),
            dtype: self.0.dtype_name(),
            fell_back_to_cpu: self.0.fell_back_to_cpu(),
            reason: self.0.placement_reason().to_string(),
        }
    }
}

/// Chroma, through the syncer.
pub struct RealSink(pub Syncer);

fn sync_err(e: SyncError) -> StageError {
    StageError {
        stage: Stage::Sync,
        permanent: !e.is_transient(),
        reason: e.to_string(),
        waits: false,
    }
}

impl Sink for RealSink {
    async fn upsert_pages(
        &self,
        docs: &[(&DocumentMeta, &[PageRecord])],
    ) -> Result<(), StageError> {
        self.0.upsert_pages_of(docs).await.map_err(sync_err)
    }
    async fn upsert_chunks(
        &self,
        docs: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<(), StageError> {
        self.0.upsert_chunks_of(docs).await.map_err(sync_err)
    }
    async fn upsert_records(
        &self,
        pages: &[(&DocumentMeta, &[PageRecord])],
        chunks: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<(), StageError> {
        self.0
            .upsert_records_of(pages, chunks)
            .await
            .map_err(sync_err)
    }
    async fn finish_document(
        &self,
        doc: &DocumentMeta,
        num_pages: u32,
        num_chunks: u32,
    ) -> Result<(), StageError> {
        self.0
            .finish_document(doc, num_pages, num_chunks)
            .await
            .map_err(sync_err)
    }
    async fn delete_document(&self, doc_id: &DocId) -> Result<(), StageError> {
        self.0.delete_document(doc_id).await.map_err(sync_err)
    }
    async fn move_document(&self, old: &DocId, new: &DocumentMeta) -> Result<bool, StageError> {
        self.0.move_document(old, new).await.map_err(sync_err)
    }
}
