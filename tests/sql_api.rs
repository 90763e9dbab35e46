//! The SQL API (db/migrations/V5__sql_api.sql) as a psql user meets it: `jobqueue_cancel`,
//! `jobqueue_retry`, `jobqueue_pause` and `jobqueue_resume` called from a plain connection, with the
//! outcomes and the wake-ups the API tests check for the same endpoints.

mod common;

use std::time::Duration;

use common::{count, eventually, wait_count, TestDb};
use futures_util::StreamExt;
use jobqueue::{Builder, HandlerError, JobContext};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

/// A connection listening on both channels; notifications arrive as (channel, payload).
async fn listener(url: &str) -> (Client, UnboundedReceiver<(String, String)>) {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut s = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = s.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    client.batch_execute("LISTEN jobqueue; LISTEN jobqueue_cancel").await.unwrap();
    (client, rx)
}

/// Waits for the notification `(channel, payload)`, skipping others.
async fn expect_notification(rx: &mut UnboundedReceiver<(String, String)>, channel: &str, payload: &str) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some((c, p)) = rx.recv().await {
            if c == channel && p == payload {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no NOTIFY {channel}, {payload:?}");
}

async fn one(c: &Client, sql: &str) -> String {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

async fn status(c: &Client, id: Uuid) -> String {
    c.query_one("SELECT status FROM jobs WHERE id = $1", &[&id]).await.unwrap().get(0)
}

async fn insert(c: &Client, queue: &str, status: &str) -> Uuid {
    let finished = if matches!(status, "done" | "failed" | "cancelled") { "now()" } else { "NULL" };
    c.query_one(
        &format!(
            "INSERT INTO jobs (payload, queue, status, finished_at, attempts) VALUES ('{{}}', $1, $2, {finished}, 3)
             RETURNING id"
        ),
        &[&queue, &status],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn cancel_and_retry_from_psql_follow_the_state_machine_and_wake_the_queue() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (_l, mut rx) = listener(&db.url).await;

    let pending = insert(&c, "email", "pending").await;
    assert_eq!(one(&c, &format!("SELECT jobqueue_cancel('{pending}')")).await, "cancelled");
    assert_eq!(status(&c, pending).await, "cancelled");
    let finished_at_set = "SELECT count(*) FROM jobs WHERE status = 'cancelled' AND finished_at IS NOT NULL";
    assert_eq!(count(&c, finished_at_set).await, 1);
    // Cancelling again changes nothing and says why; an unknown id is reported, not an error.
    assert_eq!(one(&c, &format!("SELECT jobqueue_cancel('{pending}')")).await, "finished");
    assert_eq!(one(&c, &format!("SELECT jobqueue_cancel('{}')", Uuid::new_v4())).await, "not_found");

    // Retry puts it back to pending with attempts reset, and wakes the queue's workers.
    assert_eq!(one(&c, &format!("SELECT jobqueue_retry('{pending}')")).await, "retried");
    expect_notification(&mut rx, "jobqueue", "email").await;
    let row = c.query_one("SELECT status, attempts, finished_at IS NULL FROM jobs WHERE id = $1", &[&pending]).await;
    let row = row.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, bool>(2)), ("pending".into(), 0, true));
    // Pending, processing and done jobs are refused, as the API's 409.
    assert_eq!(one(&c, &format!("SELECT jobqueue_retry('{pending}')")).await, "refused");
    let done = insert(&c, "email", "done").await;
    assert_eq!(one(&c, &format!("SELECT jobqueue_retry('{done}')")).await, "refused");
    assert_eq!(status(&c, done).await, "done");
    assert_eq!(one(&c, &format!("SELECT jobqueue_retry('{}')", Uuid::new_v4())).await, "not_found");
}

#[tokio::test]
async fn retry_over_a_filter_retries_exactly_the_matching_rows() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (_l, mut rx) = listener(&db.url).await;
    for _ in 0..5 {
        insert(&c, "email", "failed").await;
    }
    insert(&c, "email", "done").await;
    insert(&c, "other", "failed").await;
    let rows =
        c.query("SELECT jobqueue_retry(id) FROM jobs WHERE status = 'failed' AND queue = 'email'", &[]).await.unwrap();
    let outcomes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(outcomes, vec!["retried"; 5]);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE queue = 'email' AND status = 'pending'").await, 5);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE queue = 'other' AND status = 'failed'").await, 1);
    expect_notification(&mut rx, "jobqueue", "email").await;
}

/// The holder of a running job stops its handler when psql cancels it: the NOTIFY reaches it at once.
/// The lease is so long that the heartbeat (every lease / 3) cannot be what noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_from_psql_stops_its_handler() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (_l, mut rx) = listener(&db.url).await;
    let handler = |ctx: JobContext| async move {
        ctx.cancelled().await;
        Err::<Value, _>(HandlerError::fail("stopped by the cancel signal"))
    };
    let config = jobqueue::Config { job_lease: Duration::from_secs(600), ..db.config(1) };
    let service = Builder::new(config).handler("default", handler).start().await.unwrap();
    let id: Uuid = c.query_one("INSERT INTO jobs (payload) VALUES ('1') RETURNING id", &[]).await.unwrap().get(0);
    wait_count(&c, Duration::from_secs(10), "job running", "SELECT count(*) FROM jobs WHERE status = 'processing'", 1)
        .await;

    assert_eq!(one(&c, &format!("SELECT jobqueue_cancel('{id}')")).await, "requested");
    expect_notification(&mut rx, "jobqueue_cancel", &id.to_string()).await;
    eventually(Duration::from_secs(20), "the holder ended the job cancelled", || async {
        (status(&c, id).await == "cancelled").then_some(())
    })
    .await;
    let row = c.query_one("SELECT cancel_requested_at IS NOT NULL, locked_by FROM jobs WHERE id = $1", &[&id]).await;
    let row = row.unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<String>>(1), None);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_from_psql_hold_and_release_the_queue() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (_l, mut rx) = listener(&db.url).await;
    let service = common::start_with(db.config(2), common::noop()).await;
    let paused: bool = c.query_one("SELECT jobqueue_pause('default')", &[]).await.unwrap().get(0);
    assert!(paused);
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 10) AS i").await.unwrap();
    // The inserts woke the workers (this connection heard the same NOTIFY), and they claimed nothing.
    expect_notification(&mut rx, "jobqueue", "default").await;
    let claimed_nothing = "SELECT count(*) FROM jobs WHERE status = 'pending'";
    assert_eq!(count(&c, claimed_nothing).await, 10);
    assert_eq!(count(&c, "SELECT count(*) FROM queues WHERE name = 'default' AND paused").await, 1);

    let paused: bool = c.query_one("SELECT jobqueue_resume('default')", &[]).await.unwrap().get(0);
    assert!(!paused);
    expect_notification(&mut rx, "jobqueue", "default").await;
    wait_count(&c, Duration::from_secs(10), "all done", "SELECT count(*) FROM jobs WHERE status = 'done'", 10).await;
    service.stop().await.expect("stops cleanly");
}
