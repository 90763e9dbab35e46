//! The engine's statements one by one, against a real database: fencing, cancellation winning over a
//! retry, the rescuer's three outcomes, heartbeats reporting cancellations and lost leases.

mod common;

use std::time::Duration;

use common::TestDb;
use jobqueue::db::queries::{self, Finish};
use jobqueue::db::Conn;
use jobqueue::JobStatus;
use serde_json::json;
use uuid::Uuid;

async fn setup() -> (TestDb, tokio_postgres::Client, Conn) {
    let db = TestDb::new().await;
    let c = db.client().await;
    let conn = Conn::connect(&db.url, &jobqueue::logging::discard()).await.unwrap();
    (db, c, conn)
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
    }
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
    let full = queries::job_claim(&mut conn, "default", 4, "me", Duration::from_secs(30), 5).await.unwrap();
    assert_eq!(full.jobs.len(), 4);
    let mut priorities: Vec<i32> = full.jobs.iter().map(|j| j.priority).collect();
    priorities.sort();
    assert_eq!(priorities, vec![0, 0, 0, 1], "most urgent first");
    assert!(full.jobs.iter().all(|j| j.status == JobStatus::Processing && j.attempts == 1));
    assert!(full.jobs.iter().all(|j| j.max_attempts == Some(5) && j.locked_by.as_deref() == Some("me")));
    assert_eq!(full.next_due_in, None, "a full claim skips the timer lookup");

    let short = queries::job_claim(&mut conn, "default", 100, "me", Duration::from_secs(30), 5).await.unwrap();
    assert_eq!(short.jobs.len(), 5);
    let due = short.next_due_in.expect("next due reported");
    assert!(due > Duration::from_secs(25) && due <= Duration::from_secs(30), "{due:?}: the sooner job, any priority");

    let empty = queries::job_claim(&mut conn, "other", 10, "me", Duration::from_secs(30), 5).await.unwrap();
    assert!(empty.jobs.is_empty() && empty.next_due_in.is_none());
}

#[tokio::test]
async fn finishing_is_fenced_on_holder_and_attempt() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'), ('2')").await.unwrap();
    let jobs = queries::job_claim(&mut conn, "default", 2, "me", Duration::from_secs(30), 5).await.unwrap().jobs;
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

#[tokio::test]
async fn a_requested_cancellation_wins_over_a_retry() {
    let (_db, c, mut conn) = setup().await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'), ('2')").await.unwrap();
    let jobs = queries::job_claim(&mut conn, "default", 2, "me", Duration::from_secs(30), 5).await.unwrap().jobs;
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
    let jobs = queries::job_claim(&mut conn, "default", 3, "me", Duration::from_secs(1), 5).await.unwrap().jobs;
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    c.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = $1", &[&ids[0]]).await.unwrap();
    // The third was taken over by someone else (as the rescuer and another claim would).
    c.execute("UPDATE jobs SET locked_by = 'other' WHERE id = $1", &[&ids[2]]).await.unwrap();
    let beat = queries::job_heartbeat(&mut conn, &ids, "me", Duration::from_secs(60)).await.unwrap();
    let beat: std::collections::HashMap<Uuid, bool> = beat.into_iter().collect();
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
    let jobs = queries::job_claim(&mut conn, "default", 4, "dead", Duration::from_secs(30), 3).await.unwrap().jobs;
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
