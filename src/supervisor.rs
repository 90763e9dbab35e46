//! Supervision of an instance's long-lived tasks (API server, engine, listener, maintenance, waiter
//! poller).
//!
//! Every task lives in one `JoinSet`, so no JoinHandle is dropped and no death goes unnoticed. A task
//! is expected to end only after shutdown was requested; one that ends earlier, fails or panics is
//! logged, starts a graceful shutdown of the rest, and makes the instance's result an error, so that
//! the process exits non-zero and an orchestrator restarts it. The alternative, an API that keeps
//! answering (and `/healthz` saying 200) while nothing is processed, is the failure this prevents.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use slog::{error, info, warn, Logger};
use thiserror::Error;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// What a supervised task reports when it ends: `Err` names what went wrong.
pub type TaskResult = Result<(), String>;

/// Why an instance stopped other than by request.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{task} {what}")]
pub struct TaskFailure {
    pub task: &'static str,
    pub what: String,
}

pub struct Supervisor {
    tasks: JoinSet<TaskResult>,
    names: HashMap<Id, &'static str>,
    shutdown: CancellationToken,
    log: Logger,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken, log: Logger) -> Supervisor {
        Supervisor { tasks: JoinSet::new(), names: HashMap::new(), shutdown, log }
    }

    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = TaskResult> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until every task has ended. After shutdown was requested the tasks get `drain` to finish
    /// (their own deadlines are shorter; this is the backstop), then the rest are aborted. Returns the
    /// first failure, if any.
    pub async fn run(mut self, drain: Duration) -> Result<(), TaskFailure> {
        let mut first_failure = None;
        let mut deadline = None;
        loop {
            let next = match deadline {
                None => tokio::select! {
                    next = self.tasks.join_next_with_id() => next,
                    _ = self.shutdown.cancelled() => {
                        deadline = Some(tokio::time::Instant::now() + drain);
                        continue;
                    }
                },
                Some(at) => match tokio::time::timeout_at(at, self.tasks.join_next_with_id()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let left: Vec<&str> = self.names.values().copied().collect();
                        warn!(self.log, "tasks did not stop in time; aborting them"; "tasks" => left.join(", "));
                        self.tasks.abort_all();
                        while self.tasks.join_next().await.is_some() {}
                        break;
                    }
                },
            };
            let Some(next) = next else { break };
            let (id, result) = match next {
                Ok((id, result)) => (id, result),
                Err(e) => {
                    let id = e.id();
                    let what = if e.is_panic() { panic_text(e.into_panic()) } else { "was aborted".to_string() };
                    (id, Err(what))
                }
            };
            let task = self.names.remove(&id).unwrap_or("task");
            let requested = self.shutdown.is_cancelled();
            let failure = match result {
                Err(what) => Some(TaskFailure { task, what }),
                Ok(()) if !requested => Some(TaskFailure { task, what: "exited unexpectedly".into() }),
                Ok(()) => None,
            };
            match failure {
                Some(f) => {
                    error!(self.log, "task failed; shutting the instance down"; "task" => task, "err" => &f.what);
                    self.shutdown.cancel();
                    first_failure.get_or_insert(f);
                }
                None => info!(self.log, "task stopped"; "task" => task),
            }
        }
        first_failure.map_or(Ok(()), Err)
    }
}

/// The text of a panic payload.
pub fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string());
    format!("panicked: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor() -> (Supervisor, CancellationToken) {
        let shutdown = CancellationToken::new();
        (Supervisor::new(shutdown.clone(), crate::logging::discard()), shutdown)
    }

    /// A long-lived task that stops only on shutdown.
    fn steady(shutdown: &CancellationToken) -> impl Future<Output = TaskResult> + Send + 'static {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_instance_with_an_error() {
        let (mut s, shutdown) = supervisor();
        s.spawn("api", steady(&shutdown));
        s.spawn("engine", async { panic!("boom") });
        let result = s.run(Duration::from_secs(5)).await;
        assert!(shutdown.is_cancelled(), "the other tasks were told to stop");
        assert_eq!(result, Err(TaskFailure { task: "engine", what: "panicked: boom".into() }));
    }

    #[tokio::test]
    async fn a_task_that_returns_early_is_a_failure() {
        let (mut s, shutdown) = supervisor();
        s.spawn("api", steady(&shutdown));
        s.spawn("listener", async { Ok(()) });
        let result = s.run(Duration::from_secs(5)).await;
        assert_eq!(result.unwrap_err().task, "listener");
    }

    #[tokio::test]
    async fn a_requested_shutdown_is_clean() {
        let (mut s, shutdown) = supervisor();
        s.spawn("api", steady(&shutdown));
        s.spawn("engine", steady(&shutdown));
        shutdown.cancel();
        assert_eq!(s.run(Duration::from_secs(5)).await, Ok(()));
    }

    #[tokio::test]
    async fn a_task_that_ignores_shutdown_is_aborted_after_the_drain() {
        let (mut s, shutdown) = supervisor();
        s.spawn("stuck", std::future::pending());
        shutdown.cancel();
        assert_eq!(s.run(Duration::from_millis(50)).await, Ok(()));
    }
}
