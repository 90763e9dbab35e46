//! The listener: one dedicated connection that `LISTEN`s and turns notifications into wake-ups.
//!
//! It is a plain tokio-postgres connection, never a pooled one: a pool hands connections around and
//! recycles them, and a notification delivered to a connection nobody is reading is silently lost.
//! Messages are read with `Connection::poll_message`, which also drives the connection's own queries.
//!
//! NOTIFY is only a hint. When the connection breaks, notifications sent during the gap are gone, so
//! after reconnecting (capped exponential backoff) and re-listening it wakes every producer once to
//! sweep the table, and the heartbeat to read the cancel requests of the jobs held here. The
//! producers' poll fallback covers anything else. A change of `schedules` (`jobqueue_schedules`)
//! wakes the scheduler, which re-arms its timer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use slog::{debug, info, warn, Logger};
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, Notification};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::queries::{self, CHANNEL_CANCEL, CHANNEL_JOBS};
use crate::db::schedules::CHANNEL_SCHEDULES;
use crate::db::{Connector, DbError, Purpose};
use crate::remote::QueueWakes;
use crate::supervisor::TaskResult;
use crate::worker::running::{Running, StopReason};

/// `application_name` of the listening connection, so operators (and tests) can find it.
pub const APPLICATION_NAME: &str = "jobqueue-listener";

pub struct Listener {
    pub connector: Arc<Connector>,
    pub wakes: HashMap<String, Arc<Notify>>,
    /// Remote workers long-polling a queue on this instance.
    pub remote: Arc<QueueWakes>,
    pub running: Arc<Running>,
    /// The scheduler's wake-up: a schedule was written somewhere.
    pub schedules: Arc<Notify>,
    /// How often the connection is checked with a trivial query, so a silently dead one is noticed.
    pub ping_interval: Duration,
    pub log: Logger,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Listener {
    pub async fn run(self, shutdown: CancellationToken) -> TaskResult {
        let log = self.log.new(slog::o!("component" => "listener"));
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::time::Instant::now();
            match self.session(&shutdown, &log).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    crate::metrics::listener_reconnected();
                    warn!(log, "listen connection lost; reconnecting"; "err" => %e,
                          "backoff_ms" => backoff.as_millis() as u64)
                }
            }
            // A session that lasted a while was healthy: start the backoff afresh.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life. Returns `Ok` only on shutdown.
    async fn session(&self, shutdown: &CancellationToken, log: &Logger) -> Result<(), DbError> {
        let (client, mut connection) = self.connector.connect_raw(Purpose::Listener).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Notification>();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        let _abort_driver = AbortOnDrop(driver.abort_handle());

        queries::channels_listen(&client).await?;
        info!(log, "listening"; "channels" => format!("{CHANNEL_JOBS}, {CHANNEL_CANCEL}, {CHANNEL_SCHEDULES}"));
        // Anything inserted or cancelled while we were not listening announced itself to no one:
        // sweep once, and have the heartbeat read the held jobs' cancel requests now.
        for wake in self.wakes.values() {
            wake.notify_one();
        }
        self.running.recheck();
        self.remote.wake_all();
        self.schedules.notify_one();

        let mut ping = tokio::time::interval(self.ping_interval);
        ping.tick().await;
        loop {
            tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => self.deliver(&n, log),
                    None => {
                        return match driver.await {
                            Ok(Err(e)) => Err(e.into()),
                            _ => Err(DbError::Lost("the listen connection closed")),
                        };
                    }
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(Duration::from_secs(5), queries::connection_ping(&client)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(DbError::Lost("the listen connection did not answer a ping")),
                    }
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    fn deliver(&self, n: &Notification, log: &Logger) {
        match n.channel() {
            CHANNEL_JOBS => {
                if let Some(wake) = self.wakes.get(n.payload()) {
                    wake.notify_one();
                }
                self.remote.wake(n.payload());
            }
            CHANNEL_CANCEL => {
                if let Ok(id) = Uuid::parse_str(n.payload()) {
                    if self.running.stop(id, StopReason::Cancelled) {
                        info!(log, "cancelling running job"; "job_id" => %id);
                    }
                }
            }
            CHANNEL_SCHEDULES => self.schedules.notify_one(),
            other => debug!(log, "notification on an unexpected channel"; "channel" => other),
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
