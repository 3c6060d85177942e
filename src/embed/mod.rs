//! ColPali on candle: loading, preprocessing, the forward pass, batching. Issue 3.
//!
//! [`Embedder`] is what the rest of the agent uses: one loaded model on one device, turning page
//! images and queries (or text chunks) into multi-vectors equal to colpali-engine's.

pub mod config;
pub mod device;
pub mod loader;
pub mod model;
mod ops;
pub mod preprocess;
pub mod prompt;
pub mod weights;

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::config::ModelConfig;
use crate::types::MultiVector;

pub use config::ColPaliConfig;
pub use model::ColPaliModel;
pub use prompt::Prompts;

/// What went wrong loading or running the model; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("model directory {0} does not exist — set model.name (MODEL_NAME) to a checkpoint directory or a Hugging Face repo id")]
    LocalDirMissing(PathBuf),
    #[error("model directory {dir} has no {file} — a ColPali checkpoint needs config.json, tokenizer.json and model.safetensors (or model.safetensors.index.json with its shards)")]
    LocalFileMissing { dir: PathBuf, file: String },
    #[error("model {repo}@{revision}: {file} is not in the Hugging Face cache ({cache}) and the model is set to offline — run `docusearch-agent model fetch --model {repo}` where the hub is reachable, or set model.name (MODEL_NAME) to a local directory")]
    NotInCache {
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },
    #[error("model {repo}@{revision} has no file {file} on the Hugging Face hub — check the repo id and revision (model.name / MODEL_NAME, model.revision)")]
    NotOnHub {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("could not download {file} of model {repo}@{revision} from the Hugging Face hub: {message} — check the network (HF_ENDPOINT, HF_TOKEN), run `docusearch-agent model fetch --model {repo}` once the hub is reachable, or set model.name (MODEL_NAME) to a local directory with the checkpoint")]
    Download {
        repo: String,
        revision: String,
        file: String,
        message: String,
    },
    #[error("model configuration {path}: {source}")]
    Config {
        path: PathBuf,
        source: config::ConfigJsonError,
    },
    #[error("image preprocessing configuration {path}: {message}")]
    Preprocessor { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("weights {path}: {message} — the checkpoint must have the layout of vidore/colpali-v1.2-merged")]
    Weights { path: PathBuf, message: String },
    #[error("device: {0}")]
    Device(String),
    #[error("ColPali forward pass failed on {device}: {source}")]
    Forward {
        device: String,
        source: candle_core::Error,
    },
}

/// One loaded ColPali model on one device. `Send + Sync`: the forward pass keeps no state.
pub struct Embedder {
    model: ColPaliModel,
    prompts: Prompts,
    model_id: String,
    fell_back_to_cpu: bool,
    placement_reason: String,
    batch_size_visual: usize,
    batch_size_text: usize,
    normalization: preprocess::Normalization,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Embedder>();
};

/// A `config.json` read and turned into the model's sizes.
pub fn read_config(path: &std::path::Path) -> Result<ColPaliConfig, EmbedError> {
    let text = std::fs::read_to_string(path).map_err(|e| EmbedError::Config {
        path: path.to_path_buf(),
        source: config::ConfigJsonError::Bad {
            key: "(file)".into(),
            found: e.to_string(),
            expected: "a readable config.json".into(),
        },
    })?;
    ColPaliConfig::from_json(&text).map_err(|source| EmbedError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads only config.json (no weights): the square image size, for extraction to resize pages to.
impl EmbedError {
    /// The model's files are not on this machine and cannot be fetched now (no network, the
    /// hub unreachable, offline and not in the cache, a model folder on a disk not mounted):
    /// waiting can help, the documents are not at fault.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            EmbedError::Download { .. }
                | EmbedError::NotInCache { .. }
                | EmbedError::LocalDirMissing(_)
        )
    }
}

pub fn model_image_size(cfg: &ModelConfig) -> Result<u32, EmbedError> {
    let path = loader::resolve_config(cfg)?;
    Ok(read_config(&path)?.vision.image_size as u32)
}

impl Embedder {
    /// Loads from a local directory or a hub repo id (shared HF cache; offline when `cfg.offline`).
    pub fn load(cfg: &ModelConfig) -> Result<Embedder, EmbedError> {
        let files = loader::resolve(cfg)?;
        let model_cfg = read_config(&files.config)?;
        let prompts = Prompts::load(&files.tokenizer)?;
        let normalization = match &files.preprocessor {
            None => preprocess::Normalization::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| EmbedError::Preprocessor {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let (norm, size) = preprocess::Normalization::from_preprocessor_config(&text)
                    .map_err(|message| EmbedError::Preprocessor {
                        path: path.clone(),
                        message,
                    })?;
                if let Some(size) = size.filter(|s| *s as usize != model_cfg.vision.image_size) {
                    return Err(EmbedError::Preprocessor {
                        path: path.clone(),
                        message: format!(
                            "it resizes to {size} but config.json's vision_config.image_size is {}",
                            model_cfg.vision.image_size
                        ),
                    });
                }
                norm
            }
        };
        let sel = device::select(cfg.device, cfg.dtype)?;
        let started = std::time::Instant::now();
        let first_shard = files.weights.first().cloned().unwrap_or_default();
        let wanted = weights::wanted(&model_cfg).map_err(|e| EmbedError::Weights {
            path: first_shard.clone(),
            message: format!("the model cannot be built at this configuration: {e}"),
        })?;
        let tensors = weights::load(&files.weights, &wanted, sel.dtype, &sel.device)?;
        let vb = VarBuilder::from_tensors(tensors, sel.dtype, &sel.device);
        let model = ColPaliModel::new(&model_cfg, vb).map_err(|e| EmbedError::Weights {
            path: first_shard,
            message: e.to_string(),
        })?;
        tracing::info!(
            model = %files.id,
            device = %device::device_name(&sel.device),
            dtype = %device::dtype_name(sel.dtype),
            why = %sel.reason,
            secs = %format!("{:.2}", started.elapsed().as_secs_f64()),
            "ColPali loaded"
        );
        Ok(Embedder {
            model,
            prompts,
            model_id: files.id,
            fell_back_to_cpu: sel.fell_back_to_cpu,
            placement_reason: sel.reason,
            batch_size_visual: cfg.batch_size_visual.max(1),
            batch_size_text: cfg.batch_size_text.max(1),
            normalization,
        })
    }

    /// A model of this configuration with random weights made on the device itself (no file):
    /// for measuring speed and memory at full size where the weights are not at hand
    /// (`gpu-check`). Its outputs mean nothing. `tokenizer` only has to hold ids below the
    /// configuration's vocabulary size.
    pub fn random(
        model_cfg: &ColPaliConfig,
        tokenizer: &std::path::Path,
        cfg: &ModelConfig,
    ) -> Result<Embedder, EmbedError> {
        let prompts = Prompts::load(tokenizer)?;
        let sel = device::select(cfg.device, cfg.dtype)?;
        let weights_error = |e: candle_core::Error| EmbedError::Weights {
            path: "(random, in memory)".into(),
            message: e.to_string(),
        };
        let mut tensors = std::collections::HashMap::new();
        for w in weights::wanted(model_cfg).map_err(weights_error)? {
            // Scaled like a trained layer (unit-variance outputs), so activations stay finite.
            let std = match w.shape.as_slice() {
                [_, rest @ ..] if !rest.is_empty() => {
                    1.0 / (rest.iter().product::<usize>() as f64).sqrt()
                }
                _ => 0.1,
            };
            let t = Tensor::randn(0f32, std as f32, w.shape.as_slice(), &sel.device)
                .and_then(|t| t.to_dtype(sel.dtype))
                .map_err(weights_error)?;
            tensors.insert(w.name, t);
        }
        let vb = VarBuilder::from_tensors(tensors, sel.dtype, &sel.device);
        let model = ColPaliModel::new(model_cfg, vb).map_err(weights_error)?;
        Ok(Embedder {
            model,
            prompts,
            model_id: "(random weights)".into(),
            fell_back_to_cpu: sel.fell_back_to_cpu,
            placement_reason: sel.reason,
            batch_size_visual: cfg.batch_size_visual.max(1),
            batch_size_text: cfg.batch_size_text.max(1),
            normalization: preprocess::Normalization::default(),
        })
    }

    /// The model's square input size (448 for the real model).
    pub fn image_size(&self) -> u32 {
        self.model.config().vision.image_size as u32
    }
    /// "cpu", "cuda:0", "metal".
    pub fn device_name(&self) -> String {
        device::device_name(self.model.device())
    }
    /// "f32", "bf16", "f16".
    pub fn dtype_name(&self) -> String {
        device::dtype_name(self.model.dtype())
    }
    /// `repo@revision` or the local directory; stored in Chroma metadata `model`.
    pub fn model_id(&self) -> String {
        self.model_id.clone()
    }
    /// Whether `device = auto` found no GPU and runs on the CPU.
    pub fn fell_back_to_cpu(&self) -> bool {
        self.fell_back_to_cpu
    }
    /// Why this device and dtype ("device = auto, CUDA GPU 0 found; dtype = auto: bf16 on a GPU").
    pub fn placement_reason(&self) -> &str {
        &self.placement_reason
    }
    pub fn config(&self) -> &ColPaliConfig {
        self.model.config()
    }
    pub fn prompts(&self) -> &Prompts {
        &self.prompts
    }

    fn forward_error(&self, source: candle_core::Error) -> EmbedError {
        EmbedError::Forward {
            device: self.device_name(),
            source,
        }
    }

    /// Page images (any size; resized with `preprocess::resize_for_model`), batched by
    /// `batch_size_visual`.
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<MultiVector>, EmbedError> {
        let size = self.image_size();
        let mut out = Vec::with_capacity(images.len());
        for batch in images.chunks(self.batch_size_visual) {
            let mut pixels = Vec::with_capacity(batch.len() * 3 * (size * size) as usize);
            for img in batch {
                pixels.extend(preprocess::pixel_values_with(
                    img,
                    size,
                    &self.normalization,
                ));
            }
            let t = Tensor::from_vec(
                pixels,
                (batch.len(), 3, size as usize, size as usize),
                &candle_core::Device::Cpu,
            )
            .map_err(|e| self.forward_error(e))?;
            out.extend(self.embed_pixel_values(&t)?);
        }
        Ok(out)
    }

    /// Already preprocessed pages (B, 3, S, S) f32: what the reference's processor produces.
    pub fn embed_pixel_values(&self, pixels: &Tensor) -> Result<Vec<MultiVector>, EmbedError> {
        let rows = self
            .model
            .forward_images(pixels, self.prompts.document_suffix())
            .map_err(|e| self.forward_error(e))?;
        Ok(rows
            .into_iter()
            .map(|r| to_multivector(r, self.model.config().embedding_dim))
            .collect())
    }

    /// Queries, and text chunks (DocuSearch embeds chunks through the query prompt), batched by
    /// `batch_size_text`.
    pub fn embed_queries(&self, texts: &[&str]) -> Result<Vec<MultiVector>, EmbedError> {
        let max_len = self.model.config().text.max_position_embeddings;
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch_size_text) {
            let mut ids = Vec::with_capacity(batch.len());
            for t in batch {
                let mut seq = self.prompts.query_ids(t)?;
                if seq.len() > max_len {
                    // Once as a warning, then at debug level: with a short-context checkpoint
                    // every chunk of a folder would otherwise log the same line.
                    static WARNED: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    let msg = "text longer than the model's positions: truncated (further truncations are logged at debug level)";
                    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(tokens = seq.len(), max_len, "{msg}");
                    } else {
                        tracing::debug!(tokens = seq.len(), max_len, "{msg}");
                    }
                    seq.truncate(max_len);
                }
                ids.push(seq);
            }
            let rows = self
                .model
                .forward_texts(&ids)
                .map_err(|e| self.forward_error(e))?;
            out.extend(
                rows.into_iter()
                    .map(|r| to_multivector(r, self.model.config().embedding_dim)),
            );
        }
        Ok(out)
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }
}

fn to_multivector(rows: Vec<Vec<f32>>, dim: usize) -> MultiVector {
    let n = rows.len();
    MultiVector::new(n, dim, rows.into_iter().flatten().collect())
}
