//! Counters, gauges and histograms the pipeline updates as it works, and their Prometheus text
//! exposition (format 0.0.4, written by hand: it is a few lines of text).
//!
//! Every instrument is lock-free except the rate window, so stages can update them from any
//! thread without slowing down.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::status::{AgentStatus, ModelState};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (queue depth).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket upper bounds in seconds: from a fast Chroma upsert (~5 ms) to a CPU batch of real
/// ColPali pages (~30 s per page, see MEASURED.md).
pub const LATENCY_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum in nanoseconds, so it stays an integer atomic.
    sum_ns: AtomicU64,
}

/// A consistent-enough copy of a histogram (cumulative buckets, as Prometheus wants them).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_s: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation, in seconds. Negative or NaN values count as zero.
    pub fn observe(&self, secs: f64) {
        let secs = if secs.is_finite() && secs > 0.0 {
            secs
        } else {
            0.0
        };
        let slot = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((secs * 1e9).round() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Times `f` and records how long it took.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.observe_duration(start.elapsed());
        out
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(self.bounds.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            running += b.load(Ordering::Relaxed);
            let le = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            cumulative.push((le, running));
        }
        HistogramSnapshot {
            // The +Inf bucket is the count by definition; keep them equal under concurrent
            // updates.
            count: running,
            cumulative,
            sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// How far back the "per second" rates look.
pub const RATE_WINDOW_S: u64 = 60;

/// A counter that also knows its recent rate (events per second over the last minute).
#[derive(Debug)]
pub struct RateCounter {
    total: Counter,
    start: Instant,
    window: Mutex<RateWindow>,
}

/// One slot per second of the window; a slot remembers which second it holds.
#[derive(Debug)]
struct RateWindow {
    counts: [u64; RATE_WINDOW_S as usize],
    second: [u64; RATE_WINDOW_S as usize],
}

impl Default for RateCounter {
    fn default() -> Self {
        RateCounter {
            total: Counter::default(),
            start: Instant::now(),
            window: Mutex::new(RateWindow {
                counts: [0; RATE_WINDOW_S as usize],
                second: [u64::MAX; RATE_WINDOW_S as usize],
            }),
        }
    }
}

impl RateCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        self.total.inc_by(n);
        self.record_at(n, self.start.elapsed().as_secs());
    }

    pub fn total(&self) -> u64 {
        self.total.get()
    }

    /// Events per second over the last [`RATE_WINDOW_S`] seconds (or since start, if sooner).
    pub fn per_second(&self) -> f64 {
        self.per_second_at(self.start.elapsed().as_secs())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RateWindow> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `second` counts from this counter's creation.
    fn record_at(&self, n: u64, second: u64) {
        let mut w = self.lock();
        let slot = (second % RATE_WINDOW_S) as usize;
        if w.second[slot] != second {
            w.second[slot] = second;
            w.counts[slot] = 0;
        }
        w.counts[slot] += n;
    }

    fn per_second_at(&self, now: u64) -> f64 {
        let w = self.lock();
        let sum: u64 = (0..RATE_WINDOW_S as usize)
            .filter(|&i| w.second[i] != u64::MAX && now.saturating_sub(w.second[i]) < RATE_WINDOW_S)
            .map(|i| w.counts[i])
            .sum();
        // Seconds covered: the whole window, or every second since start (the current one too).
        let span = (now + 1).min(RATE_WINDOW_S);
        sum as f64 / span as f64
    }
}

/// The stage a failure happened in (a label of `docusearch_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Watch,
    Extract,
    Embed,
    Sync,
    Store,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Watch,
        Stage::Extract,
        Stage::Embed,
        Stage::Sync,
        Stage::Store,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Watch => "watch",
            Stage::Extract => "extract",
            Stage::Embed => "embed",
            Stage::Sync => "sync",
            Stage::Store => "store",
        }
    }
}

/// One counter per [`Stage`].
#[derive(Debug, Default)]
pub struct StageCounters([Counter; 5]);

impl StageCounters {
    pub fn inc(&self, stage: Stage) {
        self.0[stage as usize].inc();
    }
    pub fn get(&self, stage: Stage) -> u64 {
        self.0[stage as usize].get()
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
}

/// What the pipeline counts. The agent shares one `Arc<Metrics>` with every stage; each stage
/// updates its own instruments (`metrics.pages_embedded.inc_by(n)`,
/// `metrics.embed_latency.observe(secs)`, `metrics.failures.inc(Stage::Extract)`, ...).
#[derive(Debug)]
pub struct Metrics {
    /// Documents whose records reached Chroma (each (re-)index counts once).
    pub files_indexed: Counter,
    /// Page records written to Chroma.
    pub pages_indexed: Counter,
    /// Text-chunk records written to Chroma.
    pub chunks_indexed: Counter,
    /// Documents whose records were removed (deleted or moved out).
    pub files_removed: Counter,
    /// Documents whose records were re-keyed after a move, without re-embedding.
    pub files_moved: Counter,
    /// Pages through the model; also gives pages per second.
    pub pages_embedded: RateCounter,
    /// Failed attempts, by stage.
    pub failures: StageCounters,
    /// Requests to Chroma that failed (each retry counts).
    pub chroma_errors: Counter,
    /// Jobs waiting in the durable queue.
    pub queue_depth: Gauge,
    /// Jobs being worked on.
    pub jobs_in_progress: Gauge,
    /// Seconds per model forward pass (one batch).
    pub embed_latency: Histogram,
    /// Seconds to write one document's records to Chroma (upsert + prune).
    pub sync_latency: Histogram,
    /// Seconds to render and read one document.
    pub extract_latency: Histogram,
    /// Reconciles asked for through `POST /rescan`.
    pub rescans_requested: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            files_indexed: Counter::default(),
            pages_indexed: Counter::default(),
            chunks_indexed: Counter::default(),
            files_removed: Counter::default(),
            files_moved: Counter::default(),
            pages_embedded: RateCounter::default(),
            failures: StageCounters::default(),
            chroma_errors: Counter::default(),
            queue_depth: Gauge::default(),
            jobs_in_progress: Gauge::default(),
            embed_latency: Histogram::new(LATENCY_BUCKETS_S),
            sync_latency: Histogram::new(LATENCY_BUCKETS_S),
            extract_latency: Histogram::new(LATENCY_BUCKETS_S),
            rescans_requested: Counter::default(),
        }
    }
}

/// The `Content-Type` of [`render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus text exposition of the metrics, plus gauges read from the status snapshot.
pub fn render_prometheus(m: &Metrics, status: &AgentStatus) -> String {
    let mut out = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, v: u64| {
        header(&mut out, name, help, "counter");
        let _ = writeln!(out, "{name} {v}");
    };
    counter(
        "docusearch_files_indexed_total",
        "Documents whose records were written to Chroma.",
        m.files_indexed.get(),
    );
    counter(
        "docusearch_pages_indexed_total",
        "Page records written to Chroma.",
        m.pages_indexed.get(),
    );
    counter(
        "docusearch_chunks_indexed_total",
        "Text-chunk records written to Chroma.",
        m.chunks_indexed.get(),
    );
    counter(
        "docusearch_files_removed_total",
        "Documents whose records were removed from Chroma.",
        m.files_removed.get(),
    );
    counter(
        "docusearch_files_moved_total",
        "Documents re-keyed after a move or rename, without re-embedding.",
        m.files_moved.get(),
    );
    counter(
        "docusearch_pages_embedded_total",
        "Pages embedded by the model.",
        m.pages_embedded.total(),
    );
    counter(
        "docusearch_chroma_errors_total",
        "Requests to Chroma that failed.",
        m.chroma_errors.get(),
    );
    counter(
        "docusearch_rescans_requested_total",
        "Reconciles asked for through POST /rescan.",
        m.rescans_requested.get(),
    );

    header(
        &mut out,
        "docusearch_failures_total",
        "Failed attempts, by stage.",
        "counter",
    );
    for stage in Stage::ALL {
        let _ = writeln!(
            out,
            "docusearch_failures_total{{stage=\"{}\"}} {}",
            stage.as_str(),
            m.failures.get(stage)
        );
    }

    let mut gauge = |name: &str, help: &str, v: f64| {
        header(&mut out, name, help, "gauge");
        let _ = writeln!(out, "{name} {}", fmt_f64(v));
    };
    gauge(
        "docusearch_pages_embedded_per_second",
        "Pages embedded per second over the last minute.",
        m.pages_embedded.per_second(),
    );
    gauge(
        "docusearch_queue_depth",
        "Jobs waiting in the queue.",
        m.queue_depth.get() as f64,
    );
    gauge(
        "docusearch_jobs_in_progress",
        "Jobs being worked on.",
        m.jobs_in_progress.get() as f64,
    );
    gauge(
        "docusearch_failed_documents",
        "Documents currently marked failed.",
        status.queue.failed as f64,
    );
    gauge(
        "docusearch_model_loaded",
        "1 when the model is in memory.",
        bool_f64(status.model.state == ModelState::Loaded),
    );
    gauge(
        "docusearch_model_cpu_fallback",
        "1 when a GPU was asked for but the model runs on the CPU.",
        bool_f64(status.model.fell_back_to_cpu),
    );
    gauge(
        "docusearch_chroma_up",
        "1 when the last Chroma heartbeat answered.",
        bool_f64(status.chroma.reachable == Some(true)),
    );
    gauge(
        "docusearch_uptime_seconds",
        "Seconds since the agent started.",
        status.uptime_s as f64,
    );

    histogram(
        &mut out,
        "docusearch_embed_batch_seconds",
        "Seconds per model forward pass (one batch).",
        &m.embed_latency.snapshot(),
    );
    histogram(
        &mut out,
        "docusearch_sync_seconds",
        "Seconds to write one document's records to Chroma.",
        &m.sync_latency.snapshot(),
    );
    histogram(
        &mut out,
        "docusearch_extract_seconds",
        "Seconds to render and read one document.",
        &m.extract_latency.snapshot(),
    );

    header(
        &mut out,
        "docusearch_build_info",
        "The agent's version.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "docusearch_build_info{{version=\"{}\",agent_id=\"{}\"}} 1",
        escape_label(&status.version),
        escape_label(&status.agent_id)
    );
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    header(out, name, help, "histogram");
    for (le, n) in &h.cumulative {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {n}", fmt_f64(*le));
    }
    let _ = writeln!(out, "{name}_sum {}", fmt_f64(h.sum_s));
    let _ = writeln!(out, "{name}_count {}", h.count);
}

fn fmt_f64(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else {
        format!("{v}")
    }
}

fn bool_f64(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.1, 0.5, 3.0, -1.0] {
            h.observe(s);
        }
        let snap = h.snapshot();
        assert_eq!(
            snap.cumulative,
            vec![(0.1, 3), (1.0, 4), (f64::INFINITY, 5)]
        );
        assert_eq!(snap.count, 5);
        assert!((snap.sum_s - 3.65).abs() < 1e-9, "sum {}", snap.sum_s);
    }

    #[test]
    fn rate_covers_the_last_minute_only() {
        let r = RateCounter::default();
        r.record_at(30, 0);
        r.record_at(30, 9);
        // 60 events in the first 10 seconds.
        assert!((r.per_second_at(9) - 6.0).abs() < 1e-9);
        // Second 0 has left the window at second 60; second 9's events are still in it.
        assert!((r.per_second_at(60) - 0.5).abs() < 1e-9);
        // A slot reused for a later second starts from zero.
        r.record_at(6, 69);
        assert!((r.per_second_at(69) - 0.1).abs() < 1e-9);
        assert!((r.per_second_at(200) - 0.0).abs() < 1e-9);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
