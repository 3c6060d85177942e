//! A counter that also knows its rate over the last minute (pages per second), which
//! Prometheus' own types do not keep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// How far back the "per second" rates look.
pub const RATE_WINDOW_S: u64 = 60;

/// A counter that also knows its recent rate (events per second over the last minute).
#[derive(Debug)]
pub struct RateCounter {
    total: AtomicU64,
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
            total: AtomicU64::new(0),
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
        self.total.fetch_add(n, Ordering::Relaxed);
        self.record_at(n, self.start.elapsed().as_secs());
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
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
