//! Search benchmarks. `cargo bench --bench search` runs the MaxSim kernel micro-benchmark:
//! a 20-token query against 100 pages of 1,030 × 128, naive loop vs the kernel (one thread and
//! the rayon pool) vs candle's CPU matmul, with ratios.

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

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; ignore flags.
    kernel_bench()
}
