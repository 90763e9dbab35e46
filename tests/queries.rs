//! The engine's statements one by one, against a real database: fencing, cancellation winning over a
//! retry, the rescuer's three outcomes, heartbeats reporting cancellations and lost leases.

mod common;

use std::time::Duration;

use common::TestDb;
use jobqueue::db::queries::{self, Finish};
use jobqueue::db::{Conn, Connector, ErrorClass, Purpose};
use jobqueue::JobStatus;
use serde_json::json;
use uuid::Uuid;

async fn setup() -> (TestDb, tokio_postgres::Client, Conn) {
    let db = TestDb::new().await;
    let c = db.client().await;
    let conn = engine_conn(&db).await;
    (db, c, conn)
}

async fn engine_conn(db: &TestDb) -> Conn {
    Conn::new(client_for(db, Purpose::Engine).await)
}

/// A connection opened as the service opens one for `purpose`, with its session settings.
async fn client_for(db: &TestDb, purpose: Purpose) -> tokio_postgres::Client {
    let connector = Connector::new(&db.url, Duration::from_secs(10)).unwrap();
    connector.connect(purpose, &jobqueue::logging::discard()).await.unwrap()
}

fn finish(id: Uuid, attempt: i32, status: JobStatus) -> Finish {
    Finish {
        id,
        attempt,
        status,
        result: Some(json!("r")),
        error: (status != JobStatus::Done).then(|| "e".to_string()),
        delay: Duration::from_secs(60),
        uncount: false,
        row: None,
    }
}

/// A claim by instance "me" with a 30 s lease and 5 attempts by default.
async fn claim(conn: &mut Conn, queue: &str, n: i64, from: queries::ClaimFrom) -> queries::Claimed {
    queries::job_claim(conn, queue, n, "me", Duration::from_secs(30), 5, from).await.unwrap()
}

async fn status_of(c: &tokio_postgres::Client, id: Uuid) -> String {
    c.query_one("SELECT status FROM jobs WHERE id = $1", &[&id]).await.unwrap().get(0)
}

#[tokio::test]
async fn claim_takes_a_batch_in_priority_order_and_reports_the_next_due_job() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute(
        "INSERT INTO jobs (payload, priority) SELECT to_jsonb(i), i % 3 FROM generate_series(1, 9) AS i;
         INSERT INTO jobs (payload, run_at) VALUES ('\"later\"', now() + interval '90 seconds');
         INSERT INTO jobs (payload, run_at, priority) VALUES ('\"sooner\"', now() + interval '30 seconds', 7);",
    )
    .await
    .unwrap();
    let full = claim(&mut conn, "default", 4, queries::ClaimFrom::Head).await;
    assert_eq!(full.jobs.len(), 4);
    let mut priorities: Vec<i32> = full.jobs.iter().map(|j| j.priority).collect();
    priorities.sort();
    assert_eq!(priorities, vec![0, 0, 0, 1], "most urgent first");
    assert!(full.jobs.iter().all(|j| j.status == JobStatus::Processing && j.attempts == 1));
    assert!(full.jobs.iter().all(|j| j.max_attempts == Some(5) && j.locked_by.as_deref() == Some("me")));
    assert_eq!(full.next_due_in, None, "a full claim skips the timer lookup");

    let short = claim(&mut conn, "default", 100, queries::ClaimFrom::Head).await;
    assert_eq!(short.jobs.len(), 5);
    let due = short.next_due_in.expect("next due reported");
    assert!(due > Duration::from_secs(25) && due <= Duration::from_secs(30), "{due:?}: the sooner job, any priority");

    // A claim that finds nothing has no row to carry the next due time, which is looked up apart.
    let none_due = claim(&mut conn, "default", 10, queries::ClaimFrom::Head).await;
    assert!(none_due.jobs.is_empty());
    let due = none_due.next_due_in.expect("next due reported by an empty claim");
    assert!(due > Duration::from_secs(25) && due <= Duration::from_secs(30), "{due:?}: the sooner job");

    let empty = claim(&mut conn, "other", 10, queries::ClaimFrom::Head).await;
    assert!(empty.jobs.is_empty() && empty.next_due_in.is_none());
}

/// A remote worker's long poll sleeps until the queue's next scheduled job when its claim finds
/// nothing: the claim that comes back empty still says when that is.
#[tokio::test]
async fn an_empty_remote_claim_reports_the_next_due_job() {
    let (_db, c, _) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload, run_at) VALUES ('\"later\"', now() + interval '30 seconds')")
        .await
        .unwrap();
    let claim =
        jobqueue::db::lease::job_claim_leased(&c, "default", 10, "remote-1", Duration::from_secs(30), 5).await.unwrap();
    assert!(claim.jobs.is_empty());
    let due = claim.next_due_in.expect("next due reported by an empty remote claim");
    assert!(due > Duration::from_secs(25) && due <= Duration::from_secs(30), "{due:?}");
    let other =
        jobqueue::db::lease::job_claim_leased(&c, "other", 10, "remote-1", Duration::from_secs(30), 5).await.unwrap();
    assert!(other.jobs.is_empty() && other.next_due_in.is_none());
}

/// The answer to a wake-up during a backlog: only jobs more urgent than the cursor's priority, and
/// no search for the next due job even when it comes back short.
#[tokio::test]
async fn a_claim_of_more_urgent_jobs_takes_only_those() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute(
        "INSERT INTO jobs (payload, priority) SELECT to_jsonb(i), 0 FROM generate_series(1, 5) AS i;
         INSERT INTO jobs (payload, priority) VALUES ('\"urgent\"', -1000), ('\"sooner\"', -5);
         INSERT INTO jobs (payload, priority, run_at) VALUES ('\"later\"', -9, now() + interval '30 seconds');",
    )
    .await
    .unwrap();
    let from = queries::ClaimFrom::MoreUrgentThan(0);
    let urgent = claim(&mut conn, "default", 10, from).await;
    let mut priorities: Vec<i32> = urgent.jobs.iter().map(|j| j.priority).collect();
    priorities.sort();
    assert_eq!(priorities, vec![-1000, -5], "only what sorts before priority 0 and is due");
    assert_eq!(urgent.next_due_in, None, "a short claim of urgent jobs skips the timer lookup");
    let rest = claim(&mut conn, "default", 10, queries::ClaimFrom::Head).await;
    assert_eq!(rest.jobs.len(), 5, "the priority-0 jobs were left for the backlog's claims");
}

#[tokio::test]
async fn finishing_is_fenced_on_holder_and_attempt() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'), ('2')").await.unwrap();
    let jobs = claim(&mut conn, "default", 2, queries::ClaimFrom::Head).await.jobs;
    let (a, b) = (jobs[0].id, jobs[1].id);

    let written = queries::job_finish_batch(&mut conn, "someone-else", &[finish(a, 1, JobStatus::Done)]).await.unwrap();
    assert!(written.is_empty(), "another instance's outcome is refused");
    let written = queries::job_finish_batch(&mut conn, "me", &[finish(a, 2, JobStatus::Done)]).await.unwrap();
    assert!(written.is_empty(), "another attempt's outcome is refused");
    assert_eq!(status_of(&c, a).await, "processing");

    let written =
        queries::job_finish_batch(&mut conn, "me", &[finish(a, 1, JobStatus::Done), finish(b, 1, JobStatus::Failed)])
            .await
            .unwrap();
    assert_eq!(written.len(), 2);
    let row = c
        .query_one("SELECT status, result, error, locked_by, finished_at IS NOT NULL FROM jobs WHERE id = $1", &[&a])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "done");
    assert_eq!(row.get::<_, serde_json::Value>(1), json!("r"));
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(row.get::<_, Option<String>>(3), None);
    assert!(row.get::<_, bool>(4));
    let again = queries::job_finish_batch(&mut conn, "me", &[finish(a, 1, JobStatus::Failed)]).await.unwrap();
    assert!(again.is_empty(), "a finished job is never finished twice");
    assert_eq!(status_of(&c, a).await, "done");
}

/// The completer's warm-up runs the real finishing statement on a job that exists only inside a
/// transaction it rolls back: nothing is left behind, and the connection is back out of the
/// transaction, so the next finish commits as usual.
#[tokio::test]
async fn the_completers_warm_up_leaves_no_job_behind() {
    let (_db, c, mut conn) = setup().await;
    queries::job_finish_warm_up(&mut conn, "me").await.expect("the warm-up finishes its job");
    assert_eq!(c.query_one("SELECT count(*) FROM jobs", &[]).await.unwrap().get::<_, i64>(0), 0);
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1')").await.unwrap();
    let id = claim(&mut conn, "default", 1, queries::ClaimFrom::Head).await.jobs[0].id;
    let written = queries::job_finish_batch(&mut conn, "me", &[finish(id, 1, JobStatus::Done)]).await.unwrap();
    assert_eq!(written, vec![(id, JobStatus::Done)]);
    assert_eq!(status_of(&c, id).await, "done", "committed, seen from another session");
}

#[tokio::test]
async fn a_requested_cancellation_wins_over_a_retry() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'), ('2')").await.unwrap();
    let jobs = claim(&mut conn, "default", 2, queries::ClaimFrom::Head).await.jobs;
    let (a, b) = (jobs[0].id, jobs[1].id);
    c.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = $1", &[&a]).await.unwrap();
    let written = queries::job_finish_batch(
        &mut conn,
        "me",
        &[finish(a, 1, JobStatus::Pending), finish(b, 1, JobStatus::Pending)],
    )
    .await
    .unwrap();
    let written: std::collections::HashMap<Uuid, JobStatus> = written.into_iter().collect();
    assert_eq!(written[&a], JobStatus::Cancelled);
    assert_eq!(written[&b], JobStatus::Pending);
    let row = c
        .query_one("SELECT finished_at IS NOT NULL, cancel_requested_at IS NOT NULL FROM jobs WHERE id = $1", &[&a])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    let row = c
        .query_one("SELECT run_at > now() + interval '50 seconds', errors FROM jobs WHERE id = $1", &[&b])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the retry waits for its backoff");
    assert_eq!(row.get::<_, serde_json::Value>(1)[0]["attempt"], 1);
}

#[tokio::test]
async fn heartbeats_extend_leases_and_report_cancellations_and_losses() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'), ('2'), ('3')").await.unwrap();
    let jobs = queries::job_claim(&mut conn, "default", 3, "me", Duration::from_secs(1), 5, queries::ClaimFrom::Head)
        .await
        .unwrap()
        .jobs;
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    c.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = $1", &[&ids[0]]).await.unwrap();
    // The third was taken over by someone else (as the rescuer and another claim would).
    c.execute("UPDATE jobs SET locked_by = 'other' WHERE id = $1", &[&ids[2]]).await.unwrap();
    let sent: Vec<(Uuid, i32)> = ids.iter().map(|id| (*id, 1)).collect();
    let beat = queries::job_heartbeat(&mut conn, &sent, "me", Duration::from_secs(60)).await.unwrap();
    let beat: std::collections::HashMap<Uuid, bool> = beat.into_iter().map(|h| (h.id, h.cancel_requested)).collect();
    assert_eq!(beat.len(), 2);
    assert!(beat[&ids[0]] && !beat[&ids[1]]);
    let extended =
        common::count(&c, "SELECT count(*) FROM jobs WHERE locked_until > now() + interval '50 seconds'").await;
    assert_eq!(extended, 2);
}

#[tokio::test]
async fn the_rescuer_requeues_fails_or_cancels_expired_leases() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 4) AS i").await.unwrap();
    let jobs =
        queries::job_claim(&mut conn, "default", 4, "dead", Duration::from_secs(30), 3, queries::ClaimFrom::Head)
            .await
            .unwrap()
            .jobs;
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    c.execute("UPDATE jobs SET attempts = 3 WHERE id = $1", &[&ids[1]]).await.unwrap();
    c.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = $1", &[&ids[2]]).await.unwrap();
    // Expire all but the last.
    c.execute("UPDATE jobs SET locked_until = now() - interval '1 second' WHERE id = ANY($1)", &[&ids[..3].to_vec()])
        .await
        .unwrap();

    let rescued = queries::job_rescue_expired(&c, 100, 10).await.unwrap();
    assert_eq!(rescued.len(), 3);
    assert!(rescued.iter().all(|r| r.lost_by == "dead"));
    assert_eq!(status_of(&c, ids[0]).await, "pending");
    assert_eq!(status_of(&c, ids[1]).await, "failed");
    assert_eq!(status_of(&c, ids[2]).await, "cancelled");
    assert_eq!(status_of(&c, ids[3]).await, "processing", "a live lease is left alone");
    let error: String = c.query_one("SELECT error FROM jobs WHERE id = $1", &[&ids[1]]).await.unwrap().get(0);
    assert!(error.contains("worker lost") && error.contains("dead"), "{error}");
    assert!(queries::job_rescue_expired(&c, 100, 10).await.unwrap().is_empty(), "nothing twice");

    // The dead instance's late outcome is dropped.
    let late = queries::job_finish_batch(&mut conn, "dead", &[finish(ids[0], 1, JobStatus::Done)]).await.unwrap();
    assert!(late.is_empty());
}

/// A heartbeat speaks for one attempt: asked about attempt 1 of a job that is now on attempt 2 (same
/// instance), it neither extends attempt 2's lease nor reports it as held.
#[tokio::test]
async fn heartbeats_are_fenced_on_the_attempt() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1')").await.unwrap();
    let job = queries::job_claim(&mut conn, "default", 1, "me", Duration::from_secs(1), 5, queries::ClaimFrom::Head)
        .await
        .unwrap()
        .jobs
        .remove(0);
    // Attempt 1 ends (released) and the same instance claims attempt 2.
    let mut release = finish(job.id, 1, JobStatus::Pending);
    release.delay = Duration::ZERO;
    queries::job_finish_batch(&mut conn, "me", &[release]).await.unwrap();
    let again = queries::job_claim(&mut conn, "default", 1, "me", Duration::from_secs(1), 5, queries::ClaimFrom::Head)
        .await
        .unwrap()
        .jobs;
    assert_eq!(again[0].attempts, 2);

    let stale = queries::job_heartbeat(&mut conn, &[(job.id, 1)], "me", Duration::from_secs(60)).await.unwrap();
    assert!(stale.is_empty(), "attempt 1 is not held any more: {stale:?}");
    let extended =
        common::count(&c, "SELECT count(*) FROM jobs WHERE locked_until > now() + interval '50 seconds'").await;
    assert_eq!(extended, 0, "attempt 2's lease was not touched by attempt 1's heartbeat");
    let held = queries::job_heartbeat(&mut conn, &[(job.id, 2)], "me", Duration::from_secs(60)).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].attempt, 2);
}

/// The heartbeat and the completer lock the same rows; unless both lock in one order, two of them on
/// overlapping rows deadlock (PostgreSQL then aborts one with 40P01). Hammer both, concurrently, on
/// the same 300 rows given in opposite orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_and_completions_on_the_same_rows_never_deadlock() {
    let (db, c, _) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 300) AS i").await.unwrap();
    let ids: Vec<Uuid> = c.query("SELECT id FROM jobs", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    for round in 0..30 {
        c.batch_execute(
            "UPDATE jobs SET status = 'processing', attempts = 1, locked_by = 'me',
                             locked_until = now() + interval '1 minute', finished_at = NULL",
        )
        .await
        .unwrap();
        let mut forward: Vec<(Uuid, i32)> = ids.iter().map(|id| (*id, 1)).collect();
        fastrand_shuffle(&mut forward, round);
        let backward: Vec<Finish> = forward
            .iter()
            .rev()
            .map(|(id, _)| {
                let mut f = finish(*id, 1, JobStatus::Pending);
                f.delay = Duration::ZERO;
                f
            })
            .collect();
        let (mut beat_conn, mut finish_conn) = (engine_conn(&db).await, engine_conn(&db).await);
        let beats = tokio::spawn(async move {
            let mut errors = Vec::new();
            for _ in 0..3 {
                if let Err(e) = queries::job_heartbeat(&mut beat_conn, &forward, "me", Duration::from_secs(60)).await {
                    errors.push(e);
                }
            }
            errors
        });
        let finished = queries::job_finish_batch(&mut finish_conn, "me", &backward).await;
        let beat_errors = beats.await.unwrap();
        for e in &beat_errors {
            assert_ne!(e.class(), ErrorClass::Transient, "round {round}: heartbeat deadlocked: {e}");
        }
        assert!(beat_errors.is_empty(), "round {round}: {beat_errors:?}");
        let finished = finished.unwrap_or_else(|e| panic!("round {round}: completion failed: {e}"));
        assert_eq!(finished.len(), 300, "round {round}: every row written");
    }
}

/// A deterministic shuffle, so that a failing round can be replayed.
fn fastrand_shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for i in (1..items.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = (state >> 33) as usize % (i + 1);
        items.swap(i, j);
    }
}

/// A row that does not decode into the Rust type asked for is our bug, not an outage: it must not be
/// classified as "unavailable" (a 503, retried forever).
#[tokio::test]
async fn a_decoding_error_is_a_bug_not_an_outage() {
    let (_db, c, _) = setup().await;
    let row = c.query_one("SELECT 1::int4", &[]).await.unwrap();
    let e: jobqueue::db::DbError = row.try_get::<_, String>(0).unwrap_err().into();
    assert_eq!(e.class(), ErrorClass::Bug, "{e}");
    assert!(!e.is_retryable());
    let e: jobqueue::db::DbError = c.execute("SELECT no_such_column FROM jobs", &[]).await.unwrap_err().into();
    assert_eq!(e.class(), ErrorClass::Bug, "{e}");
    // A status this code does not know is an error, never read as some other status; the old names
    // the API accepts as filters (todo, in_progress) are not stored statuses either.
    for (text, known) in [("done", true), ("todo", false), ("weird", false)] {
        let row = c.query_one("SELECT $1::text AS status", &[&text]).await.unwrap();
        match row.try_get::<_, JobStatus>("status") {
            Ok(s) => assert!(known && s.as_str() == text, "{text} read as {s}"),
            Err(e) => {
                assert!(!known, "{text}: {e}");
                assert_eq!(jobqueue::db::DbError::from(e).class(), ErrorClass::Bug);
            }
        }
    }
}

/// Rows that the scans of `jobs_active` in a plan (EXPLAIN ANALYZE, JSON) visited: returned, or
/// read and thrown away by a filter, over every loop.
fn rows_visited(node: &serde_json::Value) -> f64 {
    let n = |k: &str| node.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let own = if node.get("Relation Name").and_then(|r| r.as_str()) == Some("jobs_active") {
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck")) * n("Actual Loops")
    } else {
        0.0
    };
    // A join filter throws away pairs its inner side produced: a scan repeated per outer row.
    let joined = n("Rows Removed by Join Filter");
    own + joined + node.get("Plans").and_then(|p| p.as_array()).map_or(0.0, |p| p.iter().map(rows_visited).sum())
}

/// Finishing a batch finds each job with one probe, and in the batch's order, whatever the planner
/// knew when it made the engine's generic plan:
/// - statistics taken when a backlog was inserted, with nothing processing: with `jobs_processing_idx`
///   on (queue) the planner then scanned the whole partial index once per job of the batch (a 200-job
///   batch visited 40,000 rows), and later, that index looking empty, hashed all of it per batch;
/// - no statistics at all, the plan made at the completer's warm-up on an empty table: a sequential
///   scan of jobs_active per job of the batch.
///
/// The three statements: by id, at the rows' addresses as the claim returned them, and the one for
/// batches of plain successes at their addresses.
#[tokio::test]
async fn finishing_a_batch_visits_each_job_once_whatever_the_statistics() {
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Shape {
        ById,
        AtRows,
        DoneAtRows,
    }
    let cases = [Shape::ById, Shape::AtRows, Shape::DoneAtRows].into_iter().flat_map(|s| [(true, s), (false, s)]);
    for (stale, shape) in cases {
        let (db, c, mut conn) = setup().await;
        // The statement prepared as the completer's connection has it, and run once as its warm-up.
        let engine = client_for(&db, Purpose::Engine).await;
        let (sql, types, none) = match shape {
            Shape::ById => (
                queries::JOB_FINISH_BATCH,
                "uuid[], text[], jsonb[], text[], float8[], bool[], text, int4[]",
                "'{}', '{}', '{}', '{}', '{}', '{}', 'me', '{}'",
            ),
            Shape::AtRows => (
                queries::JOB_FINISH_BATCH_AT,
                "uuid[], text[], jsonb[], text[], float8[], bool[], text, int4[], tid[]",
                "'{}', '{}', '{}', '{}', '{}', '{}', 'me', '{}', '{}'",
            ),
            Shape::DoneAtRows => {
                (queries::JOB_FINISH_DONE_AT, "uuid[], jsonb[], text, int4[], tid[]", "'{}', '{}', 'me', '{}', '{}'")
            }
        };
        engine.batch_execute(&format!("PREPARE finish({types}) AS {sql}")).await.unwrap();
        engine.batch_execute(&format!("EXECUTE finish({none})")).await.unwrap();
        c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 2000) AS i")
            .await
            .unwrap();
        if stale {
            c.batch_execute("ANALYZE jobs_active").await.unwrap();
        }
        // More jobs processing than a batch finishes, none of them in the statistics.
        let (batch, processing) = (200, 1000);
        let claimed = claim(&mut conn, "default", processing, queries::ClaimFrom::Head).await;
        assert_eq!(claimed.jobs.len(), processing as usize);
        let mut jobs: Vec<(Uuid, jobqueue::db::RowAddress)> =
            claimed.jobs.iter().map(|j| j.id).zip(claimed.rows.iter().copied()).collect();
        jobs.sort_by_key(|j| j.0);
        jobs.truncate(batch as usize);
        let ids = format!("'{{{}}}'::uuid[]", jobs.iter().map(|j| j.0.to_string()).collect::<Vec<_>>().join(","));
        let tids: Vec<String> = jobs.iter().map(|(_, r)| format!("\"({},{})\"", r.block, r.offset)).collect();
        let tids = format!("'{{{}}}'::tid[]", tids.join(","));
        let array = |item: &str, ty: &str| format!("'{{{}}}'::{ty}[]", vec![item; jobs.len()].join(","));
        let args = match shape {
            Shape::DoneAtRows => format!("{ids}, {}, 'me', {}, {tids}", array("NULL", "jsonb"), array("1", "int4")),
            _ => format!(
                "{ids}, {}, {}, {}, {}, {}, 'me', {}{}",
                array("done", "text"),
                array("NULL", "jsonb"),
                array("NULL", "text"),
                array("0", "float8"),
                array("false", "bool"),
                array("1", "int4"),
                if shape == Shape::AtRows { format!(", {tids}") } else { String::new() },
            ),
        };
        let row =
            engine.query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE finish({args})"), &[]).await.unwrap();
        let plan: serde_json::Value = row.get(0);
        let visited = rows_visited(&plan[0]["Plan"]);
        assert_eq!(
            common::count(&c, "SELECT count(*) FROM jobs WHERE status = 'done'").await,
            batch,
            "stale {stale}, {shape:?}: the batch was finished"
        );
        // One probe per job; anything near batch² is a scan per job.
        assert!(
            visited <= 2.0 * batch as f64,
            "stale {stale}, {shape:?}: finishing {batch} jobs visited {visited} rows: {plan}"
        );
        // The batch drives the update, so rows are locked in the batch's (id) order.
        let input = update_input(&plan[0]["Plan"]).unwrap_or_else(|| panic!("no update in {plan}"));
        assert_eq!(input["Node Type"], "Nested Loop", "stale {stale}, {shape:?}: {plan}");
        assert_eq!(
            input["Plans"][0]["Node Type"], "Function Scan",
            "stale {stale}, {shape:?}: the batch is the outer side: {plan}"
        );
        if shape != Shape::ById {
            assert_eq!(input["Plans"][1]["Node Type"], "Tid Scan", "each row read at its address: {plan}");
        }
    }
}

/// A producer's claim visits the jobs it claims and nothing else, whatever the planner knew when it
/// made the claim connection's generic plan: at the producer's first claim, on a table never analyzed,
/// analyzed while the queue was empty, or analyzed with a backlog that then drained (its pages still
/// there, no live row in them), before a backlog arrived. For each of the three claims: from
/// the head, after a cursor (a backlog being worked through), and of the more urgent jobs. Analyzed
/// after a drain, the claims once read and sorted the whole backlog for every claim (bitmap scan, then
/// sort): a second 200,000-job backlog drained at 7,000 jobs/s instead of 30,000.
#[tokio::test]
async fn claiming_visits_only_the_claimed_jobs_whatever_the_statistics() {
    let shapes = [
        ("head", queries::JOB_CLAIM, "", ""),
        (
            "after a cursor",
            queries::JOB_CLAIM_AFTER,
            ", int4, timestamptz, uuid",
            ", -1000, '-infinity', '00000000-0000-0000-0000-000000000000'",
        ),
        ("more urgent", queries::JOB_CLAIM_MORE_URGENT, ", int4", ", 1"),
    ];
    for (shape, sql, types, args) in shapes {
        for stats in ["never analyzed", "analyzed empty", "analyzed after a drain"] {
            let (db, c, _) = setup().await;
            if stats == "analyzed after a drain" {
                // Statistics taken while a backlog was there; the backlog drained; a vacuum that could
                // not truncate the table (another session held a lock on it) counted no live row in
                // its pages, so the planner expects one row whatever it holds.
                let sql = "INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 5000) AS i";
                c.batch_execute(sql).await.unwrap();
                c.batch_execute("ANALYZE jobs_active").await.unwrap();
                c.batch_execute("DELETE FROM jobs").await.unwrap();
                c.batch_execute("VACUUM (TRUNCATE false) jobs_active").await.unwrap();
            } else if stats == "analyzed empty" {
                c.batch_execute("ANALYZE jobs_active").await.unwrap();
            }
            // The statement prepared as a producer's connection has it, and run once on the empty queue.
            let producer = client_for(&db, Purpose::Claim).await;
            let prepare = format!("PREPARE claim(text, int8, text, float8, int4, bool{types}) AS {sql}");
            producer.batch_execute(&prepare).await.unwrap();
            producer.batch_execute(&format!("EXECUTE claim('default', 100, 'me', 30, 5, false{args})")).await.unwrap();
            c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 5000) AS i")
                .await
                .unwrap();
            let limit = 100;
            let row = producer
                .query_one(
                    &format!(
                        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim('default', {limit}, 'me', 30, 5, false{args})"
                    ),
                    &[],
                )
                .await
                .unwrap();
            let plan: serde_json::Value = row.get(0);
            let case = format!("{shape}, {stats}");
            assert_eq!(
                common::count(&c, "SELECT count(*) FROM jobs WHERE status = 'processing'").await,
                limit,
                "{case}: the jobs were claimed"
            );
            // Each claimed job read once to pick it, once to find it for the update, and written; a scan
            // of the backlog would visit its 5,000 jobs.
            let visited = rows_visited(&plan[0]["Plan"]);
            assert!(visited <= 3.0 * limit as f64, "{case}: claiming {limit} jobs visited {visited} rows: {plan}");
        }
    }
}

/// The plan node whose rows the update of a plan (EXPLAIN, JSON) writes, in its order.
fn update_input(node: &serde_json::Value) -> Option<&serde_json::Value> {
    if node["Node Type"] == "ModifyTable" {
        return node["Plans"].get(0);
    }
    node["Plans"].as_array()?.iter().find_map(update_input)
}

/// The completer writes each attempt at the address its claim returned, and an address is only a
/// hint: a job whose row moved since (a heartbeat extended it) is still written, by id; an address
/// that now holds another job's row writes nothing to that job; a job whose lease was lost is left
/// alone, address or not.
#[tokio::test]
async fn finishing_at_the_claimed_address_writes_the_attempt_and_nothing_else() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 5) AS i").await.unwrap();
    let claimed = claim(&mut conn, "default", 5, queries::ClaimFrom::Head).await;
    assert_eq!((claimed.jobs.len(), claimed.rows.len()), (5, 5));
    for (job, row) in claimed.jobs.iter().zip(&claimed.rows) {
        let at: Uuid = c.query_one("SELECT id FROM jobs_active WHERE ctid = $1", &[row]).await.unwrap().get(0);
        assert_eq!(at, job.id, "the claim returns where each job's claimed row is");
    }
    let (ids, rows): (Vec<Uuid>, Vec<_>) = (claimed.jobs.iter().map(|j| j.id).collect(), claimed.rows.clone());
    let at = |i: usize, row| Finish { row: Some(row), ..finish(ids[i], 1, JobStatus::Done) };
    // 1: moved since its claim, as a heartbeat moves it.
    c.execute("UPDATE jobs SET locked_until = locked_until + interval '1 second' WHERE id = $1", &[&ids[1]])
        .await
        .unwrap();
    // 2: lost to another instance.
    c.execute("UPDATE jobs SET locked_by = 'other' WHERE id = $1", &[&ids[2]]).await.unwrap();
    let batch = [
        at(0, rows[0]),
        at(1, rows[1]),
        at(2, rows[2]),
        // 3, given the address of 4's row: 4 must stay as it is, 3 be written all the same.
        at(3, rows[4]),
    ];
    let mut written: Vec<Uuid> =
        queries::job_finish_batch(&mut conn, "me", &batch).await.unwrap().into_iter().map(|w| w.0).collect();
    written.sort();
    let mut expected = vec![ids[0], ids[1], ids[3]];
    expected.sort();
    assert_eq!(written, expected);
    for (i, status) in [(0, "done"), (1, "done"), (2, "processing"), (3, "done"), (4, "processing")] {
        assert_eq!(status_of(&c, ids[i]).await, status, "job {i}");
    }
}

/// A batch whose jobs need both statements (one at its address, one by id) reports what the first
/// statement wrote even when the second fails, so that the completer retries only the rest: retried
/// whole, the batch would find the first job finished already and report its lease lost.
#[tokio::test]
async fn a_batch_whose_second_statement_fails_reports_what_the_first_wrote() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 2) AS i").await.unwrap();
    let claimed = claim(&mut conn, "default", 2, queries::ClaimFrom::Head).await;
    let (first, second) = (claimed.jobs[0].id, claimed.jobs[1].id);
    let good = Finish { row: Some(claimed.rows[0]), ..finish(first, 1, JobStatus::Done) };
    // By id (no address), with a result the database refuses: U+0000 has no place in jsonb.
    let bad = Finish { result: Some(json!("\u{0}")), ..finish(second, 1, JobStatus::Done) };
    let mut written = Vec::new();
    let e = queries::job_finish_batch_into(&mut conn, "me", &[good.clone(), bad], &mut written).await.unwrap_err();
    assert!(!e.is_retryable(), "the database refused a value: {e}");
    assert_eq!(written, vec![(first, JobStatus::Done)], "the first statement's write is reported");
    assert_eq!(status_of(&c, first).await, "done");
    assert_eq!(status_of(&c, second).await, "processing");
    // Written again, the first job would not be found: its outcome is already recorded.
    assert!(queries::job_finish_batch(&mut conn, "me", &[good]).await.unwrap().is_empty());
}

/// A completion locks its jobs in id order whatever order their outcomes came in, so a transaction
/// that locks some of the same jobs in id order (a batch insert locks the parents it names so) waits
/// for it or makes it wait, and never deadlocks with it. Here the other transaction holds the lower
/// job; a completion that locked the higher one first would hold it while waiting, and the other
/// transaction's lock on it would close the cycle, which PostgreSQL breaks by aborting one of the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_locks_its_jobs_in_id_order_whatever_the_batch_order() {
    let (db, c, mut conn) = setup().await;
    // A table of some size, so that the plan is the one a drain gets (two rows are just read in order).
    c.batch_execute(
        "INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 2000) AS i; ANALYZE jobs_active",
    )
    .await
    .unwrap();
    let claimed = claim(&mut conn, "default", 2, queries::ClaimFrom::Head).await;
    let mut ids: Vec<Uuid> = claimed.jobs.iter().map(|j| j.id).collect();
    ids.sort();
    let (low, high) = (ids[0], ids[1]);
    let other = db.client().await;
    other.batch_execute("BEGIN").await.unwrap();
    other.execute("SELECT 1 FROM jobs WHERE id = $1 FOR SHARE", &[&low]).await.unwrap();
    let completion = tokio::spawn(async move {
        queries::job_finish_batch(&mut conn, "me", &[finish(high, 1, JobStatus::Done), finish(low, 1, JobStatus::Done)])
            .await
    });
    common::wait_count(
        &c,
        Duration::from_secs(10),
        "the completion waiting for the lower job",
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE '%a job that ends moves from jobs_active to jobs_finished%'",
        1,
    )
    .await;
    let second = other.execute("SELECT 1 FROM jobs WHERE id = $1 FOR SHARE", &[&high]).await;
    assert!(second.is_ok(), "the higher job was free: {second:?}");
    other.batch_execute("COMMIT").await.unwrap();
    let written = completion.await.unwrap().unwrap_or_else(|e| panic!("the completion failed: {e}"));
    assert_eq!(written.len(), 2, "both jobs finished");
}

/// A job inserted with `after` locks its parents `FOR SHARE` before it reads their statuses; a
/// completion of a parent that has to wait for that lock must then release the new child. The
/// finishing statement's snapshot was taken before the wait and holds no edge at all, so the question
/// whether any job has dependants must be asked with a fresh snapshot, after the batch is written
/// (`jobqueue_has_dependants()`, V12). Asked from the statement's snapshot, or before the update
/// waited, it answered no here and the child stayed waiting.
#[tokio::test]
async fn a_completion_that_waited_for_an_insert_of_dependants_releases_them() {
    let (db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('\"parent\"')").await.unwrap();
    let claimed = claim(&mut conn, "default", 1, queries::ClaimFrom::Head).await;
    let parent = claimed.jobs[0].id;

    // The insert of a child, as `job_insert_graph` does it, left open.
    let mut inserter = db.client().await;
    let tx = inserter.transaction().await.unwrap();
    tx.query("SELECT id, status FROM jobs WHERE id = ANY($1) ORDER BY id FOR SHARE", &[&vec![parent]]).await.unwrap();
    let child: Uuid = tx
        .query_one(
            "INSERT INTO jobs (payload, status, waiting_on) VALUES ('\"child\"', 'waiting', 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.execute("INSERT INTO job_dependencies (parent, child) VALUES ($1, $2)", &[&parent, &child]).await.unwrap();

    // The parent's completion, at its row's address as the completer writes a drain's successes.
    let done = Finish { row: Some(claimed.rows[0]), result: None, ..finish(parent, 1, JobStatus::Done) };
    let completion = tokio::spawn(async move {
        let written = queries::job_finish_batch(&mut conn, "me", &[done]).await.unwrap();
        (conn, written)
    });
    // It waits for the insert's lock on the parent.
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%finished%'";
    common::wait_count(&c, Duration::from_secs(10), "the completion waiting for the parent's lock", waiting, 1).await;
    tx.commit().await.unwrap();

    let (_conn, written) = completion.await.unwrap();
    assert_eq!(written, vec![(parent, JobStatus::Done)]);
    assert_eq!(status_of(&c, child).await, "pending", "the child whose last parent is done runs");
}
