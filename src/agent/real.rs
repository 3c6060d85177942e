//! The stage traits implemented by the real parts: the isolated PDFium/LibreOffice extractor,
//! ColPali on candle, and Chroma through the syncer.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

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
    extractor: Extractor,
}

impl RealExtract {
    /// `worker_exe` is the `docusearch-agent` executable (it runs `extract-worker`).
    pub fn new(cfg: &Config, worker_exe: PathBuf) -> Result<RealExtract, StageError> {
        let image_size = crate::embed::model_image_size(&cfg.model)
            .map_err(|e| StageError::permanent(Stage::Model, e.to_string()))?;
        Self::with_image_size(&cfg.extract, image_size, worker_exe)
    }

    pub fn with_image_size(
        cfg: &ExtractConfig,
        image_size: u32,
        worker_exe: PathBuf,
    ) -> Result<RealExtract, StageError> {
        let opts = ExtractOptions::from_config(cfg, image_size, worker_exe);
        let extractor = Extractor::new(opts)
            .map_err(|e| StageError::permanent(Stage::Extract, e.to_string()))?;
        Ok(RealExtract { extractor })
    }
}

impl Extract for RealExtract {
    fn extract(
        &self,
        path: &Path,
        sink: &mut dyn FnMut(ExtractEvent) -> ControlFlow<()>,
    ) -> Result<DocumentInfo, StageError> {
        self.extractor.extract(path, sink).map_err(|e| StageError {
            stage: Stage::Extract,
            reason: e.reason(),
            permanent: e.is_permanent(),
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
        let e = Embedder::load(&self.cfg)
            .map_err(|e| StageError::transient(Stage::Model, e.to_string()))?;
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
    }
}

impl Sink for RealSink {
    async fn upsert_pages(
        &self,
        doc: &DocumentMeta,
        pages: &[PageRecord],
    ) -> Result<(), StageError> {
        self.0.upsert_pages(doc, pages).await.map_err(sync_err)
    }
    async fn upsert_chunks(
        &self,
        doc: &DocumentMeta,
        chunks: &[ChunkRecord],
    ) -> Result<(), StageError> {
        self.0.upsert_chunks(doc, chunks).await.map_err(sync_err)
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
