//! The worker pool: a producer per queue that claims jobs in batches, an executor task per running job,
//! one completer that writes outcomes in batches, and one heartbeat that extends all leases at once.
//!
//! Shutdown: producers stop claiming, running jobs get `shutdown_timeout` to finish, then the rest are
//! interrupted and released back to pending without counting the attempt.

mod completer;
mod executor;
pub mod handler;
pub mod handlers;
mod heartbeat;
mod outcome;
mod prefetch;
mod producer;
pub mod running;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use slog::{error, info, warn, Logger};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::QueueConfig;
use crate::db::Connector;
use crate::supervisor::TaskResult;
use crate::waiters::Waiters;
use handler::Handler;
use running::Running;

// Remote workers end their attempts with the same outcomes and the same policy arithmetic.
pub(crate) use outcome::{finish_for, Attempt, Outcome};

/// What every engine task shares.
pub(crate) struct Shared {
    pub connector: Arc<Connector>,
    pub instance_id: String,
    pub lease: Duration,
    pub job_timeout: Duration,
    pub poll_interval: Duration,
    pub running: Arc<Running>,
    /// Cancelled when shutdown stops waiting: executors drop their handlers and release the jobs.
    pub hard_stop: CancellationToken,
    pub log: Logger,
}

/// A queue this instance serves.
pub(crate) struct QueueRuntime {
    pub config: QueueConfig,
    pub handler: Arc<dyn Handler>,
    /// Woken by the listener (notification, reconnect sweep), the completer (retry scheduled) and
    /// maintenance (rescued jobs).
    pub wake: Arc<Notify>,
    /// One permit per concurrent job.
    pub slots: Arc<Semaphore>,
    /// One permit per job this instance may hold for the queue: running ones plus those claimed ahead
    /// of a free slot (`concurrency` plus at most [`prefetch::most`]; the producer parks the places
    /// that the queue's handler times do not call for). The producer sizes its claims by these.
    pub room: Arc<Semaphore>,
    /// The recent mean time of this queue's handlers, which decides how many jobs are claimed ahead.
    pub handler_time: prefetch::HandlerTime,
    /// A few more places, for the claim that answers a wake-up during a backlog (`urgent_reserve`).
    pub reserve: Arc<Semaphore>,
}

impl QueueRuntime {
    /// Places of `room`.
    pub fn room_size(&self) -> usize {
        room_size(self.config.concurrency)
    }

    /// Jobs held at most: running, claimed ahead, and urgent ones claimed from the reserve.
    pub fn capacity(&self) -> usize {
        self.room_size() + urgent_reserve(self.config.concurrency)
    }
}

/// Places of a queue's room: running plus, at most, claimed ahead.
fn room_size(concurrency: usize) -> usize {
    concurrency + prefetch::most(concurrency)
}

/// Places kept apart for urgent jobs, per queue. When every slot runs a long job, the room frees only
/// as jobs end, often all at once (jobs started together end together); an urgent claim that waited
/// for room came back just after those freed slots had taken the jobs claimed ahead, and its job
/// waited for the next round: 100 ms behind 50 ms jobs. From the reserve it is claimed at once and
/// takes the first slot that frees.
pub(crate) fn urgent_reserve(concurrency: usize) -> usize {
    (concurrency / 10).clamp(1, 100)
}

/// Settings of the engine, taken from [`crate::Config`].
pub struct EngineSettings {
    pub connector: Arc<Connector>,
    pub instance_id: String,
    pub lease: Duration,
    pub job_timeout: Duration,
    pub poll_interval: Duration,
    pub shutdown_timeout: Duration,
}

pub struct Engine {
    shared: Arc<Shared>,
    queues: Vec<Arc<QueueRuntime>>,
    waiters: Arc<Waiters>,
    shutdown_timeout: Duration,
}

impl Engine {
    pub(crate) fn new(
        settings: EngineSettings,
        queues: Vec<(QueueConfig, Arc<dyn Handler>)>,
        running: Arc<Running>,
        waiters: Arc<Waiters>,
        log: &Logger,
    ) -> Engine {
        let shared = Arc::new(Shared {
            connector: settings.connector,
            instance_id: settings.instance_id,
            lease: settings.lease,
            job_timeout: settings.job_timeout,
            poll_interval: settings.poll_interval,
            running,
            hard_stop: CancellationToken::new(),
            log: log.clone(),
        });
        let queues = queues
            .into_iter()
            .map(|(config, handler)| {
                Arc::new(QueueRuntime {
                    slots: Arc::new(Semaphore::new(config.concurrency)),
                    room: Arc::new(Semaphore::new(room_size(config.concurrency))),
                    reserve: Arc::new(Semaphore::new(urgent_reserve(config.concurrency))),
                    handler_time: prefetch::HandlerTime::default(),
                    config,
                    handler,
                    wake: Arc::new(Notify::new()),
                })
            })
            .collect();
        Engine { shared, queues, waiters, shutdown_timeout: settings.shutdown_timeout }
    }

    /// The wake-up handle of each served queue, for the listener and maintenance.
    /// Per served queue: its name, concurrency and the semaphore whose permits are its free slots.
    pub fn slots(&self) -> Vec<(String, usize, Arc<Semaphore>)> {
        self.queues.iter().map(|q| (q.config.name.clone(), q.config.concurrency, q.slots.clone())).collect()
    }

    pub fn wakes(&self) -> HashMap<String, Arc<Notify>> {
        self.queues.iter().map(|q| (q.config.name.clone(), q.wake.clone())).collect()
    }

    /// Runs until `shutdown`, then drains as described in the module docs. Every task it starts is
    /// joined; one that ends before shutdown or panics (a producer, the completer, the heartbeat, an
    /// executor) starts the instance's shutdown and makes the result an error.
    pub async fn run(self, shutdown: CancellationToken, health: Arc<Health>) -> TaskResult {
        let log = self.shared.log.new(slog::o!("component" => "engine"));
        let _running = health.engine_started();
        let mut failure: Option<String> = None;
        // Outcomes handed over but not yet written: at most one per slot of every served queue (and at
        // least a completer batch's worth), so that memory and the rows left processing are bounded.
        let slots: usize = self.queues.iter().map(|q| q.capacity()).sum();
        let (tx, rx) = mpsc::channel(slots.clamp(64, 10_000));
        let give_up = CancellationToken::new();
        let completer = completer::Completer {
            shared: self.shared.clone(),
            policies: self.queues.iter().map(|q| (q.config.name.clone(), q.config.retry.clone())).collect(),
            wakes: self.wakes(),
            waiters: self.waiters.clone(),
            give_up: give_up.clone(),
        };
        let mut completer = tokio::spawn(completer.run(rx));
        let heartbeat_stop = CancellationToken::new();
        let mut heartbeat = tokio::spawn(heartbeat::run(self.shared.clone(), heartbeat_stop.clone()));
        let mut producers = JoinSet::new();
        for q in &self.queues {
            producers.spawn(producer::run(q.clone(), self.shared.clone(), tx.clone(), shutdown.clone()));
            info!(log, "serving queue"; "queue" => &q.config.name, "concurrency" => q.config.concurrency);
        }

        // Until shutdown, nothing may end: each of these ending is a failure.
        let mut completer_done = false;
        let mut executors = JoinSet::new();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {}
            Some(p) = producers.join_next() => match p {
                // Producers return on shutdown; only an earlier return is a failure.
                Ok((set, Ok(()))) if shutdown.is_cancelled() => absorb(&mut executors, set),
                Ok((set, result)) => {
                    absorb(&mut executors, set);
                    failure = Some(result.err().map_or_else(|| "a producer exited".into(), |e| format!("producer failed: {e}")));
                }
                Err(e) => failure = Some(format!("producer {}", join_error_text(e))),
            },
            c = &mut completer => {
                completer_done = true;
                failure = Some(match c { Ok(()) => "completer exited".into(), Err(e) => format!("completer {}", join_error_text(e)) });
            }
            h = &mut heartbeat => {
                failure = Some(match h { Ok(()) => "heartbeat exited".into(), Err(e) => format!("heartbeat {}", join_error_text(e)) });
            }
        }
        if let Some(f) = &failure {
            error!(log, "engine task failed; shutting down"; "err" => f);
            shutdown.cancel();
        }
        // Held until now so that an engine serving no queue (an API-only instance) keeps its completer;
        // from here on the completer ends once the last executor has sent its outcome.
        drop(tx);

        // Producers stop claiming and hand over the executors they started.
        while let Some(p) = producers.join_next().await {
            match p {
                Ok((set, result)) => {
                    absorb(&mut executors, set);
                    if let Err(e) = result {
                        failure.get_or_insert(format!("producer failed: {e}"));
                    }
                }
                Err(e) => {
                    failure.get_or_insert(format!("producer {}", join_error_text(e)));
                }
            }
        }
        let running = self.shared.running.len();
        if running > 0 {
            info!(log, "waiting for running jobs"; "count" => running,
                  "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
        }
        let all_idle = async {
            for q in &self.queues {
                let _ = q.room.acquire_many(q.room_size() as u32).await;
                let _ = q.reserve.acquire_many(urgent_reserve(q.config.concurrency) as u32).await;
            }
        };
        if tokio::time::timeout(self.shutdown_timeout, all_idle).await.is_err() {
            warn!(log, "shutdown timeout reached; interrupting running jobs"; "count" => self.shared.running.len());
            self.shared.hard_stop.cancel();
        }
        // Executors now finish promptly (the hard stop drops their handlers), unless they wait to hand an
        // outcome to a completer that is gone: bounded, then aborted (their leases will expire).
        let joined = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = executors.join_next().await {
                if let Err(e) = e {
                    failure.get_or_insert(format!("executor {}", join_error_text(e)));
                }
            }
        })
        .await;
        if joined.is_err() {
            warn!(log, "executors still waiting to hand over outcomes; abandoning them"; "count" => executors.len());
            executors.shutdown().await;
        }
        // The completer drains and stops once the last executor has sent its outcome.
        if !completer_done && tokio::time::timeout(Duration::from_secs(10), &mut completer).await.is_err() {
            // A write that keeps failing: stop retrying it (the leases will expire).
            give_up.cancel();
            if tokio::time::timeout(Duration::from_secs(2), &mut completer).await.is_err() {
                completer.abort();
            }
        }
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        info!(log, "engine stopped");
        failure.map_or(Ok(()), Err)
    }
}

/// Moves every task of `from` into `into`, keeping them running.
fn absorb(into: &mut JoinSet<()>, mut from: JoinSet<()>) {
    // A JoinSet cannot be merged; wrap each remaining task's completion instead. Tasks that already
    // finished are reaped here, panics included.
    while let Some(done) = from.try_join_next() {
        if let Err(e) = done {
            if e.is_panic() {
                let text = join_error_text(e);
                into.spawn(async move { panic!("{text}") });
            }
        }
    }
    into.spawn(async move {
        while let Some(done) = from.join_next().await {
            if let Err(e) = done {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    });
}

fn join_error_text(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        crate::supervisor::panic_text(e.into_panic())
    } else {
        "was cancelled".into()
    }
}

/// What `/healthz` reports: whether this instance's engine is running.
#[derive(Default)]
pub struct Health {
    engine: std::sync::atomic::AtomicBool,
}

impl Health {
    /// Health that reports a running engine, for an API served on its own (tests, tools).
    pub fn running() -> Health {
        Health { engine: std::sync::atomic::AtomicBool::new(true) }
    }

    pub fn engine_running(&self) -> bool {
        self.engine.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks the engine running until the guard is dropped (however the engine ends, panics included).
    fn engine_started(self: &Arc<Self>) -> HealthGuard {
        self.engine.store(true, std::sync::atomic::Ordering::SeqCst);
        HealthGuard(self.clone())
    }
}

struct HealthGuard(Arc<Health>);

impl Drop for HealthGuard {
    fn drop(&mut self) {
        self.0.engine.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
