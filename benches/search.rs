//! Search benchmarks.
//!
//! `cargo bench --bench search` runs the MaxSim kernel micro-benchmark: a 20-token query
//! against 100 pages of 1,030 × 128, naive loop vs the kernel (one thread and the rayon pool)
//! vs candle's CPU matmul, with ratios.
//!
//! `cargo bench --bench search -- chroma RECORDS ENCODING` runs the two-stage search on a real
//! `chroma run` holding RECORDS page records of 1,030 × 128 (random unit rows) in ENCODING
//! (`f32-gzip-b64` or `f16-b64`), written through the Syncer into
//! `target/bench-search/ENCODING-RECORDS` (kept between runs: loading takes minutes), and prints
//! stage-1, stage-2 and total latency p50/p95 over 30 queries for several candidate counts,
//! and the CPU time per query of the server and of this process. Query embedding is not
//! included. `... chroma RECORDS ENCODING bf16` stores vectors rounded to bf16 (what a GPU
//! computes), which f32-gzip-b64 deflates instead of storing.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use docusearch_agent::search::maxsim::{score_naive, PreparedQuery};
use docusearch_agent::types::MultiVector;
use rand::{Rng, SeedableRng};

fn random(rng: &mut impl Rng, rows: usize, dim: usize) -> MultiVector {
    let data = (0..rows * dim)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    MultiVector::new(rows, dim, data)
}

/// Median of `reps` timed runs of `f`, after one warm-up run.
fn median_time<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut out = f();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        out = f();
        times.push(t.elapsed());
    }
    times.sort();
    (times[reps / 2], out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn kernel_bench() -> anyhow::Result<()> {
    let (n_q, n_d, dim, pages) = (20, 1030, 128, 100);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let query = random(&mut rng, n_q, dim);
    let docs: Vec<MultiVector> = (0..pages).map(|_| random(&mut rng, n_d, dim)).collect();
    let threads = rayon::current_num_threads();
    println!(
        "MaxSim kernel: query {n_q}x{dim} vs {pages} pages of {n_d}x{dim} (f32), {threads} rayon threads, median of runs"
    );

    let (naive, naive_scores) = median_time(5, || score_naive(&query, &docs));
    let prepared = PreparedQuery::new(&query);
    let (single, single_scores) = median_time(21, || {
        docs.iter().map(|d| prepared.score(d)).collect::<Vec<_>>()
    });
    let (parallel, parallel_scores) = median_time(21, || prepared.score_many(&docs));

    // candle: one matmul of the query against all pages stacked, then a max per page.
    let dev = Device::Cpu;
    let q_t = Tensor::from_slice(&query.data, (n_q, dim), &dev)?;
    let all: Vec<f32> = docs.iter().flat_map(|d| d.data.iter().copied()).collect();
    let d_t = Tensor::from_slice(&all, (pages * n_d, dim), &dev)?;
    let candle_scores = |q: &Tensor, d: &Tensor| -> anyhow::Result<Vec<f32>> {
        let sims = q.matmul(&d.t()?)?; // n_q × (pages·n_d)
        let per_page = sims.reshape((n_q, pages, n_d))?.max(2)?.sum(0)?;
        Ok(per_page.to_vec1::<f32>()?)
    };
    let (candle, candle_out) = median_time(21, || candle_scores(&q_t, &d_t));
    let candle_out = candle_out?;

    let exact = single_scores == naive_scores && parallel_scores == naive_scores;
    let candle_err = candle_out
        .iter()
        .zip(&naive_scores)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "  {:<34} {:>9.2} ms   x{:>6.1}",
        "naive loop (MultiVector::maxsim)",
        ms(naive),
        1.0
    );
    println!(
        "  {:<34} {:>9.2} ms   x{:>6.1}",
        "kernel, 1 thread",
        ms(single),
        ms(naive) / ms(single)
    );
    println!(
        "  {:<34} {:>9.2} ms   x{:>6.1}",
        format!("kernel, rayon ({threads} threads)"),
        ms(parallel),
        ms(naive) / ms(parallel)
    );
    println!(
        "  {:<34} {:>9.2} ms   x{:>6.1}",
        "candle matmul + max (not exact)",
        ms(candle),
        ms(naive) / ms(candle)
    );
    println!(
        "  kernel scores equal the naive ones bit for bit: {exact}; candle's largest difference: {candle_err:.2e}"
    );
    let macs = (n_q * n_d * dim * pages) as f64;
    println!(
        "  kernel throughput: {:.1} GFLOP/s on 1 thread",
        2.0 * macs / single.as_secs_f64() / 1e9
    );
    if !exact {
        anyhow::bail!("the kernel's scores differ from the naive loop's");
    }
    Ok(())
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    let i = ((sorted_ms.len() as f64 - 1.0) * p).round() as usize;
    sorted_ms[i]
}

/// CPU seconds (user + system) a process has used, from /proc (Linux).
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn unit_rows(rng: &mut impl Rng, rows: usize, dim: usize) -> MultiVector {
    let mut data: Vec<f32> = (0..rows * dim)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    for row in data.chunks_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    MultiVector::new(rows, dim, data)
}

/// How the stored vectors were computed: `f32` on the CPU, or `bf16` on a GPU (then widened to
/// f32 for storage, so f32-gzip-b64 blobs deflate to about half).
#[derive(Clone, Copy, PartialEq)]
enum Precision {
    F32,
    Bf16,
}

fn chroma_bench(records: usize, encoding: &str, precision: Precision) -> anyhow::Result<()> {
    use docusearch_agent::chroma::managed::ManagedChroma;
    use docusearch_agent::config::{Config, MultivectorEncoding};
    use docusearch_agent::search::{Scope, SearchOptions, Searcher};
    use docusearch_agent::sync::{DocumentMeta, PageRecord, Syncer};
    use docusearch_agent::types::{ContentHash, DocFormat, DocId};

    let encoding = MultivectorEncoding::parse(encoding)
        .ok_or_else(|| anyhow::anyhow!("unknown encoding {encoding}"))?;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-search")
        .join(match precision {
            Precision::F32 => format!("{}-{records}", encoding.as_str()),
            Precision::Bf16 => format!("{}-bf16-{records}", encoding.as_str()),
        });
    let chroma = docusearch_agent::runtime_paths::find_chroma(None)?;
    let server = ManagedChroma::start(&chroma, &dir)?;
    let mut config = Config::default();
    config.chroma.multivector_encoding = encoding;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (rows, dim, pages_per_doc) = (1030, 128, 20);
    rt.block_on(async {
        let syncer = Syncer::connect(&server.url(), &config).await?;
        let have = syncer.visual_collection().count().await?;
        if have < records {
            println!(
                "loading {} page records ({}) into {} ...",
                records - have,
                encoding.as_str(),
                dir.display()
            );
            let t = Instant::now();
            let mut rng = rand::rngs::StdRng::seed_from_u64(have as u64);
            let mut written = have;
            while written < records {
                let doc = written / pages_per_doc;
                let path = std::path::PathBuf::from(format!("/bench/doc{doc:05}.pdf"));
                let meta = DocumentMeta {
                    doc_id: DocId::new(&config.agent_id, &path),
                    agent_id: config.agent_id.clone(),
                    source_path: path,
                    filename: format!("doc{doc:05}.pdf"),
                    format: DocFormat::Pdf,
                    num_pages: pages_per_doc as u32,
                    content_hash: ContentHash::of_bytes(format!("{doc}").as_bytes()),
                    model: "bench".into(),
                    timestamp: "2026-11-27T18:00:00Z".into(),
                };
                let first = written % pages_per_doc;
                let n = (pages_per_doc - first).min(records - written);
                let pages: Vec<PageRecord> = (first..first + n)
                    .map(|p| PageRecord {
                        page: p as u32 + 1,
                        text: format!("text of page {} of document {doc}", p + 1),
                        embedding: {
                            let mut mv = unit_rows(&mut rng, rows, dim);
                            if precision == Precision::Bf16 {
                                mv.data
                                    .iter_mut()
                                    .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                            }
                            mv
                        },
                    })
                    .collect();
                syncer.upsert_pages(&meta, &pages).await?;
                written += n;
                if written % 1000 < n {
                    println!(
                        "  {written} records, {:.1} pages/s",
                        (written - have) as f64 / t.elapsed().as_secs_f64()
                    );
                }
            }
            println!("loaded in {:.0} s", t.elapsed().as_secs_f64());
        }
        let count = syncer.visual_collection().count().await?;
        let searcher = Searcher::open(syncer.client(), &config.chroma).await?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(4242);
        let queries: Vec<MultiVector> = (0..30).map(|_| unit_rows(&mut rng, 20, dim)).collect();
        println!(
            "two-stage search: {count} page records of {rows}x{dim} ({} values) in {}, query 20x{dim}, {} queries, limit 10, visual collection, {} rayon threads; query embedding not included",
            match precision {
                Precision::F32 => "f32",
                Precision::Bf16 => "bf16",
            },
            encoding.as_str(),
            queries.len(),
            rayon::current_num_threads()
        );
        println!(
            "  {:>10}  {:>17}  {:>17}  {:>17}  {:>22}",
            "candidates",
            "stage 1 p50/p95",
            "stage 2 p50/p95",
            "total p50/p95",
            "CPU/query server/client"
        );
        let server_pid = server.pid().unwrap_or(0);
        let own_pid = std::process::id();
        for candidates in [20, 50, 100] {
            let opts = SearchOptions {
                limit: 10,
                candidates,
                scope: Scope::Visual,
                ..SearchOptions::default()
            };
            // One warm-up query (connections, server caches).
            searcher.search(&queries[0], &opts).await?;
            let (mut s1, mut s2, mut tot) = (Vec::new(), Vec::new(), Vec::new());
            let cpu_before = (process_cpu(server_pid), process_cpu(own_pid));
            for q in &queries {
                let r = searcher.search(q, &opts).await?;
                s1.push(ms(r.times.stage1));
                s2.push(ms(r.times.stage2));
                tot.push(ms(r.times.total));
            }
            let cpu_after = (process_cpu(server_pid), process_cpu(own_pid));
            let per_query = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => format!("{:.0}", (b - a) * 1e3 / queries.len() as f64),
                _ => "?".into(),
            };
            let cpu = format!(
                "{} / {} ms",
                per_query(cpu_before.0, cpu_after.0),
                per_query(cpu_before.1, cpu_after.1)
            );
            for v in [&mut s1, &mut s2, &mut tot] {
                v.sort_by(f64::total_cmp);
            }
            println!(
                "  {:>10}  {:>7.1} / {:>6.1} ms  {:>7.1} / {:>6.1} ms  {:>7.1} / {:>6.1} ms  {:>22}",
                candidates,
                percentile(&s1, 0.5),
                percentile(&s1, 0.95),
                percentile(&s2, 0.5),
                percentile(&s2, 0.95),
                percentile(&tot, 0.5),
                percentile(&tot, 0.95),
                cpu
            );
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; other words pick the benchmark.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some("chroma") => {
            let records = args
                .get(1)
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(10_000);
            let encoding = args.get(2).map(String::as_str).unwrap_or("f16-b64");
            let precision = match args.get(3).map(String::as_str) {
                None | Some("f32") => Precision::F32,
                Some("bf16") => Precision::Bf16,
                Some(other) => anyhow::bail!("precision {other}: expected f32 or bf16"),
            };
            chroma_bench(records, encoding, precision)
        }
        _ => kernel_bench(),
    }
}
