//! `gpu-check`: what a machine with a GPU but no Rust toolchain and no network can check in a
//! few minutes, from a packaged binary and small fixtures (`scripts/gpu-check`):
//!
//! 1. parity: the tiny checkpoint on the device, in f32 and in bf16, against the reference
//!    outputs of colpali-engine committed in `tests/fixtures/colpali-reference`;
//! 2. speed at a given size (the real one by default) with random weights made on the device
//!    (no 6 GB file): build time, pages/s at several batch sizes, queries/s;
//! 3. real pages: documents rendered by PDFium (the agent's own extraction) and embedded.
//!
//! The same code runs on the CPU with a small configuration, which is how it is tested.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::{DeviceChoice, DtypeChoice, ExtractConfig, ModelConfig};
use crate::embed::{self, EmbedError, Embedder};
use crate::extract::{ExtractError, ExtractEvent, ExtractOptions, Extractor};
use crate::types::MultiVector;

/// What to check, and where the fixtures are.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub device: DeviceChoice,
    /// A folder holding `tiny-colpali/` and `colpali-reference/` (the repo's tests/fixtures).
    pub fixtures: PathBuf,
    /// The `config.json` whose sizes the speed runs use.
    pub size_config: PathBuf,
    /// Page batch sizes to time.
    pub batches: Vec<usize>,
    /// Queries per timed batch.
    pub query_batch: usize,
    /// Timed runs per batch size (after one untimed warm-up); the median is reported.
    pub rounds: usize,
    /// Documents to render and embed; none skips part 3.
    pub documents: Vec<PathBuf>,
    /// At most this many pages of them.
    pub max_pages: usize,
    /// The executable that runs `extract-worker` (this one).
    pub worker_exe: PathBuf,
    pub pdfium: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ParityRow {
    pub dtype: String,
    /// Largest |difference| of any output value against the reference (unit vectors).
    pub max_abs_diff: f32,
    /// Largest relative difference of a MaxSim score against the reference's.
    pub max_score_rel_diff: f32,
    pub limit: f32,
    pub ok: bool,
}

#[derive(Debug, Clone)]
pub struct SpeedRow {
    /// "pages" or "queries".
    pub what: &'static str,
    pub batch: usize,
    /// Median seconds per batch.
    pub secs: f64,
    pub per_s: f64,
}

#[derive(Debug, Clone)]
pub struct CorpusRow {
    pub documents: usize,
    pub pages: usize,
    pub render_secs: f64,
    pub embed_secs: f64,
    pub pages_per_s: f64,
}

#[derive(Debug, Clone)]
pub struct CheckReport {
    pub device: String,
    pub dtype: String,
    pub placement_reason: String,
    /// "vision 1152x27, text 2048x18, 1024 image tokens".
    pub size: String,
    pub parity: Vec<ParityRow>,
    /// Seconds to make the random model on the device.
    pub build_secs: f64,
    pub speed: Vec<SpeedRow>,
    pub corpus: Option<CorpusRow>,
}

impl CheckReport {
    pub fn parity_ok(&self) -> bool {
        self.parity.iter().all(|p| p.ok)
    }
}

/// Why the check could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("reference outputs {path}: {message} — point --fixtures at the package's (or the repo's tests/) fixtures folder")]
    Reference { path: PathBuf, message: String },
    #[error("{0}")]
    Extract(String),
}

/// Runs the three parts.
pub fn run(opts: &CheckOptions) -> Result<CheckReport, CheckError> {
    let mut parity = Vec::new();
    for (dtype, limit) in [
        (DtypeChoice::F32, F32_LIMIT),
        (DtypeChoice::Bf16, BF16_LIMIT),
    ] {
        parity.push(parity_row(opts, dtype, limit)?);
    }

    let size_cfg = embed::read_config(&opts.size_config)?;
    let model_cfg = ModelConfig {
        device: opts.device,
        dtype: DtypeChoice::Auto,
        batch_size_visual: opts.batches.iter().copied().max().unwrap_or(1),
        batch_size_text: opts.query_batch.max(1),
        ..ModelConfig::default()
    };
    let tokenizer = opts.fixtures.join("tiny-colpali/tokenizer.json");
    let started = Instant::now();
    let embedder = Embedder::random(&size_cfg, &tokenizer, &model_cfg)?;
    // A tiny forward so the build's queued work on the device is finished before timing stops.
    embedder.embed_queries(&["warm"])?;
    let build_secs = started.elapsed().as_secs_f64();

    let s = embedder.image_size() as usize;
    let mut speed = Vec::new();
    for &b in &opts.batches {
        let pixels = Tensor::rand(-1f32, 1f32, (b, 3, s, s), &Device::Cpu).map_err(forward)?;
        let secs = median_secs(opts.rounds, || {
            embedder.embed_pixel_values(&pixels).map(drop)
        })?;
        speed.push(SpeedRow {
            what: "pages",
            batch: b,
            secs,
            per_s: b as f64 / secs,
        });
    }
    let queries: Vec<&str> = QUERIES
        .iter()
        .cycle()
        .take(opts.query_batch.max(1))
        .copied()
        .collect();
    let secs = median_secs(opts.rounds, || embedder.embed_queries(&queries).map(drop))?;
    speed.push(SpeedRow {
        what: "queries",
        batch: queries.len(),
        secs,
        per_s: queries.len() as f64 / secs,
    });

    let corpus = if opts.documents.is_empty() {
        None
    } else {
        Some(corpus_row(opts, &embedder)?)
    };
    Ok(CheckReport {
        device: embedder.device_name(),
        dtype: embedder.dtype_name(),
        placement_reason: embedder.placement_reason().to_string(),
        size: format!(
            "vision {}x{}, text {}x{}, {} image tokens",
            size_cfg.vision.hidden_size,
            size_cfg.vision.num_hidden_layers,
            size_cfg.text.hidden_size,
            size_cfg.text.num_hidden_layers,
            size_cfg.vision.num_patches()
        ),
        parity,
        build_secs,
        speed,
        corpus,
    })
}

/// f32 on a GPU sums in another order than the CPU the reference ran on; 1e-4 holds on the CPU.
const F32_LIMIT: f32 = 1e-3;
/// bf16 keeps 8 bits of mantissa: unit vectors agree to a few hundredths (0.017 on the CPU).
const BF16_LIMIT: f32 = 0.05;

const QUERIES: [&str; 4] = [
    "What is R?",
    "How do I read a CSV file into a data frame?",
    "Which settings change the grid of the scatter plot, and where is the export dialog?",
    "Where are the release notes for the last version?",
];

fn forward(e: candle_core::Error) -> CheckError {
    CheckError::Embed(EmbedError::Forward {
        device: "check".into(),
        source: e,
    })
}

fn median_secs(
    rounds: usize,
    mut f: impl FnMut() -> Result<(), EmbedError>,
) -> Result<f64, CheckError> {
    f()?; // warm-up: kernels compiled and buffers allocated
    let mut times = Vec::with_capacity(rounds.max(1));
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn reference_error(path: &Path, message: impl Into<String>) -> CheckError {
    CheckError::Reference {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn parity_row(
    opts: &CheckOptions,
    dtype: DtypeChoice,
    limit: f32,
) -> Result<ParityRow, CheckError> {
    let ref_dir = opts.fixtures.join("colpali-reference");
    let st_path = ref_dir.join("reference.safetensors");
    let json_path = ref_dir.join("reference.json");
    let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
        .map_err(|e| reference_error(&st_path, e.to_string()))?;
    let json: serde_json::Value = std::fs::read_to_string(&json_path)
        .map_err(|e| reference_error(&json_path, e.to_string()))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| reference_error(&json_path, e.to_string()))
        })?;
    let get = |name: &str| -> Result<MultiVector, CheckError> {
        let t = tensors
            .get(name)
            .ok_or_else(|| reference_error(&st_path, format!("no tensor `{name}`")))?;
        let rows = t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(|e| reference_error(&st_path, e.to_string()))?;
        let dim = rows.first().map_or(0, Vec::len);
        Ok(MultiVector::new(
            rows.len(),
            dim,
            rows.into_iter().flatten().collect(),
        ))
    };
    let queries: Vec<String> = json["queries"]
        .as_array()
        .ok_or_else(|| reference_error(&json_path, "no `queries` list"))?
        .iter()
        .filter_map(|q| q.as_str().map(String::from))
        .collect();
    let pixels = tensors
        .get("pixel_values")
        .ok_or_else(|| reference_error(&st_path, "no tensor `pixel_values`"))?;

    let cfg = ModelConfig {
        name: opts.fixtures.join("tiny-colpali").display().to_string(),
        device: opts.device,
        dtype,
        batch_size_visual: 8,
        batch_size_text: 8,
        offline: true,
        ..ModelConfig::default()
    };
    let embedder = Embedder::load(&cfg)?;
    let pages = embedder.embed_pixel_values(pixels)?;
    let texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let got_q = embedder.embed_queries(&texts)?;

    let mut worst = 0f32;
    let mut ref_pages = Vec::new();
    for (i, mv) in pages.iter().enumerate() {
        let want = get(&format!("image_{i}"))?;
        worst = worst.max(max_abs_diff(mv, &want));
        ref_pages.push(want);
    }
    let mut worst_score = 0f32;
    for (qi, mv) in got_q.iter().enumerate() {
        worst = worst.max(max_abs_diff(mv, &get(&format!("query_{qi}"))?));
        for (pi, page) in pages.iter().enumerate() {
            let want = json["scores"][qi][pi]
                .as_f64()
                .ok_or_else(|| reference_error(&json_path, format!("no score [{qi}][{pi}]")))?
                as f32;
            worst_score = worst_score.max((mv.maxsim(page) - want).abs() / want.abs().max(1e-6));
        }
    }
    Ok(ParityRow {
        dtype: embedder.dtype_name(),
        max_abs_diff: worst,
        max_score_rel_diff: worst_score,
        limit,
        ok: worst < limit && worst.is_finite(),
    })
}

/// Largest |a − b| over all values; infinite when the shapes differ.
fn max_abs_diff(a: &MultiVector, b: &MultiVector) -> f32 {
    if (a.rows, a.dim) != (b.rows, b.dim) {
        return f32::INFINITY;
    }
    (0..a.rows)
        .flat_map(|r| a.row(r).iter().zip(b.row(r)).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max)
}

fn corpus_row(opts: &CheckOptions, embedder: &Embedder) -> Result<CorpusRow, CheckError> {
    let extract_cfg = ExtractConfig {
        pdfium_path: opts.pdfium.clone(),
        ..ExtractConfig::default()
    };
    let options =
        ExtractOptions::from_config(&extract_cfg, embedder.image_size(), opts.worker_exe.clone());
    let extractor = Extractor::new(options).map_err(|e| CheckError::Extract(e.to_string()))?;
    let mut images = Vec::new();
    let mut documents = 0;
    let started = Instant::now();
    for doc in &opts.documents {
        if images.len() >= opts.max_pages {
            break;
        }
        documents += 1;
        let mut sink = |ev: ExtractEvent| {
            if let ExtractEvent::Page(p) = ev {
                images.extend(p.image);
            }
            if images.len() >= opts.max_pages {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        match extractor.extract(doc, &mut sink) {
            Ok(_) => {}
            // The sink stopped it: enough pages.
            Err(ExtractError::Stopped { .. }) if images.len() >= opts.max_pages => {}
            Err(e) => return Err(CheckError::Extract(e.to_string())),
        }
    }
    let render_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let out = embedder.embed_images(&images)?;
    let embed_secs = started.elapsed().as_secs_f64();
    if out.len() != images.len() {
        return Err(CheckError::Extract(format!(
            "{} pages rendered but {} embedded",
            images.len(),
            out.len()
        )));
    }
    Ok(CorpusRow {
        documents,
        pages: images.len(),
        render_secs,
        embed_secs,
        pages_per_s: images.len() as f64 / (render_secs + embed_secs),
    })
}

/// The report as one table, for a person.
pub fn render(r: &CheckReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "gpu-check on {} ({})",
        r.device, r.placement_reason
    ));
    line(format!(
        "{:<44} {:>14} {:>10}",
        "check", "result", "verdict"
    ));
    for p in &r.parity {
        line(format!(
            "{:<44} {:>14} {:>10}",
            format!("parity {} max|diff| vs reference (< {})", p.dtype, p.limit),
            format!("{:.2e}", p.max_abs_diff),
            if p.ok { "ok" } else { "FAIL" }
        ));
        line(format!(
            "{:<44} {:>14} {:>10}",
            format!("parity {} MaxSim score, max relative diff", p.dtype),
            format!("{:.2e}", p.max_score_rel_diff),
            ""
        ));
    }
    line(format!("size: {}, {}, random weights", r.size, r.dtype));
    line(format!(
        "{:<44} {:>14} {:>10}",
        "build the random model on the device",
        format!("{:.2} s", r.build_secs),
        ""
    ));
    for s in &r.speed {
        line(format!(
            "{:<44} {:>14} {:>10}",
            format!("{} at batch {}", s.what, s.batch),
            format!("{:.2}/s", s.per_s),
            format!("{:.3} s", s.secs)
        ));
    }
    if let Some(c) = &r.corpus {
        line(format!(
            "{:<44} {:>14} {:>10}",
            format!(
                "{} PDF pages of {} documents: render + embed",
                c.pages, c.documents
            ),
            format!("{:.2}/s", c.pages_per_s),
            format!("{:.1}+{:.1} s", c.render_secs, c.embed_secs)
        ));
    }
    out
}
