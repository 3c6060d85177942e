//! End to end: the agent's `index` (CPU) against the old DocuSearch worker's Python path
//! (`benches/e2e_python_baseline.py`), on the same folder, each run into a fresh `chroma run`
//! of the same build (a local server's cost per record grows with what it already holds, so
//! a shared server favoured whichever side ran first). Two modes:
//!
//! - default, outside the model: the agent with the tiny checkpoint, Python with no model at all;
//! - `--mid`: both sides run the same random mid-size checkpoint (written by
//!   `scripts/bench_colpali_torch.py make`), the agent through candle, Python through
//!   colpali-engine on CPU torch, with the agent's default batch sizes and thread count.
//!
//! `cargo build --release && cargo run --release --example bench_e2e -- [--mid] [--nice] [--corpus A.pdf,B.pdf] [GENERATED_PAGES] [ROUNDS]`
//!
//! `--corpus` takes a subset of tests/fixtures/corpus's PDFs (default: all four); `--nice` runs
//! the agent at the service's nice value, as launchd and systemd start it.
//! The folder: the corpus PDFs plus generated text PDFs (500 pages by default). Each side runs as
//! a child process, measured with wait4 (CPU seconds and peak RSS include the agent's
//! extraction workers); its requests go through a counting proxy (bytes sent to Chroma); a
//! poller notes when the first page record can be found; the server's CPU seconds come from
//! /proc. Rounds alternate the two sides.
//! Needs `DOCUSEARCH_BENCH_PYTHON` (or scripts/setup's environment) with chromadb, numpy,
//! pypdfium2 and Pillow; with `--mid` also torch, transformers and colpali-engine (the reference
//! stack of `cargo bench --bench embed`).

#![allow(clippy::field_reassign_with_default)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use docusearch_agent::chroma::client::{ChromaClient, GetRequest, Include};
use docusearch_agent::chroma::managed::ManagedChroma;
use docusearch_agent::config::{Config, DeviceChoice};

#[path = "support/pdf.rs"]
mod pdf_writer;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// A PDF of `pages` pages of Helvetica text, each page different.
fn text_pdf(seed: usize, pages: usize) -> Vec<u8> {
    let words = [
        "river",
        "delta",
        "sediment",
        "flow",
        "basin",
        "estuary",
        "channel",
        "flood",
        "gauge",
        "discharge",
        "meander",
        "levee",
        "tide",
        "erosion",
        "bank",
        "water",
    ];
    let contents: Vec<String> = (0..pages)
        .map(|p| {
            let mut stream = String::from("BT /F1 10 Tf 50 750 Td 13 TL\n");
            for line in 0..50 {
                let text: Vec<&str> = (0..12)
                    .map(|w| words[(seed * 31 + p * 17 + line * 7 + w * 3) % words.len()])
                    .collect();
                stream.push_str(&format!("({} {seed}-{p}-{line}) Tj T*\n", text.join(" ")));
            }
            stream.push_str("ET");
            stream
        })
        .collect();
    pdf_writer::pdf_of_pages(&contents)
}

/// A TCP proxy to Chroma that counts the bytes its clients send.
async fn counting_proxy(upstream: String) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let n = tokio::io::copy(&mut cr, &mut sw).await.unwrap_or(0);
                    counter.fetch_add(n, Ordering::Relaxed);
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut cw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (format!("http://{addr}"), sent)
}

/// A `chroma run` on a fresh data directory: each run starts from an empty database, as a
/// local server's cost per record grows with what it already holds.
struct FreshChroma {
    chroma: ManagedChroma,
    _dir: tempfile::TempDir,
}

impl FreshChroma {
    fn start(exe: &Path) -> FreshChroma {
        let dir = tempfile::tempdir().expect("tempdir");
        let chroma = ManagedChroma::start(exe, &dir.path().join("chroma")).expect("chroma");
        FreshChroma { chroma, _dir: dir }
    }

    /// The server's CPU seconds so far (user + system, from /proc).
    fn cpu_s(&self) -> f64 {
        let pid = self.chroma.pid().expect("chroma runs");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc (Linux)");
        // Fields after the command name: state is field 3, utime and stime fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        let ticks = |i: usize| fields[i].parse::<f64>().expect("ticks");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }
}

struct Run {
    chroma_cpu_s: f64,
    seconds: f64,
    first_searchable: Option<f64>,
    cpu_s: f64,
    peak_rss_mb: f64,
    sent_mb: f64,
    pages: usize,
}

/// Runs `cmd` to the end, measured with wait4, while polling `collection` for its first record.
async fn measure(
    mut cmd: std::process::Command,
    chroma: &str,
    cfg: &Config,
    collection: &str,
    sent: Arc<AtomicU64>,
) -> (Run, String) {
    let client = ChromaClient::new(chroma, &cfg.chroma).expect("client");
    let started = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let waiter = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; `ru` is a valid out-parameter.
        unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        let elapsed = started.elapsed().as_secs_f64();
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (
            child,
            status,
            elapsed,
            tv(ru.ru_utime) + tv(ru.ru_stime),
            ru.ru_maxrss,
        )
    });
    let mut first = None;
    while !waiter.is_finished() {
        if first.is_none() {
            if let Ok(Some(c)) = client.get_collection(collection).await {
                if c.count().await.unwrap_or(0) > 0 {
                    first = Some(started.elapsed().as_secs_f64());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (mut child, status, seconds, cpu_s, maxrss) = waiter.await.expect("wait");
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    assert!(status == 0, "{cmd:?} failed (status {status}): {out}");
    let pages = match ChromaClient::new(chroma, &cfg.chroma)
        .expect("client")
        .get_collection(collection)
        .await
    {
        Ok(Some(c)) => c.count().await.unwrap_or(0),
        _ => 0,
    };
    (
        Run {
            chroma_cpu_s: 0.0,
            seconds,
            first_searchable: first,
            cpu_s,
            peak_rss_mb: maxrss as f64 / 1024.0,
            sent_mb: sent.load(Ordering::Relaxed) as f64 / 1e6,
            pages,
        },
        out,
    )
}

/// The median `seq_length` of up to 100 records of `collection`: the multi-vector shape the
/// agent wrote, which the Python side then writes too.
async fn seq_length(chroma: &str, cfg: &Config, collection: &str) -> usize {
    let client = ChromaClient::new(chroma, &cfg.chroma).expect("client");
    let c = client
        .get_collection(collection)
        .await
        .expect("collection")
        .expect("collection exists");
    let got = c
        .get(&GetRequest {
            include: vec![Include::Metadatas],
            limit: Some(100),
            ..GetRequest::default()
        })
        .await
        .expect("get");
    let lens: Vec<f64> = got
        .into_records()
        .iter()
        .filter_map(|r| r.metadata.as_ref()?.get("seq_length")?.as_f64())
        .collect();
    median(lens) as usize
}

fn python() -> PathBuf {
    std::env::var_os("DOCUSEARCH_BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            docusearch_agent::runtime_paths::find_setup_python().expect("scripts/setup's Python")
        })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    // With an even count, the mean of the middle two (two rounds would otherwise print the
    // larger of each side).
    if n % 2 == 0 {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

#[tokio::main]
async fn main() {
    let mut mid = false;
    let mut nice = false;
    let mut corpus_only: Option<Vec<String>> = None;
    let mut numbers = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mid" => mid = true,
            "--nice" => nice = true,
            "--corpus" => {
                let list = args
                    .next()
                    .expect("--corpus takes a comma-separated list of PDFs");
                corpus_only = Some(list.split(',').map(str::to_string).collect());
            }
            _ => numbers.push(
                a.parse::<usize>()
                    .unwrap_or_else(|_| panic!("unknown argument {a}")),
            ),
        }
    }
    let generated = numbers.first().copied().unwrap_or(500);
    let rounds = numbers.get(1).copied().unwrap_or(3);
    let exe = Path::new(MANIFEST).join("target/release/docusearch-agent");
    assert!(
        exe.is_file(),
        "build the agent first: cargo build --release"
    );

    let chroma_exe =
        docusearch_agent::runtime_paths::find_chroma(None).expect("chroma (run scripts/setup)");

    let folder_t = tempfile::tempdir().expect("tempdir");
    let folder = std::fs::canonicalize(folder_t.path()).expect("canonical");
    for e in std::fs::read_dir(Path::new(MANIFEST).join("tests/fixtures/corpus")).expect("corpus") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().to_string();
        let chosen = corpus_only.as_ref().is_none_or(|l| l.contains(&name));
        if p.extension().is_some_and(|x| x == "pdf") && chosen {
            std::fs::copy(&p, folder.join(p.file_name().expect("name"))).expect("copy");
        }
    }
    let per_doc = 10;
    for d in 0..generated.div_ceil(per_doc) {
        std::fs::write(folder.join(format!("gen{d:03}.pdf")), text_pdf(d, per_doc)).expect("write");
    }

    let mut cfg = Config::default();
    cfg.agent_id = "bench".into();
    cfg.model.name = format!("{MANIFEST}/tests/fixtures/tiny-colpali");
    cfg.model.device = DeviceChoice::Cpu;
    cfg.api.enabled = false;
    // Multi-vector shapes: what the agent wrote in the first round.
    let (mut tokens_page, mut tokens_chunk) = (0, 0);
    let mut size = 56; // the tiny checkpoint's image size: both sides resize to it
    let model_dir = tempfile::tempdir().expect("tempdir");
    // The agent's CPU thread count (what `set_cpu_thread_env` gives rayon); torch gets the same.
    let threads = candle_core::utils::get_num_threads();
    if mid {
        let status = std::process::Command::new(python())
            .arg(Path::new(MANIFEST).join("scripts/bench_colpali_torch.py"))
            .arg("make")
            .arg(model_dir.path())
            .status()
            .expect("run scripts/bench_colpali_torch.py make");
        assert!(status.success(), "writing the mid-size checkpoint failed (DOCUSEARCH_BENCH_PYTHON needs torch and colpali-engine)");
        cfg.model.name = model_dir.path().display().to_string();
        size = 448;
    }

    let mut agent_runs = Vec::new();
    let mut python_runs = Vec::new();
    for round in 0..rounds {
        // The agent: `index FOLDER` with a fresh store, into its own collections.
        let server = FreshChroma::start(&chroma_exe);
        let url = server.chroma.url();
        let state = tempfile::tempdir().expect("tempdir");
        let (proxy, sent) = counting_proxy(url.trim_start_matches("http://").to_string()).await;
        let mut c = cfg.clone();
        c.state_dir = state.path().to_path_buf();
        c.chroma.url = Some(proxy);
        c.chroma.visual_collection = format!("agent{round}_visual");
        c.chroma.text_collection = format!("agent{round}_text");
        let config = state.path().join("config.toml");
        std::fs::write(&config, toml::to_string(&c).expect("toml")).expect("config");
        // --nice: the agent at the service's nice value, as launchd/systemd run it.
        let mut cmd = if nice {
            let mut c = std::process::Command::new("nice");
            c.arg("-n")
                .arg(docusearch_agent::service::SERVICE_NICE.to_string())
                .arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        cmd.arg("--config").arg(&config).arg("index").arg(&folder);
        let cpu = server.cpu_s();
        let (mut run, _) = measure(cmd, &url, &c, &c.chroma.visual_collection, sent).await;
        run.chroma_cpu_s = server.cpu_s() - cpu;
        agent_runs.push(run);
        if round == 0 {
            tokens_page = seq_length(&url, &c, &c.chroma.visual_collection).await;
            tokens_chunk = seq_length(&url, &c, &c.chroma.text_collection).await;
            eprintln!("multi-vectors: {tokens_page} rows a page, {tokens_chunk} a text chunk");
        }

        drop(server);

        // The old worker's path: no model, or (--mid) colpali-engine on the same checkpoint.
        let server = FreshChroma::start(&chroma_exe);
        let url = server.chroma.url();
        let (proxy, sent) = counting_proxy(url.trim_start_matches("http://").to_string()).await;
        let mut cmd = std::process::Command::new(python());
        cmd.arg(Path::new(MANIFEST).join("benches/e2e_python_baseline.py"))
            .arg(&proxy)
            .arg(format!("python{round}"))
            .arg(cfg.extract.render_dpi.to_string())
            .arg(size.to_string())
            .arg(tokens_page.to_string())
            .arg(tokens_chunk.to_string())
            .arg("128")
            .arg(&folder);
        if mid {
            cmd.arg("--model")
                .arg(model_dir.path())
                .arg("--threads")
                .arg(threads.to_string())
                .arg("--batch-visual")
                .arg(cfg.model.batch_size_visual.to_string())
                .arg("--batch-text")
                .arg(cfg.model.batch_size_text.to_string());
        }
        let cpu = server.cpu_s();
        let (mut run, out) = measure(cmd, &url, &cfg, &format!("python{round}_visual"), sent).await;
        run.chroma_cpu_s = server.cpu_s() - cpu;
        drop(server);
        eprintln!("round {round}: python says {}", out.trim());
        python_runs.push(run);
        let (a, p) = (&agent_runs[round], &python_runs[round]);
        eprintln!(
            "round {round}: agent {:.2} s ({} pages), python {:.2} s ({} pages)",
            a.seconds, a.pages, p.seconds, p.pages
        );
    }

    let pages = agent_runs[0].pages;
    let row = |name: &str, f: &dyn Fn(&Run) -> f64, better_low: bool| {
        let a = median(agent_runs.iter().map(f).collect());
        let p = median(python_runs.iter().map(f).collect());
        let ratio = if better_low { p / a } else { a / p };
        println!("| {name} | {a:.2} | {p:.2} | {ratio:.2}× |");
    };
    let gen_pages = generated.div_ceil(per_doc) * per_doc;
    println!(
        "index of {pages} pages ({} corpus + {gen_pages} generated), DPI {}, resize to {size}, medians of {rounds} alternating rounds",
        pages.saturating_sub(gen_pages),
        cfg.extract.render_dpi
    );
    let (agent_label, python_label) = if mid {
        println!(
            "both sides: the random MID checkpoint (vision 384x6, text 512x6, 448-pixel pages), f32 on the CPU, {threads} threads, batches of {} pages / {} chunks",
            cfg.model.batch_size_visual, cfg.model.batch_size_text
        );
        ("agent (MID, candle)", "Python (MID, colpali-engine)")
    } else {
        ("agent (tiny checkpoint)", "Python, no model")
    };
    println!("multi-vectors of {tokens_page} rows a page (median), {tokens_chunk} a text chunk (median), 128 wide");
    println!("| | {agent_label} | {python_label} | agent advantage |");
    println!("|---|---|---|---|");
    row("pages/s", &|r| r.pages as f64 / r.seconds, false);
    row("seconds", &|r| r.seconds, true);
    row(
        "first page searchable, s",
        &|r| r.first_searchable.unwrap_or(f64::NAN),
        true,
    );
    row("CPU seconds (process + workers)", &|r| r.cpu_s, true);
    row("Chroma's CPU seconds", &|r| r.chroma_cpu_s, true);
    row("peak RSS, MB (largest process)", &|r| r.peak_rss_mb, true);
    row("MB sent to Chroma", &|r| r.sent_mb, true);
    if mid {
        // The goals at mid size: ≥ 1.2× the pages/s, ≤ 0.5× the peak RSS.
        let speed = median(
            agent_runs
                .iter()
                .map(|r| r.pages as f64 / r.seconds)
                .collect(),
        ) / median(
            python_runs
                .iter()
                .map(|r| r.pages as f64 / r.seconds)
                .collect(),
        );
        let rss = median(agent_runs.iter().map(|r| r.peak_rss_mb).collect())
            / median(python_runs.iter().map(|r| r.peak_rss_mb).collect());
        let met = |ok: bool| if ok { "met" } else { "not met" };
        println!(
            "goals: pages/s {speed:.2}× (≥ 1.2×: {}), peak RSS {rss:.2}× (≤ 0.5×: {})",
            met(speed >= 1.2),
            met(rss <= 0.5)
        );
    }
    for (name, runs) in [("agent", &agent_runs), ("python", &python_runs)] {
        let s: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.seconds)).collect();
        println!("raw seconds, {name}: {}", s.join(" "));
    }
}
