//! Wait times (from `run_at` to the claim) of the last 15 minutes, per queue, in 10-second buckets,
//! for the dashboard's p50/p95 chart.
//!
//! The table does not record when an attempt started, so a finished job's wait cannot be read back
//! from it; the moment of the claim is known only to the claimer. This instance therefore records
//! its own claims (in-process and remote) here, next to the Prometheus histogram
//! `jobqueue_job_wait_seconds`: the chart shows what the answering instance measured. It is a
//! statistic, not a queue: losing it on a restart loses nothing but a few minutes of chart.
//!
//! Each bucket is a histogram with logarithmic bins (ratio 1.25, so a quantile is within about 12%),
//! which keeps recording to one short lock and an increment, and memory fixed: 90 buckets of 64
//! counters per queue.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// The window the dashboard shows.
pub const WINDOW_SECS: u64 = 900;
/// The width of one bucket.
pub const BUCKET_SECS: u64 = 10;
/// Buckets in the window.
pub const BUCKETS: usize = (WINDOW_SECS / BUCKET_SECS) as usize;

/// Bin 0 holds waits under [`FIRST_BOUND`]; bin i > 0 holds [FIRST_BOUND * RATIO^(i-1),
/// FIRST_BOUND * RATIO^i). The last bin also holds everything longer (about 20 minutes and more).
const BINS: usize = 64;
const FIRST_BOUND: f64 = 0.001;
const RATIO: f64 = 1.25;

#[derive(Clone)]
struct Bucket {
    /// Which 10-second slot of time (seconds since the epoch / BUCKET_SECS) the counts belong to.
    slot: u64,
    counts: [u32; BINS],
}

/// One queue's ring of buckets, indexed by slot modulo [`BUCKETS`].
struct Ring {
    buckets: Vec<Bucket>,
}

impl Ring {
    fn new() -> Ring {
        Ring { buckets: vec![Bucket { slot: 0, counts: [0; BINS] }; BUCKETS] }
    }

    fn record(&mut self, slot: u64, secs: f64) {
        let b = &mut self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            // A bucket from a lap ago: its counts are outside the window now.
            *b = Bucket { slot, counts: [0; BINS] };
        }
        let bin = bin_of(secs);
        b.counts[bin] = b.counts[bin].saturating_add(1);
    }

    /// p50 and p95 per bucket, oldest first, ending with the bucket of `now_slot`; None where no job
    /// was claimed.
    fn quantiles(&self, now_slot: u64) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
        let first = now_slot + 1 - BUCKETS as u64;
        (first..=now_slot)
            .map(|slot| {
                let b = &self.buckets[(slot % BUCKETS as u64) as usize];
                if b.slot != slot {
                    return (None, None);
                }
                (quantile(&b.counts, 0.5), quantile(&b.counts, 0.95))
            })
            .unzip()
    }
}

fn bin_of(secs: f64) -> usize {
    // Also NaN and negative waits (a clock difference between hosts).
    if secs.is_nan() || secs < FIRST_BOUND {
        return 0;
    }
    let i = 1 + ((secs / FIRST_BOUND).ln() / RATIO.ln()).floor() as usize;
    i.min(BINS - 1)
}

/// The middle of bin `i` (geometric), the value a quantile falling into it is reported as.
fn bin_value(i: usize) -> f64 {
    match i {
        0 => FIRST_BOUND / 2.0,
        _ => FIRST_BOUND * RATIO.powf(i as f64 - 0.5),
    }
}

fn quantile(counts: &[u32; BINS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    // The smallest bin at which the cumulative count reaches q of the total (nearest rank).
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        seen += u64::from(c);
        if seen >= rank {
            return Some(bin_value(i));
        }
    }
    Some(bin_value(BINS - 1))
}

/// The wait-time series of every queue this process has claimed jobs of.
#[derive(Default)]
pub struct WaitSeries {
    queues: Mutex<HashMap<String, Ring>>,
}

/// One queue's series, as `GET /stats/history` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueWaits {
    pub queue: String,
    pub p50: Vec<Option<f64>>,
    pub p95: Vec<Option<f64>>,
}

impl WaitSeries {
    /// Records one claim `secs` after the job's `run_at`, at `now` (seconds since the epoch).
    pub fn record_at(&self, queue: &str, secs: f64, now: u64) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let ring = match queues.get_mut(queue) {
            Some(r) => r,
            None => queues.entry(queue.to_string()).or_insert_with(Ring::new),
        };
        ring.record(now / BUCKET_SECS, secs);
    }

    /// Every queue's p50 and p95 per bucket of the window ending at `now`, sorted by queue.
    pub fn snapshot_at(&self, now: u64) -> Vec<QueueWaits> {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<QueueWaits> = queues
            .iter()
            .map(|(q, ring)| {
                let (p50, p95) = ring.quantiles(now / BUCKET_SECS);
                QueueWaits { queue: q.clone(), p50, p95 }
            })
            .collect();
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        out
    }
}

/// This process's series: claims are recorded where the wait metric is (`metrics::job_claimed`).
pub fn global() -> &'static WaitSeries {
    static SERIES: OnceLock<WaitSeries> = OnceLock::new();
    SERIES.get_or_init(WaitSeries::default)
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_right_bucket_within_the_bin_error() {
        let s = WaitSeries::default();
        let now = 1_700_000_000;
        // 100 waits of 10 ms and 10 of 2 s in the current bucket: p50 10 ms, p95 2 s.
        for _ in 0..100 {
            s.record_at("q", 0.010, now);
        }
        for _ in 0..10 {
            s.record_at("q", 2.0, now);
        }
        // One 5 s wait a minute ago.
        s.record_at("q", 5.0, now - 60);
        let snap = s.snapshot_at(now);
        assert_eq!(snap.len(), 1);
        let q = &snap[0];
        assert_eq!(q.p50.len(), BUCKETS);
        let (p50, p95) = (q.p50[BUCKETS - 1].unwrap(), q.p95[BUCKETS - 1].unwrap());
        assert!((p50 / 0.010 - 1.0).abs() < 0.13, "p50 {p50}");
        assert!((p95 / 2.0 - 1.0).abs() < 0.13, "p95 {p95}");
        let minute_ago = BUCKETS - 1 - 6;
        assert!((q.p50[minute_ago].unwrap() / 5.0 - 1.0).abs() < 0.13);
        assert_eq!(q.p50[BUCKETS - 2], None, "no claims in that bucket");
    }

    #[test]
    fn buckets_older_than_the_window_are_forgotten() {
        let s = WaitSeries::default();
        let now = 1_700_000_000;
        s.record_at("q", 1.0, now);
        // A full window later, the same ring slot is reused: the old count must not show.
        let later = now + WINDOW_SECS;
        assert!(s.snapshot_at(later)[0].p50.iter().all(Option::is_none));
        s.record_at("q", 0.002, later);
        let p50 = s.snapshot_at(later)[0].p50[BUCKETS - 1].unwrap();
        assert!(p50 < 0.01, "old 1 s sample mixed in: {p50}");
    }

    #[test]
    fn odd_values_land_in_the_end_bins() {
        assert_eq!(bin_of(-1.0), 0);
        assert_eq!(bin_of(f64::NAN), 0);
        assert_eq!(bin_of(1e9), BINS - 1);
    }
}
