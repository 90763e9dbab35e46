//! The instance registry: every instance keeps a row in `instances` (its id and the queues it serves
//! in-process) fresh, so that `GET /queues` can say who serves what. A dead instance stops refreshing;
//! readers ignore rows older than [`LIVE_WITHIN`], and any instance deletes rows older than
//! [`FORGET_AFTER`].

use std::time::Duration;

use slog::{debug, warn, Logger};
use tokio_util::sync::CancellationToken;

use crate::db::{queues, Pool};
use crate::supervisor::TaskResult;

/// How often an instance refreshes its row.
pub const REFRESH: Duration = Duration::from_secs(10);
/// A row refreshed less recently than this belongs to an instance that is gone (three missed refreshes).
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);
/// Rows of dead instances are deleted after this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

pub struct Registry {
    pub pool: Pool,
    pub instance_id: String,
    /// The queues this instance runs handlers for.
    pub queues: Vec<String>,
    pub log: Logger,
}

impl Registry {
    pub async fn run(self, shutdown: CancellationToken) -> TaskResult {
        let log = self.log.new(slog::o!("component" => "registry"));
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            let refresh = async {
                let client = self.pool.get().await?;
                queues::instance_heartbeat(&*client, &self.instance_id, &self.queues).await?;
                queues::instance_prune(&*client, FORGET_AFTER).await
            };
            match refresh.await {
                Ok(n) if n > 0 => debug!(log, "forgot dead instances"; "count" => n),
                Ok(_) => {}
                Err(e) => warn!(log, "could not refresh this instance's registration"; "err" => %e),
            }
        }
        // A clean stop leaves no row behind; after a crash the row ages out instead.
        let remove = async {
            let client = self.pool.get().await?;
            queues::instance_remove(&*client, &self.instance_id).await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(3), remove)
            .await
            .unwrap_or_else(|_| Err(crate::db::DbError::Pool("no answer within 3s".into())))
        {
            debug!(log, "could not remove this instance's registration"; "err" => %e);
        }
        Ok(())
    }
}
