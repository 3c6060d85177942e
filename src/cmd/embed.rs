//! `embed` and `model fetch`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;

use docusearch_agent::embed::{loader, EmbedError, Embedder};
use docusearch_agent::types::MultiVector;

use super::{Context, EmbedArgs, GpuCheckArgs};

fn rows_json(mv: &MultiVector) -> Vec<&[f32]> {
    (0..mv.rows).map(|r| mv.row(r)).collect()
}

/// All items in one call, or with `--timings` one item per call, timed; each time is also logged
/// as it happens, so a benchmark reading the log sees when the first page is ready.
fn embed_each<T>(
    items: &[T],
    timed: bool,
    what: &str,
    embed: impl Fn(&[T]) -> Result<Vec<MultiVector>, EmbedError>,
) -> Result<(Vec<MultiVector>, Vec<f64>), EmbedError> {
    if !timed {
        return Ok((embed(items)?, Vec::new()));
    }
    let mut vecs = Vec::with_capacity(items.len());
    let mut secs = Vec::with_capacity(items.len());
    for (i, item) in items.chunks(1).enumerate() {
        let started = Instant::now();
        vecs.extend(embed(item)?);
        let s = started.elapsed().as_secs_f64();
        tracing::info!(what, n = i + 1, secs = %format!("{s:.3}"), "embedded");
        secs.push(s);
    }
    Ok((vecs, secs))
}

pub fn embed_command(ctx: &Context, args: EmbedArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = ctx.config.model.clone();
    if let Some(m) = args.model {
        cfg.name = m;
    }
    let mut images = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let img = image::open(path).with_context(|| {
            format!(
                "cannot read image {} (PNG, JPEG, TIFF, WebP, BMP or GIF)",
                path.display()
            )
        })?;
        images.push(img.to_rgb8());
    }
    let load_started = Instant::now();
    let embedder = Embedder::load(&cfg)?;
    let load_secs = load_started.elapsed().as_secs_f64();
    let (image_vecs, image_secs) =
        embed_each(&images, args.timings, "page", |b| embedder.embed_images(b))?;
    let texts: Vec<&str> = args.queries.iter().map(String::as_str).collect();
    let (query_vecs, query_secs) =
        embed_each(&texts, args.timings, "query", |b| embedder.embed_queries(b))?;
    let scores: Vec<Vec<f32>> = query_vecs
        .iter()
        .map(|q| image_vecs.iter().map(|d| q.maxsim(d)).collect())
        .collect();

    if args.json {
        let mut out = json!({
            "model": embedder.model_id(),
            "device": embedder.device_name(),
            "dtype": embedder.dtype_name(),
            "images": args.images.iter().zip(&image_vecs).map(|(p, v)| json!({
                "path": p.display().to_string(),
                "shape": [v.rows, v.dim],
                "embedding": rows_json(v),
            })).collect::<Vec<_>>(),
            "queries": args.queries.iter().zip(&query_vecs).map(|(t, v)| json!({
                "text": t,
                "shape": [v.rows, v.dim],
                "embedding": rows_json(v),
            })).collect::<Vec<_>>(),
            "scores": scores,
        });
        if args.timings {
            out["timings"] = json!({
                "load_secs": load_secs,
                "images_secs": image_secs,
                "queries_secs": query_secs,
            });
        }
        println!("{out}");
    } else {
        println!(
            "model {} on {} ({})",
            embedder.model_id(),
            embedder.device_name(),
            embedder.dtype_name()
        );
        for (p, v) in args.images.iter().zip(&image_vecs) {
            println!("image {}: {} x {}", p.display(), v.rows, v.dim);
        }
        for (q, (t, v)) in args.queries.iter().zip(&query_vecs).enumerate() {
            let s: Vec<String> = scores[q].iter().map(|x| format!("{x:.4}")).collect();
            println!(
                "query {t:?}: {} x {}; MaxSim per image: [{}]",
                v.rows,
                v.dim,
                s.join(", ")
            );
        }
        if args.timings {
            let list = |v: &[f64]| {
                v.iter()
                    .map(|s| format!("{s:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "seconds: load {load_secs:.3}; images [{}]; queries [{}]",
                list(&image_secs),
                list(&query_secs)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fetch_command(
    ctx: &Context,
    model: Option<String>,
    revision: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut cfg = ctx.config.model.clone();
    if let Some(m) = model {
        cfg.name = m;
    }
    if let Some(r) = revision {
        cfg.revision = r;
    }
    // Fetching means downloading, whatever `offline` says for the agent's own runs.
    cfg.offline = false;
    let files = loader::resolve(&cfg)?;
    println!("model {} ready:", files.id);
    for f in std::iter::once(&files.config)
        .chain(std::iter::once(&files.tokenizer))
        .chain(files.weights.iter())
    {
        println!("  {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `gpu-check`: the table on stdout; exit 1 when a parity check fails.
pub fn gpu_check_command(ctx: &Context, args: GpuCheckArgs) -> anyhow::Result<ExitCode> {
    use docusearch_agent::gpu_check;
    let size_config = args
        .size_config
        .unwrap_or_else(|| args.fixtures.join("colpali-v1.2-merged/config.json"));
    let opts = gpu_check::CheckOptions {
        device: args.device,
        fixtures: args.fixtures,
        size_config,
        batches: args.batches,
        query_batch: args.query_batch,
        rounds: args.rounds,
        documents: args.documents,
        max_pages: args.max_pages,
        worker_exe: std::env::current_exe().context("cannot find this executable")?,
        pdfium: ctx.config.extract.pdfium_path.clone(),
    };
    let report = gpu_check::run(&opts)?;
    print!("{}", gpu_check::render(&report));
    Ok(if report.parity_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
