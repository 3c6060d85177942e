//! Agent benchmarks. `cargo run --example bench_agent -- reconcile [FILES]`
//!
//! reconcile: start-up reconcile of FILES (default 100,000) unchanged files, side by side with
//! what it is made of (a bare directory walk, the walk with our exclusion rules), with ratios.

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

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    (median(times), last.expect("at least one run"))
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
    let filter = Filter::new(&[root.clone()], &[], &[]).expect("filter");
    let runs = 3;
    let (walk, walked) = time(runs, || bare_walk(&root));
    assert_eq!(walked, n);
    let (scan, scanned) = time(runs, || filter.scan(&root).len());
    assert_eq!(scanned, n);
    let (open, ()) = time(runs, || drop(Store::open(state.path()).expect("open")));
    let (rec, report) = time(runs, || {
        let store = Store::open(state.path()).expect("open");
        let t = ChangeTracker {
            store,
            filter: filter.clone(),
            settle: Duration::from_secs(2),
            model: "m".into(),
        };
        t.reconcile_all().expect("reconcile")
    });
    assert_eq!((report.unchanged, report.hashed), (n, 0), "{report:?}");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("start-up reconcile of {n} unchanged files (median of {runs}):");
    println!(
        "  {:<44} {:>9.1} ms  ×{:.2}",
        "bare walk (read_dir + stat)",
        ms(walk),
        1.0
    );
    println!(
        "  {:<44} {:>9.1} ms  ×{:.2}",
        "walk with exclusion rules (Filter::scan)",
        ms(scan),
        ms(scan) / ms(walk)
    );
    println!(
        "  {:<44} {:>9.1} ms  ×{:.2}",
        "store open (sled, job index rebuilt)",
        ms(open),
        ms(open) / ms(walk)
    );
    println!(
        "  {:<44} {:>9.1} ms  ×{:.2}",
        "open + full reconcile (no file read)",
        ms(rec),
        ms(rec) / ms(walk)
    );
    println!(
        "  per file: {:.1} µs; files hashed: {}",
        ms(rec) * 1e3 / n as f64,
        report.hashed
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("reconcile") | None => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            reconcile_bench(n);
        }
        Some(other) => {
            eprintln!("unknown benchmark {other}; try: reconcile [FILES]");
            std::process::exit(2);
        }
    }
}
