//! ColPali's forward pass (SigLIP vision tower → projector → Gemma, bidirectional → final norm →
//! `custom_text_proj` → L2 norm), written to equal colpali-engine on the same weights.
//!
//! Owned rather than wrapped from candle-transformers because its `colpali`/`gemma` differ from
//! the reference: Gemma there is causal with no padding mask, skips the final norm on this path,
//! builds RoPE tables in the weight dtype (bf16 rounds positions above 256) and scales image
//! features differently. The tensor names asked of the `VarBuilder` are the merged checkpoint's.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::{ColPaliConfig, TextConfig, VisionConfig};
use super::ops;

type Result<T> = candle_core::Result<T>;

/// y = x·Wᵀ + b over the last axis. The leading axes are flattened first, so a batch of pages
/// is one large matrix product rather than one per page (candle's `Linear` broadcasts the
/// weight per batch item).
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// Inputs of at most this many rows take the weight-major product in [`Linear::forward`].
const SMALL_ROWS: usize = 64;

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = dims
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, *last))?;
        // A few rows (a query): W·xᵀ reads the weight once in its own row-major layout, where
        // x·Wᵀ has gemm pack the whole transposed weight first (one 30-token query on the
        // full-size model: 2.6 s -> 1.0-1.4 s on 2 cores).
        let y = if rows <= SMALL_ROWS {
            self.weight.matmul(&x2.t()?)?.t()?.contiguous()?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight.dim(0)?);
        y.reshape(out_dims)
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let w = vb.get(dim, "weight")?;
    let b = vb.get(dim, "bias")?;
    Ok(LayerNorm::new(w, b, eps))
}

/// Bytes of attention scores held at once. A whole batch's scores are a forward's largest
/// allocation (8 text chunks of ~1,000 tokens with 8 heads: ~256 MB in f32), so a larger batch
/// goes through attention a few items at a time; the matmuls stay large.
const SCORES_BYTES: usize = 32 << 20;

/// softmax(q·kᵀ·scale)·v for q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H a multiple of Hkv
/// (grouped-query attention without copying k and v). No mask: sequences are never padded.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_in_blocks(q, k, v, scale, SCORES_BYTES)
}

/// [`attention`] over as many batch items at a time as keep the scores within `max_bytes`
/// (at least one).
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_bytes: usize,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let per_item = (h * lq * lk * q.dtype().size_in_bytes()).max(1);
    let items = (max_bytes / per_item).clamp(1, b.max(1));
    if items >= b {
        return attention_block(q, k, v, scale);
    }
    let mut outs = Vec::with_capacity(b.div_ceil(items));
    for start in (0..b).step_by(items) {
        let n = items.min(b - start);
        outs.push(attention_block(
            &q.narrow(0, start, n)?,
            &k.narrow(0, start, n)?,
            &v.narrow(0, start, n)?,
            scale,
        )?);
    }
    Tensor::cat(&outs, 0)
}

fn attention_block(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let groups = h / hkv;
    // Heads of one group share k and v: stack their queries along the sequence axis.
    let q = q.reshape((b, hkv, groups * lq, d))?;
    let scores = q.matmul(&k.t()?)?.reshape((b, h, lq, ()))?;
    let probs = ops::scaled_softmax(scores, scale)?;
    let probs = probs.reshape((b, hkv, groups * lq, ()))?;
    probs.matmul(v)?.reshape((b, h, lq, d))
}

struct VisionLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("self_attn");
        Ok(VisionLayer {
            layer_norm1: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: linear(h, h, true, att.pp("q_proj"))?,
            k_proj: linear(h, h, true, att.pp("k_proj"))?,
            v_proj: linear(h, h, true, att.pp("v_proj"))?,
            out_proj: linear(h, h, true, att.pp("out_proj"))?,
            layer_norm2: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.intermediate_size, true, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, h, true, vb.pp("mlp").pp("fc2"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let x = self.layer_norm1.forward(xs)?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(&x)?)?;
        let k = heads(self.k_proj.forward(&x)?)?;
        let v = heads(self.v_proj.forward(&x)?)?;
        let a = attention(&q, &k, &v, (self.head_dim as f64).powf(-0.5))?;
        let a = a.transpose(1, 2)?.reshape((b, l, ()))?;
        let xs = (xs + self.out_proj.forward(&a)?)?;
        let x = self.layer_norm2.forward(&xs)?;
        let x = ops::gelu_tanh(self.fc1.forward(&x)?)?;
        xs + self.fc2.forward(&x)?
    }
}

/// SigLIP vision tower without its pooling head, plus PaliGemma's multi-modal projector.
struct VisionTower {
    /// The patch convolution as a matrix (hidden, channels·patch·patch): stride = kernel, so a
    /// convolution is one matmul over the unfolded patches.
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
    projector: Linear,
    cfg: VisionConfig,
}

impl VisionTower {
    fn new(
        cfg: &VisionConfig,
        projection_dim: usize,
        vb: VarBuilder,
        vb_proj: VarBuilder,
    ) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let p = cfg.patch_size;
        let patch_weight = emb
            .pp("patch_embedding")
            .get((cfg.hidden_size, cfg.num_channels, p, p), "weight")?;
        let patch_bias = emb.pp("patch_embedding").get(cfg.hidden_size, "bias")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.num_patches(), cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionLayer::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch_weight,
            patch_bias,
            position_embedding,
            layers,
            post_layernorm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("post_layernorm"),
            )?,
            projector: linear(cfg.hidden_size, projection_dim, true, vb_proj.pp("linear"))?,
            cfg: cfg.clone(),
        })
    }

    /// (B, C, H, W) normalised pixels → (B, patches, projection_dim) image features.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (nh, nw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, nh, p, nw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, nh * nw, c * p * p))?;
        let weight = self
            .patch_weight
            .reshape((self.cfg.hidden_size, c * p * p))?;
        let mut xs = Linear::new(weight, Some(self.patch_bias.clone())).forward(&patches)?;
        xs = xs.broadcast_add(&self.position_embedding)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        let xs = self.post_layernorm.forward(&xs)?;
        self.projector.forward(&xs)
    }
}

/// Gemma's RMSNorm: x / rms(x) · (1 + w), computed in f32.
struct RmsNorm {
    /// 1 + w, precomputed in the compute dtype.
    scale: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let w = vb.get(dim, "weight")?;
        Ok(RmsNorm {
            scale: (w + 1.0)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if dtype == DType::F32 && x.is_contiguous() {
            // candle's fused kernel: the same arithmetic in one pass.
            return candle_nn::ops::rms_norm(x, &self.scale, self.eps as f32);
        }
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        let scale = self.scale.to_dtype(DType::F32)?;
        normed.broadcast_mul(&scale)?.to_dtype(dtype)
    }
}

struct TextLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl TextLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let d = cfg.head_dim;
        let att = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(TextLayer {
            input_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            q_proj: linear(h, cfg.num_attention_heads * d, false, att.pp("q_proj"))?,
            k_proj: linear(h, cfg.num_key_value_heads * d, false, att.pp("k_proj"))?,
            v_proj: linear(h, cfg.num_key_value_heads * d, false, att.pp("v_proj"))?,
            o_proj: linear(cfg.num_attention_heads * d, h, false, att.pp("o_proj"))?,
            post_attention_layernorm: RmsNorm::new(
                h,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            gate_proj: linear(h, cfg.intermediate_size, false, mlp.pp("gate_proj"))?,
            up_proj: linear(h, cfg.intermediate_size, false, mlp.pp("up_proj"))?,
            down_proj: linear(cfg.intermediate_size, h, false, mlp.pp("down_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `xs` (T, hidden): the rows of every sequence one after another, no padding.
    fn forward(&self, xs: &Tensor, rope: &Rope, seqs: &Sequences) -> Result<Tensor> {
        let x = self.input_layernorm.forward(xs)?;
        let q = self.q_proj.forward(&x)?;
        let k = self.k_proj.forward(&x)?;
        let v = self.v_proj.forward(&x)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        // Attention within each sequence; sequences of one length go through together.
        let mut outs = Vec::with_capacity(seqs.groups.len());
        for &(start, count, len) in &seqs.groups {
            let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
                t.narrow(0, start, count * len)?
                    .reshape((count, len, n, self.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = rope.apply(&heads(&q, self.num_heads)?)?;
            let k = rope.apply(&heads(&k, self.num_kv_heads)?)?;
            let v = heads(&v, self.num_kv_heads)?;
            let a = attention(&q, &k, &v, scale)?;
            outs.push(a.transpose(1, 2)?.reshape((count * len, ()))?);
        }
        // One group (a batch of pages, or of equal-length texts): `cat` hands it back as it is.
        let a = Tensor::cat(&outs, 0)?;
        let xs = (xs + self.o_proj.forward(&a)?)?;
        let x = self.post_attention_layernorm.forward(&xs)?;
        let x = ops::gelu_mul(self.gate_proj.forward(&x)?, &self.up_proj.forward(&x)?)?;
        xs + self.down_proj.forward(&x)?
    }
}

/// Where each sequence's rows are in a packed (T, hidden) batch, as runs of sequences of the
/// same length: (first row, sequences, length). A batch of pages is one run; text chunks of
/// different lengths are one run each, so no row is padding and no attention is masked.
struct Sequences {
    groups: Vec<(usize, usize, usize)>,
}

impl Sequences {
    fn new(lens: &[usize]) -> Sequences {
        let mut groups: Vec<(usize, usize, usize)> = Vec::new();
        let mut start = 0;
        for &len in lens {
            match groups.last_mut() {
                Some((_, count, l)) if *l == len => *count += 1,
                _ => groups.push((start, 1, len)),
            }
            start += len;
        }
        Sequences { groups }
    }
}

/// Rotary tables computed in f32 for every position (then cast), as transformers does; PaliGemma
/// numbers positions from 1.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &TextConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64) as f32))
            .collect();
        let n = cfg.max_position_embeddings + 1;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for pos in 0..n {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
        })
    }

    /// x (B, H, L, D) at positions 1..=L.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let l = x.dim(2)?;
        let cos = self.cos.narrow(0, 1, l)?;
        let sin = self.sin.narrow(0, 1, l)?;
        candle_nn::rotary_emb::rope(x, &cos, &sin)
    }
}

/// Gemma run as an encoder: bidirectional attention within each sequence, final norm applied.
struct TextModel {
    embed_tokens: Tensor,
    layers: Vec<TextLayer>,
    norm: RmsNorm,
    rope: Rope,
    cfg: TextConfig,
}

impl TextModel {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let embed_tokens = vb
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| TextLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(TextModel {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            rope: Rope::new(cfg, vb.dtype(), vb.device())?,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings (T, hidden) of the ids `ids` (T), scaled by √hidden, as Gemma does for
    /// text tokens (not for image features).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.index_select(ids, 0)? * (self.cfg.hidden_size as f64).sqrt()
    }

    /// `embeds` (T, hidden): packed sequences, see [`Sequences`].
    fn forward(&self, embeds: &Tensor, seqs: &Sequences) -> Result<Tensor> {
        let mut xs = embeds.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, &self.rope, seqs)?;
        }
        self.norm.forward(&xs)
    }
}

/// The whole ColPali model on one device, in one dtype.
pub struct ColPaliModel {
    vision: VisionTower,
    text: TextModel,
    custom_text_proj: Linear,
    cfg: ColPaliConfig,
    device: Device,
    dtype: DType,
}

/// One forward's output: per sequence, its L2-normalised vectors.
pub type Rows = Vec<Vec<f32>>;

impl ColPaliModel {
    /// Builds the model from a `VarBuilder` over the merged layout's names
    /// (`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
    /// `model.language_model.model.*`, `custom_text_proj.*`). Only asks for tensors; it does not
    /// copy or transform them, so a recording `VarBuilder` sees exactly what is read.
    pub fn new(cfg: &ColPaliConfig, vb: VarBuilder) -> Result<Self> {
        let m = vb.pp("model");
        let vision = VisionTower::new(
            &cfg.vision,
            cfg.projection_dim,
            m.pp("vision_tower").pp("vision_model"),
            m.pp("multi_modal_projector"),
        )?;
        let text = TextModel::new(&cfg.text, m.pp("language_model").pp("model"))?;
        let custom_text_proj = linear(
            cfg.text.hidden_size,
            cfg.embedding_dim,
            true,
            vb.pp("custom_text_proj"),
        )?;
        Ok(ColPaliModel {
            vision,
            text,
            custom_text_proj,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &ColPaliConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Pages: `pixels` (B, C, S, S) normalised, `prompt_ids` the token ids after the image tokens
    /// (`<bos>`, prompt, `\n`), the same for every page. Returns B multi-vectors of
    /// (patches + prompt length) rows.
    pub fn forward_images(&self, pixels: &Tensor, prompt_ids: &[u32]) -> Result<Vec<Rows>> {
        let b = pixels.dim(0)?;
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        let image = self.vision.forward(&pixels)?;
        let ids = Tensor::from_vec(prompt_ids.repeat(b), b * prompt_ids.len(), &self.device)?;
        let prompt =
            self.text
                .embed(&ids)?
                .reshape((b, prompt_ids.len(), self.cfg.text.hidden_size))?;
        let embeds = Tensor::cat(&[&image, &prompt], 1)?;
        let l = embeds.dim(1)?;
        self.encode(&embeds.reshape((b * l, ()))?, &vec![l; b])
    }

    /// Queries (or text chunks): each sequence's full token ids. They go through packed, one
    /// after another, with no padding to the longest.
    pub fn forward_texts(&self, ids: &[Vec<u32>]) -> Result<Vec<Rows>> {
        let flat: Vec<u32> = ids.concat();
        let t = flat.len();
        let embeds = self.text.embed(&Tensor::from_vec(flat, t, &self.device)?)?;
        let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        self.encode(&embeds, &lens)
    }

    /// `embeds` (T, hidden): the sequences of lengths `lens`, packed.
    fn encode(&self, embeds: &Tensor, lens: &[usize]) -> Result<Vec<Rows>> {
        let hidden = self.text.forward(embeds, &Sequences::new(lens))?;
        let proj = self
            .custom_text_proj
            .forward(&hidden)?
            .to_dtype(DType::F32)?;
        let norm = proj.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let mut rows = proj
            .broadcast_div(&norm)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?
            .into_iter();
        Ok(lens
            .iter()
            .map(|&n| rows.by_ref().take(n).collect())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of equal lengths share a group; a new length, even one seen before, starts one.
    #[test]
    fn sequences_group_runs_of_equal_length() {
        let seqs = Sequences::new(&[3, 3, 5, 3, 2, 2]);
        assert_eq!(
            seqs.groups,
            vec![(0, 2, 3), (6, 1, 5), (11, 1, 3), (14, 2, 2)]
        );
        assert!(Sequences::new(&[]).groups.is_empty());
    }

    /// Attention a few batch items at a time gives what the whole batch at once gives, with
    /// grouped-query heads.
    #[test]
    fn attention_in_blocks_equals_the_whole_batch() {
        let dev = Device::Cpu;
        let (b, h, hkv, l, d) = (5, 4, 2, 7, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, hkv, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, hkv, l, d), &dev).unwrap();
        let whole = attention_in_blocks(&q, &k, &v, 0.35, usize::MAX).unwrap();
        let item = h * l * l * 4;
        for max_bytes in [1, item, 2 * item, 3 * item] {
            let blocks = attention_in_blocks(&q, &k, &v, 0.35, max_bytes).unwrap();
            assert_eq!(blocks.dims(), whole.dims());
            let diff = max_abs_diff(&blocks, &whole);
            assert!(diff <= 1e-6, "max_bytes {max_bytes}: {diff}");
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("same shapes")
    }
}
