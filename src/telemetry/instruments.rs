//! The instruments the agent counts with: lock-free counters, gauges and fixed-bucket
//! histograms that any thread can update without slowing down, and a per-second rate.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}
