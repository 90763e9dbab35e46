//! The worker pool: a producer per queue that claims jobs in batches, an executor task per running job,
//! one completer that writes outcomes in batches, and one heartbeat that extends all leases at once.
//!
//! Shutdown: producers stop claiming, running jobs get `shutdown_timeout` to finish, then the rest are
//! interrupted and released back to pending without counting the attempt.

mod completer;
mod executor;
pub mod handler;
mod heartbeat;
mod producer;
pub mod running;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use slog::{info, warn, Logger};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::QueueConfig;
use crate::waiters::Waiters;
use handler::Handler;
use running::Running;

// Remote workers end their attempts with the same outcomes and the same policy arithmetic.
pub(crate) use executor::{finish_for, Attempt, Outcome};

/// What every engine task shares.
pub(crate) struct Shared {
    pub url: String,
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
    /// Woken by the dispatcher (notification, reconnect sweep), the completer (retry scheduled) and
    /// maintenance (rescued jobs).
    pub wake: Arc<Notify>,
    /// One permit per concurrent job.
    pub slots: Arc<Semaphore>,
}

/// Settings of the engine, taken from [`crate::Config`].
pub struct EngineSettings {
    pub url: String,
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
            url: settings.url,
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
                    config,
                    handler,
                    wake: Arc::new(Notify::new()),
                })
            })
            .collect();
        Engine { shared, queues, waiters, shutdown_timeout: settings.shutdown_timeout }
    }

    /// The wake-up handle of each served queue, for the dispatcher and maintenance.
    pub fn wakes(&self) -> HashMap<String, Arc<Notify>> {
        self.queues.iter().map(|q| (q.config.name.clone(), q.wake.clone())).collect()
    }

    /// Runs until `shutdown`, then drains as described in the module docs.
    pub async fn run(self, shutdown: CancellationToken) {
        let log = self.shared.log.new(slog::o!("component" => "engine"));
        let (tx, rx) = mpsc::unbounded_channel();
        let give_up = CancellationToken::new();
        let completer = completer::Completer {
            shared: self.shared.clone(),
            policies: self.queues.iter().map(|q| (q.config.name.clone(), q.config.retry.clone())).collect(),
            wakes: self.wakes(),
            waiters: self.waiters.clone(),
            give_up: give_up.clone(),
        };
        let completer = tokio::spawn(completer.run(rx));
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat::run(self.shared.clone(), heartbeat_stop.clone()));
        let producers: Vec<_> = self
            .queues
            .iter()
            .map(|q| tokio::spawn(producer::run(q.clone(), self.shared.clone(), tx.clone(), shutdown.clone())))
            .collect();
        drop(tx);
        for q in &self.queues {
            info!(log, "serving queue"; "queue" => &q.config.name, "concurrency" => q.config.concurrency);
        }

        shutdown.cancelled().await;
        for p in producers {
            let _ = p.await;
        }
        let running = self.shared.running.len();
        if running > 0 {
            info!(log, "waiting for running jobs"; "count" => running,
                  "timeout_ms" => self.shutdown_timeout.as_millis() as u64);
        }
        let all_idle = async {
            for q in &self.queues {
                let _ = q.slots.acquire_many(q.config.concurrency as u32).await;
            }
        };
        if tokio::time::timeout(self.shutdown_timeout, all_idle).await.is_err() {
            warn!(log, "shutdown timeout reached; interrupting running jobs"; "count" => self.shared.running.len());
            self.shared.hard_stop.cancel();
        }
        // Executors now finish promptly; the completer drains and stops once the last one has.
        let mut completer = completer;
        if tokio::time::timeout(Duration::from_secs(10), &mut completer).await.is_err() {
            // A handler that blocks its thread ignores cancellation; stop waiting for it.
            give_up.cancel();
            if tokio::time::timeout(Duration::from_secs(2), &mut completer).await.is_err() {
                completer.abort();
            }
        }
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        info!(log, "engine stopped");
    }
}
