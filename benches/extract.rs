//! Extraction throughput: pages/s for render (150 DPI) + resize (448×448) + page text on the
//! corpus PDFs, through the agent's real isolated worker (kept across documents, as in the
//! agent), next to pypdfium2 + Pillow doing the same work on the same PDFium build in the same
//! run.
//!
//! `cargo bench --bench extract` (after `scripts/setup`). The Python side needs pypdfium2 and
//! Pillow: it runs `DOCUSEARCH_BENCH_PYTHON` if set, else scripts/setup's Python.
//! `DOCUSEARCH_BENCH_REPEATS` (default 3) passes each; medians are reported.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use docusearch_agent::config::ExtractConfig;
use docusearch_agent::extract::{ExtractEvent, ExtractOptions, Extractor};
use docusearch_agent::runtime_paths;

const FILES: [&str; 4] = [
    "R-intro.pdf",
    "R-data.pdf",
    "asyRefCard.pdf",
    "xfig-howto.pdf",
];
const SIZE: u32 = 448;

#[derive(Debug, Clone, Copy)]
struct Pass {
    pages: usize,
    words: usize,
    seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rust_pass(ex: &Extractor, files: &[PathBuf]) -> Result<Pass, String> {
    let (mut pages, mut words) = (0, 0);
    let start = Instant::now();
    for f in files {
        ex.extract(f, &mut |ev| {
            if let ExtractEvent::Page(p) = ev {
                pages += 1;
                words += p.text.split_whitespace().count();
            }
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(Pass {
        pages,
        words,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn python_passes(
    python: &Path,
    files: &[PathBuf],
    repeats: usize,
) -> Result<(Vec<Pass>, String, String), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/extract_pypdfium2.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["150", &SIZE.to_string(), &repeats.to_string()])
        .args(files)
        .output()
        .map_err(|e| format!("could not run {}: {e}", python.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} said nothing useful ({e}): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = json.get("error") {
        return Err(format!("{}: {err}", python.display()));
    }
    let runs = json["runs"]
        .as_array()
        .ok_or("no runs in the Python output")?;
    let passes = runs
        .iter()
        .map(|r| Pass {
            pages: r["pages"].as_u64().unwrap_or(0) as usize,
            words: r["words"].as_u64().unwrap_or(0) as usize,
            seconds: r["seconds"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    let split = {
        let total = |k: &str| {
            runs.iter()
                .map(|r| r[k].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / runs.len() as f64
        };
        let pages = runs[0]["pages"].as_f64().unwrap_or(1.0);
        format!(
            "render {:.1} ms, resize {:.1} ms, text {:.2} ms per page",
            1e3 * total("render") / pages,
            1e3 * total("resize") / pages,
            1e3 * total("text") / pages
        )
    };
    Ok((passes, json["versions"].to_string(), split))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench extract: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let repeats: usize = std::env::var("DOCUSEARCH_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus");
    let files: Vec<PathBuf> = FILES.iter().map(|f| corpus.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(format!("corpus file {} is missing", missing.display()));
    }
    let pdfium = runtime_paths::find_pdfium(None).map_err(|e| e.to_string())?;
    let python = match std::env::var_os("DOCUSEARCH_BENCH_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => runtime_paths::find_setup_python().map_err(|e| e.to_string())?,
    };

    let cfg = ExtractConfig {
        pdfium_path: Some(pdfium.clone()),
        ..ExtractConfig::default()
    };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_docusearch-agent"));
    let ex =
        Extractor::new(ExtractOptions::from_config(&cfg, SIZE, exe)).map_err(|e| e.to_string())?;

    println!(
        "extraction benchmark: {} PDFs from the corpus, {} DPI, resize to {SIZE}x{SIZE}, page text",
        files.len(),
        cfg.render_dpi
    );
    println!("PDFium: {}", pdfium.display());
    // One warm-up pass each way fills the page cache and the dynamic loader's caches.
    rust_pass(&ex, &files[2..3])?;
    let rust: Vec<Pass> = (0..repeats)
        .map(|_| rust_pass(&ex, &files))
        .collect::<Result<_, _>>()?;
    let (py, versions, split) = python_passes(&python, &files, repeats + 1)?;
    let py = py[1..].to_vec();

    // Per-document cost of isolation, on a tiny file: through the worker kept between
    // documents (what the agent pays), and through a fresh worker that starts and exits (what
    // a worker of its own would cost; a new extractor has none kept).
    let tiny = std::env::temp_dir().join(format!("docusearch-bench-{}.txt", std::process::id()));
    std::fs::write(&tiny, "a few words").map_err(|e| e.to_string())?;
    let mut kept_s = 0.0;
    let mut fresh_s = 0.0;
    for _ in 0..20 {
        let t = Instant::now();
        ex.extract(&tiny, &mut |_| ControlFlow::Continue(()))
            .map_err(|e| e.to_string())?;
        kept_s += t.elapsed().as_secs_f64();
        let fresh = Extractor::new(ex.options().clone()).map_err(|e| e.to_string())?;
        let t = Instant::now();
        fresh
            .extract(&tiny, &mut |_| ControlFlow::Continue(()))
            .map_err(|e| e.to_string())?;
        fresh_s += t.elapsed().as_secs_f64();
    }
    let _ = std::fs::remove_file(&tiny);

    let (rp, pp) = (rust[0], py[0]);
    if rp.pages != pp.pages {
        return Err(format!(
            "page counts differ: Rust {} vs Python {}",
            rp.pages, pp.pages
        ));
    }
    let rust_s = median(rust.iter().map(|p| p.seconds).collect());
    let py_s = median(py.iter().map(|p| p.seconds).collect());
    let (rust_rate, py_rate) = (rp.pages as f64 / rust_s, pp.pages as f64 / py_s);
    println!("Python side: {} ({versions})", python.display());
    println!("pypdfium2 split: {split}");
    println!();
    println!("| path | pages | words | median s / pass | ms / page | pages/s |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| Rust: isolated worker (pdfium-render + Pillow-exact resize) | {} | {} | {:.2} | {:.1} | {:.1} |",
        rp.pages, rp.words, rust_s, 1e3 * rust_s / rp.pages as f64, rust_rate
    );
    println!(
        "| Python: pypdfium2 + Pillow | {} | {} | {:.2} | {:.1} | {:.1} |",
        pp.pages,
        pp.words,
        py_s,
        1e3 * py_s / pp.pages as f64,
        py_rate
    );
    println!();
    println!(
        "ratio Rust / Python: {:.2}x the pages per second ({repeats} passes each, medians)",
        rust_rate / py_rate
    );
    println!(
        "per document (tiny text file): {:.2} ms through the kept worker, {:.1} ms through a fresh one (start + exit)",
        kept_s * 1e3 / 20.0,
        fresh_s * 1e3 / 20.0
    );
    Ok(())
}
