//! Extends the leases of every job this instance runs, in one statement about every lease/3, and
//! carries back two signals: cancellation requested for a job, or a job no longer held (its lease was
//! lost to the rescuer, e.g. after a long pause).

use std::collections::HashSet;
use std::sync::Arc;

use slog::warn;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::running::StopReason;
use super::Shared;
use crate::db::{queries, ConnSlot, STATEMENT_DEADLINE};
use tokio::time::timeout;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let log = shared.log.new(slog::o!("component" => "heartbeat"));
    let mut conn = ConnSlot::new(&shared.url, &log);
    let mut tick = tokio::time::interval(shared.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let ids = shared.running.ids();
        if ids.is_empty() {
            continue;
        }
        let (instance, lease) = (&shared.instance_id, shared.lease);
        let beat = timeout(STATEMENT_DEADLINE, async {
            queries::job_heartbeat(conn.get().await?, &ids, instance, lease).await
        })
        .await;
        match conn.settle(beat) {
            Ok(held) => {
                let held_ids: HashSet<Uuid> = held.iter().map(|(id, _)| *id).collect();
                for (id, cancel) in held {
                    if cancel {
                        shared.running.stop(id, StopReason::Cancelled);
                    }
                }
                for id in ids.into_iter().filter(|id| !held_ids.contains(id)) {
                    // Either just finished (harmless: its handler is done) or really lost.
                    shared.running.stop(id, StopReason::LeaseLost);
                }
            }
            Err(e) => {
                warn!(log, "heartbeat failed; leases not extended"; "jobs" => ids.len(), "err" => %e)
            }
        }
    }
}
