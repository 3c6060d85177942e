//! CPU throughput of ColPali at a mid-size random configuration: candle (this crate) against
//! PyTorch (colpali-engine) on the same weights, in one run, with the ratio.
//!
//!     cargo bench --bench embed [-- PAGES QUERIES ROUNDS]
//!
//! Needs the reference Python stack (`COLPALI_REF_PYTHON`, default /work/venvs/ref/bin/python):
//! it writes the random checkpoint and runs the PyTorch side as a child process. Each round runs
//! one batch on each side in turn (after one warm-up each; each timed batch of queries after an
//! untimed one on the same side), so both see the same machine load; the medians are compared.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::{Device, Tensor};
use docusearch_agent::config::{DeviceChoice, DtypeChoice, ModelConfig};
use docusearch_agent::embed::Embedder;

const QUERY: &str = "How do I read a CSV file into a data frame?";

fn python() -> String {
    std::env::var("COLPALI_REF_PYTHON").unwrap_or_else(|_| "/work/venvs/ref/bin/python".into())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_colpali_torch.py")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The PyTorch side: a child that runs one batch per line it reads and answers with the time.
struct Torch {
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    child: std::process::Child,
}

impl Torch {
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout
            .read_line(&mut s)
            .expect("the PyTorch side answers");
        assert!(
            !s.is_empty(),
            "the PyTorch side exited (see its stderr above)"
        );
        s
    }
    fn run(&mut self, what: &str) -> f64 {
        writeln!(self.stdin, "{what}").unwrap();
        self.stdin.flush().unwrap();
        self.line().trim().parse().expect("a time in seconds")
    }
}

fn main() {
    // As the agent's `main` does: candle's CPU thread settings.
    docusearch_agent::embed::device::set_cpu_thread_env();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let pages = args.first().copied().unwrap_or(4);
    let queries = args.get(1).copied().unwrap_or(8);
    let rounds = args.get(2).copied().unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(python())
        .arg(script())
        .arg("make")
        .arg(dir.path())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} (set COLPALI_REF_PYTHON): {e}", python()));
    assert!(status.success(), "writing the random checkpoint failed");

    if let Some(what) = std::env::var_os("EMBED_BENCH_CANDLE_ONLY") {
        // For profiling the Rust side alone (e.g. under `perf record`): `pages` or `queries`.
        let cfg = ModelConfig {
            name: dir.path().display().to_string(),
            device: DeviceChoice::Cpu,
            batch_size_visual: pages,
            batch_size_text: queries,
            ..ModelConfig::default()
        };
        let embedder = Embedder::load(&cfg).expect("the mid checkpoint loads");
        if what == "queries" {
            let texts = vec![QUERY; queries];
            for _ in 0..rounds {
                let t = Instant::now();
                embedder.embed_queries(&texts).unwrap();
                println!("candle queries: {:.4} s/batch", t.elapsed().as_secs_f64());
            }
            return;
        }
        let s = embedder.image_size() as usize;
        let pixels = Tensor::rand(-1f32, 1f32, (pages, 3, s, s), &Device::Cpu).unwrap();
        for _ in 0..rounds {
            let t = Instant::now();
            embedder.embed_pixel_values(&pixels).unwrap();
            println!("candle pages: {:.3} s/batch", t.elapsed().as_secs_f64());
        }
        return;
    }
    let mut child = Command::new(python())
        .arg(script())
        .arg("serve")
        .arg(dir.path())
        .args([pages.to_string(), queries.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the PyTorch side starts");
    let mut torch = Torch {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    let info: serde_json::Value = serde_json::from_str(&torch.line()).expect("a JSON header");

    let cfg = ModelConfig {
        name: dir.path().display().to_string(),
        device: DeviceChoice::Cpu,
        dtype: DtypeChoice::F32,
        batch_size_visual: pages,
        batch_size_text: queries,
        ..ModelConfig::default()
    };
    let embedder = Embedder::load(&cfg).expect("the mid checkpoint loads");
    let s = embedder.image_size() as usize;
    // Preprocessed pixels on both sides: the model is what is timed.
    let pixels = Tensor::rand(-1f32, 1f32, (pages, 3, s, s), &Device::Cpu).unwrap();
    let texts = vec![QUERY; queries];
    let candle_pages = || {
        let t = Instant::now();
        embedder.embed_pixel_values(&pixels).unwrap();
        t.elapsed().as_secs_f64()
    };
    let candle_queries = || {
        let t = Instant::now();
        embedder.embed_queries(&texts).unwrap();
        t.elapsed().as_secs_f64()
    };

    let (mut cp, mut tp, mut cq, mut tq) = (vec![], vec![], vec![], vec![]);
    candle_pages();
    torch.run("pages");
    for _ in 0..rounds {
        cp.push(candle_pages());
        tp.push(torch.run("pages"));
    }
    // A batch of queries takes ~50 ms, about as long as the other side's threads keep
    // busy-waiting after their last batch (libgomp spins for milliseconds), so each timed batch
    // of queries follows an untimed one on the same side: both are timed in steady state.
    for _ in 0..rounds * 3 {
        candle_queries();
        cq.push(candle_queries());
        torch.run("queries");
        tq.push(torch.run("queries"));
    }
    drop(torch.stdin);
    let _ = torch.child.wait();

    let per_s = |n: usize, v: &Vec<f64>| n as f64 / median(v.clone());
    let (c_pages, t_pages) = (per_s(pages, &cp), per_s(pages, &tp));
    let (c_queries, t_queries) = (per_s(queries, &cq), per_s(queries, &tq));
    println!(
        "ColPali MID (vision 384x6, text 512x6, 1024 image tokens), CPU f32, torch threads {}, \
         batches of {pages} pages / {queries} queries ({} tokens), interleaved, median of {rounds} / {}",
        info["threads"],
        info["query_tokens"],
        rounds * 3
    );
    println!(
        "{:<10} {:>12} {:>12} {:>15}",
        "", "candle", "pytorch", "candle/pytorch"
    );
    println!(
        "{:<10} {:>12.3} {:>12.3} {:>15.2}",
        "pages/s",
        c_pages,
        t_pages,
        c_pages / t_pages
    );
    println!(
        "{:<10} {:>12.2} {:>12.2} {:>15.2}",
        "queries/s",
        c_queries,
        t_queries,
        c_queries / t_queries
    );
    let fmt = |v: &Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "raw s/batch: candle pages [{}] pytorch pages [{}]",
        fmt(&cp),
        fmt(&tp)
    );
    println!(
        "             candle queries [{}] pytorch queries [{}]",
        fmt(&cq),
        fmt(&tq)
    );
}
