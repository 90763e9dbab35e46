//! Wait times (from `run_at` to the claim) of the last 15 minutes, per queue, in 10-second buckets,
//! for the dashboard's p50/p95 chart, over the claims of every instance sharing the database.
//!
//! The claimer is the one that knows a claim's wait at once, so each instance records its own claims
//! (in-process and remote) here, next to the Prometheus histogram `jobqueue_job_wait_seconds`, and
//! [`flush`] writes its recent buckets to the `wait_stats` table every [`FLUSH_EVERY`]. Histograms
//! merge exactly by adding their counts, so the chart adds the other instances' rows to this
//! instance's memory and reads quantiles from the sum. It is a statistic, not a queue: a crash loses
//! at most the last few seconds of one instance's chart. (The series is per process; the tests that
//! start several services in one process share it.)
//!
//! Each bucket is a histogram with logarithmic bins (ratio 1.25, so a quantile is within about 12%),
//! which keeps recording to one short lock and an increment, and memory fixed: 90 buckets of 64
//! counters per queue.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use slog::{debug, Logger};
use tokio_util::sync::CancellationToken;

use crate::db::{queries, DbError, Pool};
use crate::supervisor::TaskResult;

/// The window the dashboard shows.
pub const WINDOW_SECS: u64 = 900;
/// The width of one bucket.
pub const BUCKET_SECS: u64 = 10;
/// Buckets in the window.
pub const BUCKETS: usize = (WINDOW_SECS / BUCKET_SECS) as usize;

/// How often an instance writes its recent buckets to `wait_stats`.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

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

    /// The bucket of `slot`, if it holds that slot's counts (not a lap-old one).
    fn bucket(&self, slot: u64) -> Option<&Bucket> {
        let b = &self.buckets[(slot % BUCKETS as u64) as usize];
        (b.slot == slot).then_some(b)
    }
}

/// Counts of one bucket, widened so that the sums over instances cannot overflow.
type Counts = [u64; BINS];

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

fn quantile(counts: &Counts, q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bin at which the cumulative count reaches q of the total (nearest rank).
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        seen += c;
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

    /// Every queue's p50 and p95 per bucket of the window ending at `now`, sorted by queue, from this
    /// process's claims alone.
    pub fn snapshot_at(&self, now: u64) -> Vec<QueueWaits> {
        self.merged_at(now, &[])
    }

    /// Like [`WaitSeries::snapshot_at`], with the counts of other instances (`wait_stats` rows)
    /// added in. Rows outside the window are ignored.
    pub fn merged_at(&self, now: u64, others: &[queries::WaitStatsRow]) -> Vec<QueueWaits> {
        let now_slot = now / BUCKET_SECS;
        let first = now_slot + 1 - BUCKETS as u64;
        let mut sums: HashMap<String, Vec<Counts>> = HashMap::new();
        let mut add = |queue: &str, slot: u64, counts: &mut dyn Iterator<Item = u64>| {
            if slot < first || slot > now_slot {
                return;
            }
            let series = sums.entry(queue.to_string()).or_insert_with(|| vec![[0; BINS]; BUCKETS]);
            let sum = &mut series[(slot - first) as usize];
            for (s, c) in sum.iter_mut().zip(counts) {
                *s += c;
            }
        };
        {
            let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            for (queue, ring) in queues.iter() {
                for slot in first..=now_slot {
                    if let Some(b) = ring.bucket(slot) {
                        add(queue, slot, &mut b.counts.iter().map(|&c| u64::from(c)));
                    }
                }
            }
        }
        for row in others {
            let Ok(slot) = u64::try_from(row.slot) else { continue };
            add(&row.queue, slot, &mut row.counts.iter().map(|&c| c.max(0) as u64));
        }
        let mut out: Vec<QueueWaits> = sums
            .into_iter()
            .map(|(queue, series)| {
                let (p50, p95) = series.iter().map(|c| (quantile(c, 0.5), quantile(c, 0.95))).unzip();
                QueueWaits { queue, p50, p95 }
            })
            .collect();
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        out
    }

    /// This process's buckets of the current and the previous slot that hold claims: what a flush
    /// writes (absolute counts, so writing one twice is harmless).
    pub fn recent_at(&self, now: u64) -> Vec<queries::WaitStatsRow> {
        let now_slot = now / BUCKET_SECS;
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (queue, ring) in queues.iter() {
            for slot in [now_slot.saturating_sub(1), now_slot] {
                if let Some(b) = ring.bucket(slot).filter(|b| b.counts.iter().any(|&c| c > 0)) {
                    out.push(queries::WaitStatsRow {
                        slot: slot as i64,
                        queue: queue.clone(),
                        counts: b.counts.iter().map(|&c| i32::try_from(c).unwrap_or(i32::MAX)).collect(),
                    });
                }
            }
        }
        out
    }
}

/// Writes this process's recent buckets to `wait_stats` under `instance` every [`FLUSH_EVERY`], and
/// deletes every instance's rows that have left the window. A failed write is retried by the next
/// tick, which writes the same absolute counts.
pub async fn flush(pool: Pool, instance: String, log: Logger, shutdown: CancellationToken) -> TaskResult {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let now = now_secs();
        let rows = global().recent_at(now);
        let write = async {
            let client = pool.get().await?;
            for row in &rows {
                queries::wait_stats_put(&*client, &instance, row).await?;
            }
            let oldest = (now / BUCKET_SECS) as i64 + 1 - BUCKETS as i64;
            queries::wait_stats_prune(&*client, oldest).await?;
            Ok::<_, DbError>(())
        };
        if let Err(e) = write.await {
            debug!(log, "could not write this instance's wait times"; "err" => %e);
        }
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
        assert!(s.snapshot_at(later).iter().all(|q| q.p50.iter().all(Option::is_none)));
        s.record_at("q", 0.002, later);
        let p50 = s.snapshot_at(later)[0].p50[BUCKETS - 1].unwrap();
        assert!(p50 < 0.01, "old 1 s sample mixed in: {p50}");
    }

    #[test]
    fn other_instances_counts_are_added_before_the_quantiles() {
        let s = WaitSeries::default();
        let now = 1_700_000_000;
        let slot = (now / BUCKET_SECS) as i64;
        // Here: 10 claims of 10 ms. Elsewhere: 90 of 2 s in the same bucket, and a bucket that has
        // left the window.
        for _ in 0..10 {
            s.record_at("q", 0.010, now);
        }
        let mut counts = vec![0; BINS];
        counts[bin_of(2.0)] = 90;
        let others = [
            queries::WaitStatsRow { slot, queue: "q".into(), counts: counts.clone() },
            queries::WaitStatsRow { slot: slot - BUCKETS as i64, queue: "q".into(), counts },
        ];
        let merged = s.merged_at(now, &others);
        let p50 = merged[0].p50[BUCKETS - 1].unwrap();
        assert!((p50 / 2.0 - 1.0).abs() < 0.13, "p50 {p50}: the other instance's claims count");
        assert!(merged[0].p50[..BUCKETS - 1].iter().all(Option::is_none), "the old row is outside the window");
        // What a flush writes: this process's own counts only, for the current slot.
        let recent = s.recent_at(now);
        assert_eq!(recent.len(), 1);
        assert_eq!((recent[0].slot, recent[0].counts.iter().sum::<i32>()), (slot, 10));
    }

    #[test]
    fn odd_values_land_in_the_end_bins() {
        assert_eq!(bin_of(-1.0), 0);
        assert_eq!(bin_of(f64::NAN), 0);
        assert_eq!(bin_of(1e9), BINS - 1);
    }
}
