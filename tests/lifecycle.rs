//! Job lifecycle features: queues with their own concurrency, priorities, retry policy, snooze and
//! permanent failure, cancellation across instances, waiting for a result, retention.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{count, http, wait_count, Proc, TestDb, EXECUTIONS_DDL};
use jobqueue::{Builder, HandlerError, JobContext, QueueConfig, RetryPolicy};
use serde_json::{json, Value};
use uuid::Uuid;

#[test]
#[ignore = "runs only as a child process of the other tests"]
fn child_instance() {
    common::child_main();
}

fn queue(name: &str, concurrency: usize, retry: RetryPolicy) -> QueueConfig {
    QueueConfig { retry, ..QueueConfig::new(name, concurrency) }
}

fn quick_retry(max_attempts: i32) -> RetryPolicy {
    RetryPolicy { max_attempts, backoff: Duration::from_millis(50), backoff_max: Duration::from_secs(1), jitter: 0.0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_queue_does_not_starve_another() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut config = db.config(1);
    config.queues = vec![queue("flood", 2, RetryPolicy::default()), queue("email", 1, RetryPolicy::default())];
    let slow = |_ctx: JobContext| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, HandlerError>(Value::Null)
    };
    let fast = |_ctx: JobContext| async { Ok::<_, HandlerError>(Value::Null) };
    let svc = Builder::new(config).handler("flood", slow).handler("email", fast).start().await.unwrap();
    c.batch_execute("INSERT INTO jobs (payload, queue) SELECT '1', 'flood' FROM generate_series(1, 1000)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO jobs (payload, queue) SELECT '1', 'email' FROM generate_series(1, 20)").await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(5),
        "all email jobs done",
        "SELECT count(*) FROM jobs WHERE queue = 'email' AND status = 'done'",
        20,
    )
    .await;
    let flood_left = count(&c, "SELECT count(*) FROM jobs WHERE queue = 'flood' AND status <> 'done'").await;
    assert!(flood_left > 800, "the flood is still being worked through ({flood_left} left)");
    // The flood queue holds at most its concurrency of 2 running plus 2 claimed ahead. A job's place
    // is given back when its outcome is handed to the completer, so up to 2 more may still read
    // processing until their outcomes are written (5 were seen on a loaded machine).
    let processing = count(&c, "SELECT count(*) FROM jobs WHERE queue = 'flood' AND status = 'processing'").await;
    assert!(processing <= 6, "{processing} flood jobs processing");
    svc.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priority_runs_first_then_fifo() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // Inserted before any worker runs, in an order unlike the expected one.
    c.batch_execute(
        "INSERT INTO jobs (payload, priority, run_at) VALUES
            ('\"c\"', 0, now() - interval '3 s'),
            ('\"e\"', 5, now() - interval '9 s'),
            ('\"a\"', -10, now() - interval '1 s'),
            ('\"d\"', 0, now() - interval '2 s'),
            ('\"b\"', -10, now());",
    )
    .await
    .unwrap();
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler = {
        let order = order.clone();
        move |ctx: JobContext| {
            order.lock().unwrap().push(ctx.job.payload.as_str().unwrap().to_string());
            async { Ok::<_, HandlerError>(Value::Null) }
        }
    };
    let svc = common::start_with(db.config(1), handler).await;
    wait_count(&c, Duration::from_secs(10), "all done", "SELECT count(*) FROM jobs WHERE status = 'done'", 5).await;
    svc.stop().await.expect("stops cleanly");
    assert_eq!(*order.lock().unwrap(), vec!["a", "b", "c", "d", "e"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_job_max_attempts_and_permanent_failure_and_snooze() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut config = db.config(4);
    config.queues = vec![queue("default", 4, quick_retry(5))];
    let snoozed_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let snoozed_at = snoozed_at.clone();
        move |ctx: JobContext| {
            let kind = ctx.job.payload["kind"].as_str().unwrap_or("").to_string();
            let first = ctx.job.errors.as_array().is_none_or(|e| e.is_empty());
            if kind == "snooze" {
                snoozed_at.lock().unwrap().push(Instant::now());
            }
            let snoozes = snoozed_at.lock().unwrap().len();
            async move {
                match kind.as_str() {
                    "flaky" => Err(HandlerError::retry("still broken")),
                    "fatal" => Err(HandlerError::fail("bad input; retrying cannot help")),
                    "snooze" if snoozes == 1 && first => Err(HandlerError::snooze(Duration::from_millis(400))),
                    _ => Ok(json!("ok")),
                }
            }
        }
    };
    let svc = common::start_with(config, handler).await;
    let flaky: Uuid = c
        .query_one("INSERT INTO jobs (payload, max_attempts) VALUES ('{\"kind\": \"flaky\"}', 2) RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let fatal: Uuid = c
        .query_one("INSERT INTO jobs (payload) VALUES ('{\"kind\": \"fatal\"}') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let snooze: Uuid = c
        .query_one("INSERT INTO jobs (payload) VALUES ('{\"kind\": \"snooze\"}') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    wait_count(
        &c,
        Duration::from_secs(10),
        "three jobs finished",
        "SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL",
        3,
    )
    .await;
    svc.stop().await.expect("stops cleanly");

    let row = c.query_one("SELECT status, attempts, error FROM jobs WHERE id = $1", &[&flaky]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("failed".into(), 2),
        "the job's own max_attempts wins"
    );
    let row = c.query_one("SELECT status, attempts, error FROM jobs WHERE id = $1", &[&fatal]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), ("failed".into(), 1), "no retry after fail()");
    assert_eq!(row.get::<_, String>(2), "bad input; retrying cannot help");
    let row = c.query_one("SELECT status, attempts, errors FROM jobs WHERE id = $1", &[&snooze]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), ("done".into(), 1), "the snooze did not count");
    assert_eq!(row.get::<_, Value>(2), json!([]), "a snooze is not an error");
    let times = snoozed_at.lock().unwrap().clone();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] >= Duration::from_millis(400), "ran again only after the snooze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_history_is_capped_at_twenty() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut config = db.config(1);
    config.queues = vec![queue(
        "default",
        1,
        RetryPolicy { max_attempts: 25, backoff: Duration::ZERO, backoff_max: Duration::ZERO, jitter: 0.0 },
    )];
    let handler =
        |ctx: JobContext| async move { Err::<Value, _>(HandlerError::retry(format!("fail {}", ctx.job.attempts))) };
    let svc = common::start_with(config, handler).await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1')").await.unwrap();
    wait_count(&c, Duration::from_secs(20), "job failed", "SELECT count(*) FROM jobs WHERE status = 'failed'", 1).await;
    svc.stop().await.expect("stops cleanly");
    let errors: Value = c.query_one("SELECT errors FROM jobs", &[]).await.unwrap().get(0);
    let errors = errors.as_array().unwrap();
    assert_eq!(errors.len(), 20);
    assert_eq!(errors[0]["attempt"], 6, "oldest dropped first");
    assert_eq!(errors[19]["error"], "fail 25");
    assert!(errors[19]["at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_running_on_another_instance() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    // The worker is another process; the API is this one, with no handler at all.
    let _worker = Proc::instance("worker", &[db.env(), vec![("JQ_SLEEP_MS".into(), "60000".into())]].concat());
    let mut api_config = db.config(1);
    api_config.queues = vec![];
    let api = Builder::new(api_config).start().await.unwrap();
    let addr = api.local_addr().unwrap();

    let r = http(addr, "POST", "/jobs", Some(r#"{"payload": "long"}"#)).await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_count(
        &c,
        Duration::from_secs(20),
        "job running on the worker",
        "SELECT count(*) FROM jobs WHERE status = 'processing' AND locked_by = 'worker'",
        1,
    )
    .await;
    let t = Instant::now();
    let r = http(addr, "POST", &format!("/jobs/{id}/cancel"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["cancel_requested_at"].is_string());
    let r = http(addr, "GET", &format!("/jobs/{id}?wait=10s"), None).await;
    assert_eq!(r.json()["status"], "cancelled", "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(3), "cancelled promptly, took {:?}", t.elapsed());
    assert_eq!(count(&c, "SELECT count(*) FROM test_executions").await, 1);
    // A cancelled job can be retried.
    let r = http(addr, "POST", &format!("/jobs/{id}/retry"), None).await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("pending")));
    api.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_answers_when_another_process_finishes_the_job() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let mut api_config = db.config(1);
    api_config.queues = vec![];
    let api = Builder::new(api_config).start().await.unwrap();
    let addr = api.local_addr().unwrap();

    // No worker yet: the wait runs out and answers with the job as it is.
    let r = http(addr, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let r = http(addr, "GET", &format!("/jobs/{id}?wait=500ms"), None).await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("pending")));
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert_error_400(http(addr, "GET", &format!("/jobs/{id}?wait=forever"), None).await);
    assert_error_400(http(addr, "GET", &format!("/jobs/{id}?wait=1h"), None).await);

    // Many clients wait; a worker process starts and finishes the job (it sleeps 1s first).
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let path = format!("/jobs/{id}?wait=20s");
            tokio::spawn(async move { http(addr, "GET", &path, None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let _worker = Proc::instance("worker", &[db.env(), vec![("JQ_SLEEP_MS".into(), "1000".into())]].concat());
    for w in waiting {
        let r = w.await.unwrap();
        assert_eq!(r.status, 200);
        let job = r.json();
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["result"], "worker");
    }
    assert!(t.elapsed() < Duration::from_secs(15), "answered when done, not at the deadline ({:?})", t.elapsed());
    api.stop().await.expect("stops cleanly");
}

fn assert_error_400(r: common::HttpResponse) {
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_what_it_should() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO jobs (payload, status, finished_at) VALUES
            ('\"done-old\"', 'done', now() - interval '8 days'),
            ('\"done-new\"', 'done', now() - interval '6 days'),
            ('\"failed-old\"', 'failed', now() - interval '8 days'),
            ('\"failed-ancient\"', 'failed', now() - interval '31 days'),
            ('\"cancelled-old\"', 'cancelled', now() - interval '8 days');
         INSERT INTO jobs (payload, created_at, run_at) VALUES ('\"pending-old\"', now() - interval '90 days', now() + interval '1 day');",
    )
    .await
    .unwrap();
    let mut config = db.config(1);
    config.maintenance_interval = Duration::from_millis(100);
    let svc = common::start_with(config, common::noop()).await;
    wait_count(&c, Duration::from_secs(10), "old finished jobs deleted", "SELECT count(*) FROM jobs", 3).await;
    let left: Vec<String> =
        c.query("SELECT payload #>> '{}' FROM jobs ORDER BY 1", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, vec!["done-new", "failed-old", "pending-old"]);
    svc.stop().await.expect("stops cleanly");

    // Retention 0 keeps everything of that status.
    c.batch_execute("INSERT INTO jobs (payload, status, finished_at) VALUES ('\"done-ancient\"', 'done', now() - interval '400 days')")
        .await
        .unwrap();
    let mut config = db.config(1);
    config.maintenance_interval = Duration::from_millis(100);
    config.retention.done = None;
    config.retention.failed = Some(Duration::from_secs(86400));
    let svc = common::start_with(config, common::noop()).await;
    wait_count(
        &c,
        Duration::from_secs(10),
        "failed-old deleted",
        "SELECT count(*) FROM jobs WHERE status = 'failed'",
        0,
    )
    .await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'done'").await, 2, "done jobs kept");
    svc.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_setting_configures_the_binary() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let env = [db.env(), vec![("QUEUES".into(), "default:2,email:1:max_attempts=3".into())]].concat();
    let _p = Proc::jobqueue("serve", &["serve"], &env);
    c.batch_execute("INSERT INTO jobs (payload, queue) VALUES ('1', 'email'), ('2', 'default'), ('3', 'unserved')")
        .await
        .unwrap();
    wait_count(
        &c,
        Duration::from_secs(20),
        "email and default jobs done",
        "SELECT count(*) FROM jobs WHERE status = 'done'",
        2,
    )
    .await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE queue = 'email' AND max_attempts = 3").await, 1);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE queue = 'unserved' AND status = 'pending'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_requested_while_the_listener_reconnects_stops_the_job_without_waiting_for_the_heartbeat() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // A long lease: the heartbeat ticks every 100 s, so only the listener's reconnection can bring
    // the cancel request in time.
    let mut config = db.config(1);
    config.job_lease = Duration::from_secs(300);
    let handler = |ctx: JobContext| async move {
        ctx.cancelled().await;
        Ok::<Value, HandlerError>(Value::Null)
    };
    let svc = common::start_with(config, handler).await;
    let listening = "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'jobqueue-listener'";
    wait_count(&c, Duration::from_secs(20), "the listener listening", listening, 1).await;
    let id: Uuid = c.query_one("INSERT INTO jobs (payload) VALUES ('1') RETURNING id", &[]).await.unwrap().get(0);
    wait_count(&c, Duration::from_secs(20), "job running", "SELECT count(*) FROM jobs WHERE status = 'processing'", 1)
        .await;
    // Cut the listen connection and wait for its backend to be gone, then request the cancel: its
    // notification reaches no one (the listener reconnects after a backoff of at least 100 ms).
    let cut: bool = c
        .query_one(
            "SELECT bool_and(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'jobqueue-listener'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cut, "the listen connection was not cut");
    let answer: String = c.query_one("SELECT jobqueue_cancel($1)", &[&id]).await.unwrap().get(0);
    assert_eq!(answer, "requested");
    wait_count(&c, Duration::from_secs(20), "job cancelled", "SELECT count(*) FROM jobs WHERE status = 'cancelled'", 1)
        .await;
    svc.stop().await.expect("stops cleanly");
}
