//! The engine under real conditions: several processes on one database, kill -9, SIGTERM, a cut LISTEN
//! connection, delayed jobs with polling effectively off, failing and panicking handlers.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{count, eventually, start_with, wait_count, Proc, TestDb, EXECUTIONS_DDL};
use jobqueue::{HandlerError, JobContext, QueueConfig, RetryPolicy};
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

/// Run by `Proc::instance`: a service instance whose handler records executions.
#[test]
#[ignore = "runs only as a child process of the other tests"]
fn child_instance() {
    common::child_main();
}

async fn wait_listeners(c: &Client, n: i64) {
    eventually(Duration::from_secs(60), &format!("{n} instance(s) listening"), || async {
        let got = count(
            c,
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'jobqueue-listener'",
        )
        .await;
        (got == n).then_some(())
    })
    .await;
}

/// Inserts 10,000 jobs in ten statements of 1000, so that work arrives while the instances are
/// already busy, and waits until all are done.
async fn insert_ten_thousand_and_wait(c: &Client) {
    for chunk in 0..10 {
        c.execute(
            "INSERT INTO jobs (payload) SELECT jsonb_build_object('n', i) FROM generate_series($1::int, $1::int + 999) AS i",
            &[&(chunk * 1000)],
        )
        .await
        .unwrap();
    }
    let done = "SELECT count(*) FROM jobs WHERE status = 'done'";
    wait_count(c, Duration::from_secs(180), "all 10,000 jobs done", done, 10_000).await;
}

/// Inserts one job with plain SQL and waits until it is done.
async fn insert_and_wait_done(c: &Client, within: Duration, what: &str) {
    let id: Uuid = c.query_one("INSERT INTO jobs (payload) VALUES ('1') RETURNING id", &[]).await.unwrap().get(0);
    let sql = format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'done'");
    wait_count(c, within, what, &sql, 1).await;
}

fn with(env: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_three_processes_each_done_exactly_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let env = with(&db.env(), &[("WORKERS", "8"), ("POLL_INTERVAL", "1s")]);
    let _procs: Vec<Proc> = (0..3).map(|i| Proc::instance(&format!("inst-{i}"), &env)).collect();
    wait_listeners(&c, 3).await;

    insert_ten_thousand_and_wait(&c).await;

    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status <> 'done'").await, 0);
    assert_eq!(count(&c, "SELECT count(*) FROM test_executions").await, 10_000, "no job ran twice");
    assert_eq!(count(&c, "SELECT count(DISTINCT job_id) FROM test_executions").await, 10_000);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE attempts <> 1").await, 0);
    // The result names the instance that ran the job, and it is the one that recorded the execution.
    assert_eq!(
        count(&c, "SELECT count(*) FROM jobs j JOIN test_executions e ON e.job_id = j.id WHERE j.result <> to_jsonb(e.instance)")
            .await,
        0
    );
    let per_instance = count(&c, "SELECT count(DISTINCT instance) FROM test_executions").await;
    assert_eq!(per_instance, 3, "all three instances took work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_job_loses_nothing_and_completes_nothing_twice() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let env = with(
        &db.env(),
        &[("WORKERS", "8"), ("JQ_SLEEP_MS", "100"), ("JOB_LEASE", "2s"), ("MAINTENANCE_INTERVAL", "300ms")],
    );
    let mut victim = Proc::instance("victim", &env);
    let _others: Vec<Proc> = (0..2).map(|i| Proc::instance(&format!("survivor-{i}"), &env)).collect();
    wait_listeners(&c, 3).await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 600) AS i").await.unwrap();

    eventually(Duration::from_secs(30), "the victim holds jobs", || async {
        (count(&c, "SELECT count(*) FROM jobs WHERE locked_by = 'victim' AND status = 'processing'").await >= 4)
            .then_some(())
    })
    .await;
    victim.signal("KILL");
    assert_eq!(victim.wait(Duration::from_secs(10)).await, None, "killed by a signal");
    // The dead process can change nothing now: what it holds is exactly what it was running.
    let held: HashSet<Uuid> = c
        .query("SELECT id FROM jobs WHERE locked_by = 'victim' AND status = 'processing'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!held.is_empty());

    wait_count(
        &c,
        Duration::from_secs(120),
        "all 600 jobs done",
        "SELECT count(*) FROM jobs WHERE status = 'done'",
        600,
    )
    .await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status <> 'done'").await, 0, "nothing lost");
    // Survivors ran every job at most once.
    assert_eq!(
        count(&c, "SELECT count(*) FROM (SELECT job_id FROM test_executions WHERE instance <> 'victim' GROUP BY job_id HAVING count(*) > 1) t").await,
        0
    );
    // Only the jobs the victim held when it died ran twice, and each of those was finished by a survivor.
    let twice: HashSet<Uuid> = c
        .query("SELECT job_id FROM test_executions GROUP BY job_id HAVING count(*) > 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(twice.is_subset(&held), "{twice:?} not within {held:?}");
    let held_ids: Vec<Uuid> = held.iter().copied().collect();
    let rows = c.query("SELECT result, attempts, errors FROM jobs WHERE id = ANY($1)", &[&held_ids]).await.unwrap();
    for r in rows {
        let result: Value = r.get(0);
        assert!(result.as_str().unwrap().starts_with("survivor-"), "{result}");
        assert_eq!(r.get::<_, i32>(1), 2, "the lost attempt counts");
        let errors: Value = r.get(2);
        assert!(errors[0]["error"].as_str().unwrap().contains("worker lost"), "{errors}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_inserted_while_no_instance_runs_are_processed_on_start() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 1000) AS i").await.unwrap();
    let _p = Proc::jobqueue("serve", &["serve"], &with(&db.env(), &[("POLL_INTERVAL", "60s")]));
    wait_count(&c, Duration::from_secs(60), "1000 jobs done", "SELECT count(*) FROM jobs WHERE status = 'done'", 1000)
        .await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM jobs WHERE result = '\"Job processed successfully\"' AND attempts = 1").await,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_unfinished_jobs_and_the_next_start_finishes_them() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let env = with(&db.env(), &[("WORKERS", "4"), ("SHUTDOWN_TIMEOUT", "1s")]);
    let mut first = Proc::instance("first", &with(&env, &[("JQ_SLEEP_MS", "60000")]));
    wait_listeners(&c, 1).await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 10) AS i").await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(30),
        "eight jobs held: four running, four claimed ahead",
        "SELECT count(*) FROM jobs WHERE status = 'processing'",
        8,
    )
    .await;

    let t = Instant::now();
    first.signal("TERM");
    assert_eq!(first.wait(Duration::from_secs(15)).await, Some(0), "graceful exit");
    assert!(t.elapsed() < Duration::from_secs(8), "bounded by SHUTDOWN_TIMEOUT, took {:?}", t.elapsed());
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'pending'").await, 10);
    assert_eq!(
        count(&c, "SELECT count(*) FROM jobs WHERE attempts <> 0 OR locked_by IS NOT NULL").await,
        0,
        "released without counting the interrupted attempt"
    );
    assert!(first.stderr().contains("released"), "logs what it released");

    let _second = Proc::instance("second", &env);
    wait_count(
        &c,
        Duration::from_secs(30),
        "all ten done by the next start",
        "SELECT count(*) FROM jobs WHERE status = 'done' AND result = '\"second\"'",
        10,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_serve_exits_0() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut p = Proc::jobqueue("serve", &["serve"], &db.env());
    wait_listeners(&c, 1).await;
    p.signal("TERM");
    assert_eq!(p.wait(Duration::from_secs(10)).await, Some(0), "{}", p.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_wake_workers_and_survive_a_cut_listen_connection() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // Polling is effectively off: only NOTIFY (and the reconnect sweep) can wake the workers.
    let _p = Proc::jobqueue("serve", &["serve"], &with(&db.env(), &[("POLL_INTERVAL", "60s")]));
    wait_listeners(&c, 1).await;
    // Let the start-up sweep finish so that it cannot be what picks up the job.
    tokio::time::sleep(Duration::from_millis(200)).await;

    insert_and_wait_done(&c, Duration::from_secs(1), "job done within a second").await;

    let killed = count(
        &c,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'jobqueue-listener'",
    )
    .await;
    assert_eq!(killed, 1);
    insert_and_wait_done(&c, Duration::from_secs(2), "job done within two seconds of the cut").await;
    wait_listeners(&c, 1).await;
    // And the new connection is listening, not only the sweep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    insert_and_wait_done(&c, Duration::from_secs(1), "job done within a second after reconnecting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_starts_on_time_without_polling() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let _p = Proc::instance("timer", &with(&db.env(), &[("POLL_INTERVAL", "60s")]));
    wait_listeners(&c, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id: Uuid = c
        .query_one("INSERT INTO jobs (payload, run_at) VALUES ('1', now() + interval '2 seconds') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    eventually(Duration::from_secs(10), "delayed job done", || async {
        let done = count(&c, &format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'done'")).await;
        (done == 1).then_some(())
    })
    .await;
    let late_ms: f64 = c
        .query_one(
            "SELECT extract(epoch FROM e.at - j.run_at)::float8 * 1000 FROM jobs j JOIN test_executions e ON e.job_id = j.id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!((0.0..500.0).contains(&late_ms), "started {late_ms:.0} ms after run_at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_without_a_handler_here_are_left_alone() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let svc = start_with(db.config(2), common::noop()).await;
    c.batch_execute(
        "INSERT INTO jobs (payload, queue) VALUES ('1', 'elsewhere'); INSERT INTO jobs (payload) VALUES ('2');",
    )
    .await
    .unwrap();
    wait_count(
        &c,
        Duration::from_secs(5),
        "default job done",
        "SELECT count(*) FROM jobs WHERE queue = 'default' AND status = 'done'",
        1,
    )
    .await;
    // The default job went through a full cycle; the other queue's job was never touched.
    assert_eq!(
        count(&c, "SELECT count(*) FROM jobs WHERE queue = 'elsewhere' AND status = 'pending' AND attempts = 0").await,
        1
    );
    svc.stop().await.expect("stops cleanly");
}

/// In-process instance whose default queue retries fast, for the failure-path tests.
fn fast_retry_config(db: &TestDb, max_attempts: i32) -> jobqueue::Config {
    let mut config = db.config(2);
    config.queues = vec![QueueConfig {
        retry: RetryPolicy {
            max_attempts,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            jitter: 0.0,
        },
        ..QueueConfig::new("default", 2)
    }];
    config.poll_interval = Duration::from_secs(60);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_retried_with_growing_delays_then_fails() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let seen: Arc<Mutex<Vec<(i32, Instant)>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |ctx: JobContext| {
            seen.lock().unwrap().push((ctx.job.attempts, Instant::now()));
            let n = ctx.job.attempts;
            async move { Err::<Value, _>(HandlerError::retry(format!("boom {n}"))) }
        }
    };
    let svc = start_with(fast_retry_config(&db, 4), handler).await;
    let id: Uuid = c.query_one("INSERT INTO jobs (payload) VALUES ('1') RETURNING id", &[]).await.unwrap().get(0);
    wait_count(&c, Duration::from_secs(15), "job failed", "SELECT count(*) FROM jobs WHERE status = 'failed'", 1).await;
    svc.stop().await.expect("stops cleanly");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let gaps: Vec<u128> = seen.windows(2).map(|w| (w[1].1 - w[0].1).as_millis()).collect();
    // Backoff 200ms doubling: 200, 400, 800 (no jitter), each on time thanks to the timer.
    for (gap, expected) in gaps.iter().zip([200u128, 400, 800]) {
        assert!(*gap >= expected && *gap < expected + 400, "gaps {gaps:?}");
    }
    let row = c
        .query_one("SELECT error, errors, attempts, finished_at IS NOT NULL FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "boom 4");
    let errors: Value = row.get(1);
    let history: Vec<(i64, String)> = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["attempt"].as_i64().unwrap(), e["error"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(history, (1..=4).map(|i| (i, format!("boom {i}"))).collect::<Vec<_>>());
    // Each entry says when its attempt started: after the previous attempt ended (the backoff) and
    // before its own end.
    let time = |e: &Value, k: &str| {
        chrono::DateTime::parse_from_rfc3339(e[k].as_str().unwrap_or_else(|| panic!("{k} in {e}"))).unwrap()
    };
    let entries = errors.as_array().unwrap();
    for (i, e) in entries.iter().enumerate() {
        assert!(time(e, "started_at") <= time(e, "at"), "{e}");
        if i > 0 {
            assert!(time(&entries[i - 1], "at") < time(e, "started_at"), "{errors}");
        }
    }
    assert_eq!(row.get::<_, i32>(2), 4);
    assert!(row.get::<_, bool>(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_and_the_worker_lives_on() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let handler = |ctx: JobContext| async move {
        if ctx.job.payload == serde_json::json!("panic") {
            panic!("handler exploded on purpose");
        }
        Ok::<_, HandlerError>(Value::Null)
    };
    let svc = start_with(fast_retry_config(&db, 3), handler).await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('\"panic\"')").await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(15),
        "panicking job failed",
        "SELECT count(*) FROM jobs WHERE status = 'failed' AND attempts = 3",
        1,
    )
    .await;
    let error: String = c.query_one("SELECT error FROM jobs WHERE status = 'failed'", &[]).await.unwrap().get(0);
    assert!(error.contains("panicked") && error.contains("exploded on purpose"), "{error}");
    // The same workers still process jobs.
    c.batch_execute("INSERT INTO jobs (payload) SELECT '\"fine\"' FROM generate_series(1, 20)").await.unwrap();
    wait_count(&c, Duration::from_secs(10), "later jobs done", "SELECT count(*) FROM jobs WHERE status = 'done'", 20)
        .await;
    svc.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_over_job_timeout_counts_as_an_error() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut config = fast_retry_config(&db, 1);
    config.job_timeout = Duration::from_millis(200);
    let handler = |_ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, HandlerError>(Value::Null)
    };
    let svc = start_with(config, handler).await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1')").await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(10),
        "timed-out job failed",
        "SELECT count(*) FROM jobs WHERE status = 'failed'",
        1,
    )
    .await;
    let error: String = c.query_one("SELECT error FROM jobs", &[]).await.unwrap().get(0);
    assert!(error.contains("timed out"), "{error}");
    svc.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_rescuer_recovers_the_jobs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let env = with(&db.env(), &[("JOB_LEASE", "1s"), ("MAINTENANCE_INTERVAL", "200ms"), ("SHUTDOWN_TIMEOUT", "60s")]);
    let mut stubborn = Proc::instance("stubborn", &with(&env, &[("JQ_SLEEP_MS", "60000"), ("WORKERS", "2")]));
    wait_listeners(&c, 1).await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'), ('2')").await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(20),
        "both jobs running",
        "SELECT count(*) FROM jobs WHERE status = 'processing'",
        2,
    )
    .await;

    stubborn.signal("TERM");
    // The first signal starts a drain that would wait up to a minute; the second ends it now.
    wait_listeners(&c, 0).await;
    let t = Instant::now();
    stubborn.signal("TERM");
    assert_eq!(stubborn.wait(Duration::from_secs(5)).await, Some(130));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'processing'").await, 2, "left to the rescuer");

    let _rescuer = Proc::instance("rescuer", &env);
    wait_count(
        &c,
        Duration::from_secs(20),
        "jobs rescued and done",
        "SELECT count(*) FROM jobs WHERE result = '\"rescuer\"'",
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_job_longer_than_its_lease() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    // Lease 1s, job 3s; a second instance runs the rescuer every 200 ms and would take the job over
    // if the holder stopped extending the lease.
    let env = with(&db.env(), &[("JOB_LEASE", "1s"), ("MAINTENANCE_INTERVAL", "200ms")]);
    let _holder = Proc::instance("holder", &with(&env, &[("JQ_SLEEP_MS", "3000")]));
    wait_listeners(&c, 1).await;
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1')").await.unwrap();
    wait_count(&c, Duration::from_secs(20), "job running", "SELECT count(*) FROM jobs WHERE status = 'processing'", 1)
        .await;
    let _other = Proc::instance("other", &env);
    wait_count(&c, Duration::from_secs(20), "job done", "SELECT count(*) FROM jobs WHERE status = 'done'", 1).await;
    assert_eq!(count(&c, "SELECT count(*) FROM test_executions").await, 1, "never rescued while alive");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE result = '\"holder\"' AND attempts = 1").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_jobqueue_serve_binaries_claim_each_job_exactly_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // The binary runs the original handler, which records nothing itself; a trigger records every
    // claim (each claim is one execution of the handler) with the instance that made it.
    c.batch_execute(
        "CREATE TABLE claims (job_id uuid NOT NULL, instance text NOT NULL, attempt int NOT NULL);
         CREATE FUNCTION record_claim() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO claims VALUES (NEW.id, NEW.locked_by, NEW.attempts);
             RETURN NULL;
         END $$;
         CREATE TRIGGER record_claim AFTER UPDATE ON jobs FOR EACH ROW
             WHEN (OLD.status = 'pending' AND NEW.status = 'processing') EXECUTE FUNCTION record_claim();",
    )
    .await
    .unwrap();
    let env = with(&db.env(), &[("WORKERS", "8")]);
    let _procs: Vec<Proc> = (0..3)
        .map(|i| Proc::jobqueue(&format!("serve-{i}"), &["serve", "--instance-id", &format!("serve-{i}")], &env))
        .collect();
    wait_listeners(&c, 3).await;
    insert_ten_thousand_and_wait(&c).await;
    assert_eq!(count(&c, "SELECT count(*) FROM claims").await, 10_000, "no job claimed twice");
    assert_eq!(count(&c, "SELECT count(DISTINCT job_id) FROM claims").await, 10_000);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE result <> '\"Job processed successfully\"'").await, 0);
    assert_eq!(count(&c, "SELECT count(DISTINCT instance) FROM claims").await, 3, "all three took work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_cut_mid_run_loses_nothing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(EXECUTIONS_DDL).await.unwrap();
    let env = with(
        &db.env(),
        &[("WORKERS", "8"), ("JQ_SLEEP_MS", "5"), ("JOB_LEASE", "2s"), ("MAINTENANCE_INTERVAL", "300ms")],
    );
    let _p = Proc::instance("cut", &env);
    wait_listeners(&c, 1).await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 3000) AS i").await.unwrap();
    // Three times during the run, terminate every connection of the instance: listener, producer,
    // completer, heartbeat and pool alike.
    let mut done = 0;
    for _ in 0..3 {
        done = eventually(Duration::from_secs(60), "progress since the last cut", || async {
            let now = count(&c, "SELECT count(*) FROM jobs WHERE status = 'done'").await;
            (now >= done + 200).then_some(now)
        })
        .await;
        let cut = count(
            &c,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await;
        assert!(cut >= 3, "cut {cut} connections");
    }
    wait_count(&c, Duration::from_secs(120), "all 3000 done", "SELECT count(*) FROM jobs WHERE status = 'done'", 3000)
        .await;
    // Nothing lost, and no attempt ran twice. (A handler whose own connection was cut fails that
    // attempt and is retried: a new attempt, which the count per attempt allows.)
    assert_eq!(count(&c, "SELECT count(DISTINCT job_id) FROM test_executions").await, 3000);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM (SELECT 1 FROM test_executions GROUP BY job_id, attempt HAVING count(*) > 1) t"
        )
        .await,
        0,
        "an attempt ran twice"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM jobs j WHERE j.attempts <> (SELECT max(attempt) FROM test_executions e WHERE e.job_id = j.id)"
        )
        .await,
        0,
        "each job finished by its last attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_postgres_cannot_store_fails_that_job_only() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let handler = |ctx: JobContext| async move {
        if ctx.job.payload == serde_json::json!("nul") {
            Ok::<_, HandlerError>(serde_json::json!({"text": "a\u{0}b"}))
        } else if ctx.job.payload == serde_json::json!("snooze-forever") && ctx.job.errors == serde_json::json!([]) {
            Err(HandlerError::snooze(Duration::MAX))
        } else {
            Ok(Value::Null)
        }
    };
    let svc = start_with(fast_retry_config(&db, 1), handler).await;
    c.batch_execute(
        "INSERT INTO jobs (payload) SELECT '\"fine\"' FROM generate_series(1, 50);
         INSERT INTO jobs (payload) VALUES ('\"nul\"'), ('\"snooze-forever\"');",
    )
    .await
    .unwrap();
    wait_count(&c, Duration::from_secs(10), "fine jobs done", "SELECT count(*) FROM jobs WHERE status = 'done'", 50)
        .await;
    wait_count(&c, Duration::from_secs(10), "nul job failed", "SELECT count(*) FROM jobs WHERE status = 'failed'", 1)
        .await;
    let error: String = c.query_one("SELECT error FROM jobs WHERE status = 'failed'", &[]).await.unwrap().get(0);
    assert!(error.contains("U+0000"), "{error}");
    // An absurd snooze is shortened to a year, not an overflow that would fail the batch.
    wait_count(
        &c,
        Duration::from_secs(10),
        "snoozed a year",
        "SELECT count(*) FROM jobs WHERE status = 'pending' AND run_at > now() + interval '360 days'",
        1,
    )
    .await;
    svc.stop().await.expect("stops cleanly");
}

/// A completer that falls behind must slow claiming down, not let it run ahead: outcomes waiting to be
/// written are bounded, and so are the rows left `processing`. Completions are made slow here (a
/// trigger sleeps a second in every statement that finishes jobs) while claims stay fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_completer_holds_claims_back() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE FUNCTION slow_finish() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM finished WHERE status = 'done') THEN PERFORM pg_sleep(1); END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER slow_finish AFTER UPDATE ON jobs REFERENCING NEW TABLE AS finished
             FOR EACH STATEMENT EXECUTE FUNCTION slow_finish();
         INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 5000) AS i;",
    )
    .await
    .unwrap();
    let svc = start_with(db.config(20), common::noop()).await;
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        most = most.max(count(&c, "SELECT count(*) FROM jobs WHERE status = 'processing'").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 20 running, at most 80 claimed ahead (quick handlers: four times the slots), at most 102 handed
    // over (the channel holds the room and the urgent reserve of 2) and one batch of those being
    // written. Without the bound it would be all 5,000.
    assert!(most <= 20 + 80 + 102 + 102, "{most} jobs stood processing at concurrency 20");
    assert!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'done'").await > 0, "completions went on");
    svc.stop().await.expect("stops cleanly");
}

/// A handler that records the payloads it started and waits for the gate to open.
fn gated(started: Arc<Mutex<Vec<Value>>>, gate: Arc<tokio::sync::Semaphore>) -> impl jobqueue::Handler {
    move |ctx: JobContext| {
        let (started, gate) = (started.clone(), gate.clone());
        async move {
            started.lock().unwrap().push(ctx.job.payload.clone());
            let _ = gate.acquire().await;
            Ok::<_, HandlerError>(Value::Null)
        }
    }
}

/// With one slot, a second job is claimed ahead: leased, but its handler does not start. A cancel that
/// reaches it while it waits ends it when its turn comes, without running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_ahead_is_cancelled_without_running() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (started, gate) = (Arc::new(Mutex::new(Vec::new())), Arc::new(tokio::sync::Semaphore::new(0)));
    // A second queue, woken only by notifications (no polling), tells when the listener has got as far
    // as a notification sent after the cancel's.
    let config = jobqueue::Config {
        queues: vec![QueueConfig::new("default", 1), QueueConfig::new("probe", 1)],
        poll_interval: Duration::from_secs(3600),
        ..db.config(1)
    };
    let svc = jobqueue::Builder::new(config)
        .handler("default", gated(started.clone(), gate.clone()))
        .handler("probe", common::noop())
        .start()
        .await
        .expect("service starts");
    c.batch_execute("INSERT INTO jobs (payload) VALUES ('1'); INSERT INTO jobs (payload) VALUES ('2');").await.unwrap();
    wait_count(&c, Duration::from_secs(10), "both claimed", "SELECT count(*) FROM jobs WHERE status = 'processing'", 2)
        .await;
    eventually(Duration::from_secs(5), "the first job started", || {
        let n = started.lock().unwrap().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    // Cancelled the way psql can: request it, then tell the holder.
    c.batch_execute(
        "UPDATE jobs SET cancel_requested_at = now() WHERE payload = '2';
         SELECT pg_notify('jobqueue_cancel', id::text) FROM jobs WHERE payload = '2';",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO jobs (queue, payload) VALUES ('probe', '0')").await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(10),
        "probe done",
        "SELECT count(*) FROM jobs WHERE queue = 'probe' AND status = 'done'",
        1,
    )
    .await;
    gate.add_permits(10);
    wait_count(
        &c,
        Duration::from_secs(10),
        "job 2 cancelled",
        "SELECT count(*) FROM jobs WHERE status = 'cancelled'",
        1,
    )
    .await;
    wait_count(
        &c,
        Duration::from_secs(10),
        "job 1 done",
        "SELECT count(*) FROM jobs WHERE status = 'done' AND queue = 'default'",
        1,
    )
    .await;
    assert_eq!(*started.lock().unwrap(), vec![serde_json::json!(1)], "job 2's handler never ran");
    svc.stop().await.expect("stops cleanly");
}

/// Shutdown gives a job claimed ahead back to pending at once, without counting the attempt, while
/// the running job gets its shutdown timeout to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_jobs_claimed_ahead_back_uncounted() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (started, gate) = (Arc::new(Mutex::new(Vec::new())), Arc::new(tokio::sync::Semaphore::new(0)));
    let config = jobqueue::Config { shutdown_timeout: Duration::from_secs(30), ..db.config(1) };
    let svc = start_with(config, gated(started.clone(), gate.clone())).await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 3) AS i").await.unwrap();
    wait_count(&c, Duration::from_secs(10), "two claimed", "SELECT count(*) FROM jobs WHERE status = 'processing'", 2)
        .await;
    eventually(Duration::from_secs(5), "one job started", || {
        let n = started.lock().unwrap().len();
        async move { (n == 1).then_some(()) }
    })
    .await;

    let stopping = tokio::spawn(svc.stop());
    // The job claimed ahead is back while the running one still runs.
    wait_count(
        &c,
        Duration::from_secs(10),
        "the job claimed ahead released",
        "SELECT count(*) FROM jobs WHERE status = 'pending' AND attempts = 0",
        2,
    )
    .await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'processing'").await, 1);
    gate.add_permits(10);
    stopping.await.unwrap().expect("stops cleanly");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'done'").await, 1);
    assert_eq!(started.lock().unwrap().len(), 1, "only the running job's handler ran");
}
