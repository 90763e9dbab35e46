//! How many jobs a queue claims ahead of its free slots (graphile-worker's "local queue"): enough that
//! a slot that frees finds its next job already claimed and that claims are large batches, but no more
//! than would start soon, because a job held here is one that another instance's free slot cannot take.
//!
//! The bound follows the queue's handlers. While they are quick (a recent mean under
//! [`AHEAD_HORIZON`] divided by four), up to four times the concurrency is held ahead: claims of up to
//! five times the concurrency, measured to drain a 20,000-job backlog 13% faster than claims of twice
//! the concurrency (docs/performance.md). Handlers of `AHEAD_HORIZON` or longer, and a queue whose
//! handlers have not ended yet, hold as many ahead as the queue has slots: each job held then waits
//! at most about one handler's time. In between, what the slots start within the horizon.
//!
//! The queue's `room` semaphore is sized for the most; the producer keeps the part the current bound
//! does not allow out of use by holding its permits ([`Parked`]), and only between claims, so that a
//! claim never finds fewer places than it counted on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Jobs claimed ahead should start within about this long: quicker handlers get more held ahead.
pub(crate) const AHEAD_HORIZON: Duration = Duration::from_millis(10);

/// The most jobs a queue of `concurrency` slots ever claims ahead: four times its slots, but no more
/// than 1,000 or its slots, whichever is larger (a claim takes at most 1,000 jobs anyway).
pub(crate) fn most(concurrency: usize) -> usize {
    (4 * concurrency).min(concurrency.max(1000))
}

/// Jobs to claim ahead now, given the mean time of the queue's recent handlers (`None` before any
/// ended): what its slots start within [`AHEAD_HORIZON`], between `concurrency` and [`most`].
pub(crate) fn wanted(concurrency: usize, mean: Option<Duration>) -> usize {
    let Some(mean) = mean else { return concurrency };
    // A zero mean divides to infinity, which the bound takes down to `most`.
    let starts = concurrency as f64 * AHEAD_HORIZON.as_secs_f64() / mean.as_secs_f64();
    (starts.min(most(concurrency) as f64) as usize).max(concurrency)
}

/// The recent mean time of a queue's handlers: an exponentially weighted mean over the last few
/// dozen, updated by every executor without a lock (a lost update only drops one sample).
#[derive(Default)]
pub(crate) struct HandlerTime {
    /// Microseconds, plus one so that zero means "none ended yet".
    micros_plus_one: AtomicU64,
}

impl HandlerTime {
    pub fn record(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128 / 2) as u64;
        let mean = match self.micros_plus_one.load(Ordering::Relaxed) {
            0 => sample,
            // Weight 1/16: a change of handler speed shows within a few dozen jobs.
            old => (old - 1) - (old - 1) / 16 + sample / 16,
        };
        self.micros_plus_one.store(mean + 1, Ordering::Relaxed);
    }

    pub fn mean(&self) -> Option<Duration> {
        match self.micros_plus_one.load(Ordering::Relaxed) {
            0 => None,
            m => Some(Duration::from_micros(m - 1)),
        }
    }
}

/// Places of a queue's room kept out of use by its producer, so that the room in use is the
/// concurrency plus [`wanted`] rather than plus [`most`].
pub(crate) struct Parked {
    room: Arc<Semaphore>,
    held: Vec<OwnedSemaphorePermit>,
}

impl Parked {
    pub fn new(room: Arc<Semaphore>) -> Parked {
        Parked { room, held: Vec::new() }
    }

    /// Parks or frees places so that `count` are parked, as far as free places allow: places held by
    /// jobs are parked later, as they come back. Only between claims (see the module docs).
    pub fn set(&mut self, count: usize) {
        if self.held.len() > count {
            self.held.truncate(count);
        }
        while self.held.len() < count {
            match self.room.clone().try_acquire_owned() {
                Ok(p) => self.held.push(p),
                Err(_) => break,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_handlers_get_four_times_the_slots_ahead_and_slow_ones_as_many_as_the_slots() {
        assert_eq!(most(100), 400);
        assert_eq!(most(1), 4);
        assert_eq!(most(400), 1000);
        assert_eq!(most(5000), 5000);
        assert_eq!(wanted(100, None), 100, "nothing known: as many as the slots");
        assert_eq!(wanted(100, Some(Duration::from_micros(20))), 400);
        assert_eq!(wanted(100, Some(Duration::ZERO)), 400);
        assert_eq!(wanted(100, Some(Duration::from_millis(5))), 200);
        assert_eq!(wanted(100, Some(Duration::from_millis(10))), 100);
        assert_eq!(wanted(100, Some(Duration::from_secs(60))), 100);
        assert_eq!(wanted(5000, Some(Duration::from_micros(1))), 5000);
    }

    #[test]
    fn the_mean_follows_the_handlers() {
        let t = HandlerTime::default();
        assert_eq!(t.mean(), None);
        t.record(Duration::from_millis(50));
        assert_eq!(t.mean(), Some(Duration::from_millis(50)));
        for _ in 0..100 {
            t.record(Duration::from_micros(10));
        }
        assert!(t.mean().unwrap() < Duration::from_millis(1), "{:?}", t.mean());
    }

    #[tokio::test]
    async fn parking_takes_only_free_places_and_gives_them_back() {
        let room = Arc::new(Semaphore::new(10));
        let busy = room.clone().try_acquire_many_owned(7).unwrap();
        let mut parked = Parked::new(room.clone());
        parked.set(5);
        assert_eq!((parked.len(), room.available_permits()), (3, 0), "only the three free places");
        drop(busy);
        parked.set(5);
        assert_eq!((parked.len(), room.available_permits()), (5, 5));
        parked.set(1);
        assert_eq!((parked.len(), room.available_permits()), (1, 9));
    }
}
