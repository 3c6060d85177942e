//! Status API cost: latency of each endpoint next to a direct Chroma heartbeat (what `/health`
//! and `/status` wait for), and the CPU the idle server uses.
//!
//! cargo run --release --example api_latency [-- REQUESTS]

use std::time::{Duration, Instant};

use docusearch_agent::api::{self, ApiServer, ApiState, ChromaProbe};
use docusearch_agent::chroma::managed::ManagedChroma;
use docusearch_agent::config::{ApiConfig, Config};

fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir()?;
    let chroma_bin = docusearch_agent::runtime_paths::find_chroma(None)?;
    let chroma = tokio::task::spawn_blocking({
        let data = dir.path().join("chroma");
        move || ManagedChroma::start(&chroma_bin, &data)
    })
    .await??;

    let mut config = Config::default();
    config.chroma.url = Some(chroma.url());
    let state = ApiState::new(
        api::initial_status(&config),
        ChromaProbe::from_config(&config.chroma)?,
    );
    for i in 0..1000u64 {
        state.telemetry().embed_latency.observe(i as f64 / 100.0);
        state.telemetry().pages_embedded.inc_by(1);
    }
    let server = ApiServer::bind(&ApiConfig {
        port: 0,
        ..Default::default()
    })
    .await?;
    let base = format!("http://{}", server.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(state, async {
        let _ = rx.await;
    }));

    let client = reqwest::Client::builder().no_proxy().build()?;
    let targets = [
        (
            "chroma heartbeat (direct)",
            format!("{}/api/v2/heartbeat", chroma.url()),
        ),
        ("GET /health", format!("{base}/health")),
        ("GET /status", format!("{base}/status")),
        ("GET /metrics", format!("{base}/metrics")),
    ];
    println!("{n} sequential requests each, loopback, keep-alive");
    println!(
        "{:<28} {:>9} {:>9} {:>12}",
        "request", "p50 ms", "p95 ms", "p50 / direct"
    );
    let mut direct_p50 = None;
    for (name, url) in &targets {
        let mut ms = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let resp = client.get(url).send().await?;
            anyhow::ensure!(resp.status().is_success(), "{name}: {}", resp.status());
            resp.bytes().await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let p50 = percentile(&ms, 0.5);
        let base50 = *direct_p50.get_or_insert(p50);
        println!(
            "{name:<28} {p50:>9.3} {:>9.3} {:>11.2}x",
            percentile(&ms, 0.95),
            p50 / base50
        );
    }

    let idle = Duration::from_secs(10);
    let before = cpu_time();
    tokio::time::sleep(idle).await;
    let used = cpu_time() - before;
    println!(
        "idle server: {:.1} ms CPU in {} s ({:.4}% of a core)",
        used.as_secs_f64() * 1e3,
        idle.as_secs(),
        used.as_secs_f64() / idle.as_secs_f64() * 100.0
    );
    let _ = tx.send(());
    task.await??;
    Ok(())
}
