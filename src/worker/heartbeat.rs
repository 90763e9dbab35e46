//! Extends the leases of every job this instance runs, in one statement about every lease/3, and
//! carries back two signals: cancellation requested for a job, or an attempt no longer held (its lease
//! was lost to the rescuer, e.g. after a long pause).

use std::collections::HashSet;
use std::sync::Arc;

use slog::warn;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::running::{Running, StopReason};
use super::Shared;
use crate::db::queries::{self, Held};
use crate::db::ConnSlot;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let log = shared.log.new(slog::o!("component" => "heartbeat"));
    let mut conn = ConnSlot::new(&shared.connector, &log);
    let mut tick = tokio::time::interval(shared.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // The listener (re)connected: cancel requests made while it was not listening reached no
            // one, and the next tick may be many seconds away.
            _ = shared.running.recheck_requested() => {}
            _ = stop.cancelled() => return,
        }
        let sent = shared.running.attempts();
        if sent.is_empty() {
            continue;
        }
        let (instance, lease) = (&shared.instance_id, shared.lease);
        let beat =
            timeout(conn.deadline(), async { queries::job_heartbeat(conn.get().await?, &sent, instance, lease).await })
                .await;
        match conn.settle(beat) {
            Ok(held) => apply(&shared.running, &sent, &held),
            Err(e) => warn!(log, "heartbeat failed; leases not extended"; "jobs" => sent.len(), "err" => %e),
        }
    }
}

/// Acts on a heartbeat's answer: attempts with a cancel request are cancelled, and attempts that were
/// sent but not held any more are stopped as lost. Only the attempt the heartbeat asked about is
/// touched: it may have finished and been followed by a new attempt of the same job meanwhile.
fn apply(running: &Running, sent: &[(Uuid, i32)], held: &[Held]) {
    let held_set: HashSet<(Uuid, i32)> = held.iter().map(|h| (h.id, h.attempt)).collect();
    for h in held.iter().filter(|h| h.cancel_requested) {
        running.stop_attempt(h.id, h.attempt, StopReason::Cancelled);
    }
    for &(id, attempt) in sent.iter().filter(|a| !held_set.contains(a)) {
        // Either just finished (harmless: its entry is gone) or really lost.
        running.stop_attempt(id, attempt, StopReason::LeaseLost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race: a heartbeat asks about attempt 1; before its answer arrives, attempt 1 finishes and
    /// the same instance claims attempt 2. The answer does not list attempt 1 (it is no longer
    /// processing), and that must not stop attempt 2.
    #[test]
    fn an_answer_about_an_ended_attempt_leaves_the_next_attempt_alone() {
        let running = Running::default();
        let id = Uuid::new_v4();
        running.insert(id, 1, None);
        let sent = running.attempts();
        running.remove([(id, 1)]);
        let second = running.insert(id, 2, None);

        apply(&running, &sent, &[]);

        assert!(!second.token.is_cancelled(), "attempt 2 was stopped by news about attempt 1");
        assert_eq!(second.reason.get(), None);
    }

    #[test]
    fn lost_and_cancelled_attempts_are_stopped() {
        let running = Running::default();
        let (lost, cancelled, fine) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let lost_entry = running.insert(lost, 3, None);
        let cancelled_entry = running.insert(cancelled, 1, None);
        let fine_entry = running.insert(fine, 1, None);
        let sent = running.attempts();
        let held = [
            Held { id: cancelled, attempt: 1, cancel_requested: true },
            Held { id: fine, attempt: 1, cancel_requested: false },
        ];

        apply(&running, &sent, &held);

        assert_eq!(lost_entry.reason.get(), Some(&StopReason::LeaseLost));
        assert_eq!(cancelled_entry.reason.get(), Some(&StopReason::Cancelled));
        assert!(!fine_entry.token.is_cancelled());
    }
}
