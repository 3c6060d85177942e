//! Agent benchmarks. `cargo run --example bench_agent -- reconcile [FILES] | latency [N] | idle [SECONDS]`
//!
//! reconcile: start-up reconcile of FILES (default 100,000) unchanged files, side by side with
//! what it is made of (a bare directory walk, the walk with our exclusion rules), with ratios.
//! latency: drop-to-searchable time of N one-page PDFs dropped one after the other (p50, p95),
//! for two settle periods, on the real stages (PDFium worker, the tiny checkpoint in
//! tests/fixtures, a `chroma run` server started here).
//! idle: CPU time the agent process uses over SECONDS (default 60) of idling, after work.

#![allow(clippy::field_reassign_with_default)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use docusearch_agent::agent::changes::ChangeTracker;
use docusearch_agent::state::{FileRecord, FileStamp, Store};
use docusearch_agent::types::{ContentHash, DocId, SCHEMA_VERSION};
use docusearch_agent::watch::Filter;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// CPU time of this process so far, all threads, user and system.
fn cpu_time() -> Duration {
    // SAFETY: getrusage(2) fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Median wall time and median CPU time of `runs` runs of `f`, and its last result.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let c = cpu_time();
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
        cpu.push(cpu_time() - c);
    }
    (median(times), median(cpu), last.expect("at least one run"))
}

fn bare_walk(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let md = e.metadata().expect("metadata");
            if md.is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

fn reconcile_bench(n: usize) {
    let root_t = tempfile::tempdir().expect("tempdir");
    let root = std::fs::canonicalize(root_t.path()).expect("canonical");
    let state = tempfile::tempdir().expect("tempdir");
    eprintln!("creating {n} files and their records...");
    {
        let store = Store::open(state.path()).expect("store");
        let per_dir = 1000;
        for i in 0..n {
            let dir = root.join(format!("d{:03}", i / per_dir));
            if i % per_dir == 0 {
                std::fs::create_dir_all(&dir).expect("mkdir");
            }
            let p: PathBuf = dir.join(format!("doc{i:06}.pdf"));
            let content = format!("%PDF-1.4 document {i}");
            std::fs::write(&p, &content).expect("write");
            let rec = FileRecord {
                stamp: FileStamp::of_path(&p).expect("stamp"),
                content_hash: ContentHash::of_bytes(content.as_bytes()),
                doc_id: DocId::new("bench", &p),
                num_pages: 1,
                num_chunks: 1,
                model: "m".into(),
                schema_version: SCHEMA_VERSION,
                indexed_at: None,
                last_error: None,
            };
            store.put_file(&p, &rec).expect("put");
        }
        store.flush().expect("flush");
    }
    let filter = Filter::new(std::slice::from_ref(&root), &[], &[]).expect("filter");
    let runs = 5;
    let (walk, walk_cpu, walked) = time(runs, || bare_walk(&root));
    assert_eq!(walked, n);
    let (scan, scan_cpu, scanned) = time(runs, || filter.scan(&root).len());
    assert_eq!(scanned, n);
    let (open, open_cpu, ()) = time(runs, || drop(Store::open(state.path()).expect("open")));
    let (rec, rec_cpu, report) = time(runs, || {
        let store = Store::open(state.path()).expect("open");
        let t = ChangeTracker {
            store,
            filter: filter.clone(),
            settle: Duration::from_secs(2),
            check: Duration::from_millis(200),
            model: "m".into(),
            telemetry: std::sync::Arc::new(docusearch_agent::telemetry::Telemetry::new("m")),
        };
        t.reconcile_all().expect("reconcile")
    });
    assert_eq!((report.unchanged, report.hashed), (n, 0), "{report:?}");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "start-up reconcile of {n} unchanged files (median of {runs}; {} threads):",
        rayon::current_num_threads()
    );
    println!("  {:<44} {:>9} {:>7} {:>9}", "", "wall", "ratio", "CPU");
    for (what, wall, cpu) in [
        ("bare walk (read_dir + stat, one thread)", walk, walk_cpu),
        ("walk with exclusion rules (Filter::scan)", scan, scan_cpu),
        ("store open (sled, job index rebuilt)", open, open_cpu),
        ("open + full reconcile (no file read)", rec, rec_cpu),
    ] {
        println!(
            "  {what:<44} {:>6.1} ms  ×{:.2} {:>6.1} ms",
            ms(wall),
            ms(wall) / ms(walk),
            ms(cpu)
        );
    }
    println!(
        "  per file: {:.1} µs; files hashed: {}",
        ms(rec) * 1e3 / n as f64,
        report.hashed
    );
}

#[path = "support/pdf.rs"]
mod pdf_writer;

mod live {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use docusearch_agent::agent::real::{RealExtract, RealModelLoader, RealSink};
    use docusearch_agent::agent::runtime::Agent;
    use docusearch_agent::chroma::managed::ManagedChroma;
    use docusearch_agent::config::{Config, DeviceChoice};
    use docusearch_agent::state::Store;
    use docusearch_agent::sync::Syncer;
    use docusearch_agent::types::DocId;

    pub struct Rig {
        pub chroma: ManagedChroma,
        pub cfg: Config,
        pub root: PathBuf,
        _dirs: Vec<tempfile::TempDir>,
    }

    pub fn rig(settle_ms: u64) -> Rig {
        rig_with(settle_ms, Config::default().watch.settle_check_ms)
    }

    pub fn rig_with(settle_ms: u64, settle_check_ms: u64) -> Rig {
        let chroma_dir = tempfile::tempdir().expect("tempdir");
        let exe =
            docusearch_agent::runtime_paths::find_chroma(None).expect("chroma (run scripts/setup)");
        let chroma =
            ManagedChroma::start(&exe, &chroma_dir.path().join("chroma")).expect("chroma starts");
        let root_t = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root_t.path()).expect("canonical");
        let state = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.agent_id = "bench".into();
        cfg.state_dir = state.path().to_path_buf();
        cfg.chroma.url = Some(chroma.url());
        cfg.model.name = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-colpali").into();
        cfg.model.device = DeviceChoice::Cpu;
        cfg.model.idle_unload_s = 0;
        cfg.watch.settle_ms = settle_ms;
        cfg.watch.settle_check_ms = settle_check_ms;
        cfg.watch.rescan_interval_s = 0;
        cfg.extract.render_dpi = 72;
        Rig {
            chroma,
            cfg,
            root,
            _dirs: vec![chroma_dir, root_t, state],
        }
    }

    impl Rig {
        pub async fn syncer(&self) -> Syncer {
            Syncer::connect(&self.chroma.url(), &self.cfg)
                .await
                .expect("connect")
        }
        pub async fn start(&self) -> Agent {
            let store = Store::open(&self.cfg.store_dir()).expect("store");
            let exe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(if cfg!(debug_assertions) {
                "target/debug/docusearch-agent"
            } else {
                "target/release/docusearch-agent"
            });
            let extract =
                RealExtract::new(&self.cfg, exe).expect("extractor (build the binary first)");
            let loader = RealModelLoader {
                cfg: self.cfg.model.clone(),
            };
            Agent::start(
                &self.cfg,
                std::slice::from_ref(&self.root),
                store,
                extract,
                loader,
                RealSink(self.syncer().await),
            )
            .await
            .expect("agent")
        }
    }

    /// A one-page PDF with its own text.
    pub fn pdf(text: &str) -> Vec<u8> {
        super::pdf_writer::pdf_of_pages(&[format!("BT /F1 14 Tf 40 700 Td ({text}) Tj ET")])
    }

    fn pct(v: &mut [Duration], p: f64) -> Duration {
        v.sort();
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }

    async fn searchable(s: &Syncer, id: &DocId) {
        loop {
            if s.count_document(id)
                .await
                .map(|c| c.0 == 1)
                .unwrap_or(false)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drop-to-searchable latencies for one settle period.
    /// How a document arrives.
    #[derive(Clone, Copy)]
    pub enum Drop {
        /// Written to a temporary name, then renamed (an atomic save, a finished download).
        Atomic,
        /// Written in place and closed (`cp`).
        InPlace,
    }

    pub async fn latencies(settle_ms: u64, check_ms: u64, how: Drop, n: usize) -> Vec<Duration> {
        let rig = rig_with(settle_ms, check_ms);
        let s = rig.syncer().await;
        let agent = rig.start().await;
        let warm = rig.root.join("warm.pdf");
        std::fs::write(&warm, pdf("warm up")).expect("write");
        searchable(&s, &DocId::new("bench", &warm)).await;
        let mut out = Vec::new();
        for i in 0..n {
            let p = rig.root.join(format!("drop{i}.pdf"));
            let bytes = pdf(&format!("document number {i} about rivers"));
            let t = Instant::now();
            match how {
                Drop::Atomic => write_atomically(&p, &bytes),
                Drop::InPlace => std::fs::write(&p, &bytes).expect("write"),
            }
            searchable(&s, &DocId::new("bench", &p)).await;
            out.push(t.elapsed());
        }
        agent.shutdown().await.expect("shutdown");
        out
    }

    fn write_atomically(p: &Path, bytes: &[u8]) {
        let tmp = p.with_extension("pdf.part");
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, p).expect("rename");
    }

    pub async fn latency(n: usize) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let default = Config::default().watch;
        let rows = [
            (
                "no close/rename shortcut (check = settle)",
                default.settle_ms,
                default.settle_ms,
                Drop::Atomic,
            ),
            (
                "default, atomic save",
                default.settle_ms,
                default.settle_check_ms,
                Drop::Atomic,
            ),
            (
                "default, written in place",
                default.settle_ms,
                default.settle_check_ms,
                Drop::InPlace,
            ),
        ];
        let mut results = Vec::new();
        for (label, settle, check, how) in rows {
            let mut l = latencies(settle, check, how, n).await;
            results.push((label, settle, check, pct(&mut l, 0.5), pct(&mut l, 0.95)));
        }
        println!(
            "drop-to-searchable, {n} one-page PDFs dropped one at a time (tiny checkpoint, CPU):"
        );
        println!(
            "  {:<44} {:>9} {:>9} {:>8} {:>8}",
            "", "settle_ms", "check_ms", "p50 ms", "p95 ms"
        );
        let base = ms(results[0].3);
        for (label, settle, check, p50, p95) in &results {
            println!(
                "  {:<44} {:>9} {:>9} {:>8.0} {:>8.0}   ×{:.2}",
                label,
                settle,
                check,
                ms(*p50),
                ms(*p95),
                ms(*p50) / base
            );
        }
    }

    fn cpu_time() -> Duration {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }

    pub async fn idle(secs: u64) {
        let rig = rig(2000);
        let s = rig.syncer().await;
        let docs = 20;
        for i in 0..docs {
            std::fs::write(
                rig.root.join(format!("d{i}.pdf")),
                pdf(&format!("document {i}")),
            )
            .expect("write");
        }
        let agent = rig.start().await;
        for i in 0..docs {
            searchable(
                &s,
                &DocId::new("bench", &rig.root.join(format!("d{i}.pdf"))),
            )
            .await;
        }
        let busy_cpu = cpu_time();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c0 = cpu_time();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let idle = cpu_time() - c0;
        let wall = t0.elapsed();
        agent.shutdown().await.expect("shutdown");
        println!("idle agent ({docs} documents watched, model kept loaded), this process only:");
        println!(
            "  {:<62} {:>10.1} ms",
            "CPU time from start until 20 documents indexed (this process)",
            busy_cpu.as_secs_f64() * 1e3
        );
        println!(
            "  {:<62} {:>10.1} ms  ({:.4} % of one core; ×{:.5} of the indexing)",
            format!("CPU time over {secs} s of idling"),
            idle.as_secs_f64() * 1e3,
            idle.as_secs_f64() / wall.as_secs_f64() * 100.0,
            idle.as_secs_f64() / busy_cpu.as_secs_f64()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("reconcile") | None => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            reconcile_bench(n);
        }
        Some("latency") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(live::latency(n));
        }
        Some("idle") => {
            let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(live::idle(secs));
        }
        Some(other) => {
            eprintln!(
                "unknown benchmark {other}; try: reconcile [FILES] | latency [N] | idle [SECONDS]"
            );
            std::process::exit(2);
        }
    }
}
