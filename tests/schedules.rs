//! Cron schedules: exactly one job per tick with several instances, the missed policies after a
//! downtime (computed, not waited for), psql inserts and updates, the HTTP API, and the config file's
//! start-up sync. Real instances on a database of the test's own.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{Timelike, Utc};
use common::{count, eventually, http, noop, wait_count, HttpResponse, TestDb};
use jobqueue::schedule::{Missed, ScheduleSpec};
use jobqueue::{Builder, Config, Service};
use serde_json::{json, Value};
use tokio_postgres::Client;

async fn start(config: Config) -> (Service, SocketAddr) {
    let service = Builder::new(config).handler("default", noop()).start().await.expect("service starts");
    let addr = service.local_addr().unwrap();
    (service, addr)
}

async fn put(addr: SocketAddr, name: &str, body: Value) -> HttpResponse {
    http(addr, "PUT", &format!("/schedules/{name}"), Some(&body.to_string())).await
}

async fn runs(c: &Client, name: &str) -> i64 {
    c.query_one("SELECT count(*) FROM schedule_runs WHERE schedule = $1 AND NOT manual", &[&name]).await.unwrap().get(0)
}

/// Three instances share one every-second schedule for at least ten ticks: every tick between the
/// first and the last created exactly one job, none was skipped, and each job ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_every_second_schedule_on_three_instances_creates_one_job_per_tick() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut instances = Vec::new();
    for id in ["a", "b", "c"] {
        instances.push(start(Config { instance_id: id.into(), ..db.config(2) }).await);
    }
    let r = put(instances[0].1, "every-second", json!({"cron": "*/1 * * * * *", "payload": {"n": 1}})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["next_runs"].as_array().unwrap().len(), 5);
    eventually(Duration::from_secs(60), "ten ticks", || async { (runs(&c, "every-second").await >= 11).then_some(()) })
        .await;
    let r = http(instances[1].1, "POST", "/schedules/every-second/pause", None).await;
    assert_eq!((r.status, r.json()["paused"].clone()), (200, json!(true)), "{}", r.body);
    for (service, _) in instances {
        service.stop().await.expect("stops cleanly");
    }

    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT tick), extract(epoch FROM max(tick) - min(tick))::int8,
                    count(DISTINCT job_id)
             FROM schedule_runs WHERE schedule = 'every-second'",
            &[],
        )
        .await
        .unwrap();
    let (n, distinct, span, jobs): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert!(n >= 11, "{n} ticks");
    assert_eq!((distinct, jobs), (n, n), "one job per tick");
    assert_eq!(span, n - 1, "consecutive seconds, none missed: {n} ticks over {span} s");
    // The jobs table agrees: one job per tick key, and nothing else in the queue.
    let keys = "SELECT count(DISTINCT unique_key) FROM jobs WHERE unique_key LIKE 'schedule:every-second:%'";
    assert_eq!(count(&c, keys).await, n);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, n);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE payload = '{\"n\": 1}' AND status = 'done'").await, n);
}

/// A daily schedule whose instances were down for five days, with each policy: next_run_at is set
/// five days back, at an hour twelve hours away from now, so exactly five ticks were missed and none
/// is merely late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_follow_the_policy_after_a_downtime() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hour = (Utc::now().hour() + 12) % 24;
    for (name, missed) in [("skip", "skip"), ("once", "once"), ("all", "all")] {
        c.execute(
            "INSERT INTO schedules (name, cron, missed, next_run_at) VALUES ($1, $2, $3, now() - interval '5 days')",
            &[&name, &format!("0 {hour} * * *"), &missed],
        )
        .await
        .unwrap();
    }
    let (service, _) = start(db.config(2)).await;
    // Each schedule's jobs are created in the transaction that advances it: once next_run_at is in
    // the future, its count is final.
    wait_count(
        &c,
        Duration::from_secs(20),
        "all three advanced",
        "SELECT count(*) FROM schedules WHERE next_run_at > now()",
        3,
    )
    .await;
    assert_eq!(runs(&c, "skip").await, 0);
    assert_eq!(runs(&c, "once").await, 1);
    assert_eq!(runs(&c, "all").await, 5);
    let newest = "SELECT count(*) FROM schedule_runs WHERE schedule = 'once' AND tick > now() - interval '1 day'";
    assert_eq!(count(&c, newest).await, 1, "the catch-up is the latest missed tick");
    let next = "SELECT count(*) FROM schedules WHERE next_run_at - now() BETWEEN interval '0' AND interval '1 day'";
    assert_eq!(count(&c, next).await, 3, "each goes on with its next future tick");
    service.stop().await.expect("stops cleanly");
}

/// psql users insert and update rows; a scheduler, woken by the table's NOTIFY, computes next_run_at,
/// and records why when it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_insert_gets_its_next_run_computed_and_a_bad_one_says_why() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(db.config(1)).await;
    c.batch_execute(
        "INSERT INTO schedules (name, cron, timezone, queue, payload) VALUES
             ('new-year', '0 0 1 1 *', 'Europe/Berlin', 'reports', '{\"report\": \"year\"}'),
             ('broken', '0 25 * * *', 'UTC', 'default', '{}')",
    )
    .await
    .unwrap();
    let planned = "SELECT count(*) FROM schedules WHERE next_run_at IS NOT NULL OR invalid IS NOT NULL";
    wait_count(&c, Duration::from_secs(10), "both looked at", planned, 2).await;
    let r = http(addr, "GET", "/schedules/new-year", None).await.json();
    let next = r["next_run_at"].as_str().unwrap().to_string();
    assert!(next.ends_with("-12-31T23:00:00Z"), "midnight in Berlin on 1 January is 23:00 UTC: {next}");
    assert_eq!(r["next_runs"][0].as_str().unwrap(), next);
    assert_eq!(r["source"], "sql");
    let broken = http(addr, "GET", "/schedules/broken", None).await.json();
    assert!(broken["next_run_at"].is_null());
    assert!(broken["invalid"].as_str().unwrap().starts_with("cron:"), "{broken}");

    // Fixing the expression in psql clears the reason and schedules it.
    c.execute("UPDATE schedules SET cron = '0 23 * * *' WHERE name = 'broken'", &[]).await.unwrap();
    wait_count(
        &c,
        Duration::from_secs(10),
        "fixed and planned",
        "SELECT count(*) FROM schedules WHERE name = 'broken' AND invalid IS NULL AND next_run_at > now()",
        1,
    )
    .await;
    // jobqueue_schedule and jobqueue_schedule_run, as psql users call them.
    c.execute("SELECT jobqueue_schedule('sql-made', '*/5 * * * *', 'default', '{\"x\": 1}')", &[]).await.unwrap();
    let job: uuid::Uuid = c.query_one("SELECT jobqueue_schedule_run('sql-made')", &[]).await.unwrap().get(0);
    wait_count(
        &c,
        Duration::from_secs(10),
        "the run-now job done",
        &format!("SELECT count(*) FROM jobs WHERE id = '{job}' AND status = 'done'"),
        1,
    )
    .await;
    service.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_creates_replaces_triggers_pauses_resumes_and_deletes() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(db.config(2)).await;

    let r = put(addr, "nightly", json!({"cron": "0 2 * * *", "timezone": "Europe/Berlin", "payload": {"r": 1}})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let body = r.json();
    assert_eq!((body["missed"].as_str(), body["source"].as_str()), (Some("skip"), Some("api")));
    let runs_at: Vec<&str> = body["next_runs"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(runs_at.len(), 5);
    assert!(
        runs_at.iter().all(|t| t.ends_with("T00:00:00Z") || t.ends_with("T01:00:00Z")),
        "02:00 Berlin: {runs_at:?}"
    );
    assert_eq!(body["next_run_at"].as_str(), Some(runs_at[0]));

    // Replacing answers 200; bad fields are 400s that name them.
    let r = put(addr, "nightly", json!({"cron": "@hourly", "payload": {"r": 2}, "missed": "once"})).await;
    assert_eq!((r.status, r.json()["cron"].as_str()), (200, Some("@hourly")), "{}", r.body);
    for (body, field) in [
        (json!({"cron": "61 * * * *"}), "cron:"),
        (json!({"cron": "* *"}), "cron:"),
        (json!({}), "cron:"),
        (json!({"cron": "* * * * *", "timezone": "Moon/Base"}), "timezone:"),
        (json!({"cron": "* * * * *", "missed": "sometimes"}), "missed:"),
        (json!({"cron": "* * * * *", "priority": 5000}), "priority:"),
        (json!({"cron": "* * * * *", "payload": null}), "payload:"),
    ] {
        let r = put(addr, "nightly", body.clone()).await;
        assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("invalid_field")), "{body}: {}", r.body);
        assert!(r.json()["message"].as_str().unwrap().starts_with(field), "{body}: {}", r.body);
    }
    let r = put(addr, "no%20spaces", json!({"cron": "* * * * *"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(http(addr, "GET", "/schedules/absent", None).await.status, 404);
    assert_eq!(http(addr, "POST", "/schedules/absent/trigger", None).await.status, 404);

    // Trigger: one job now, the schedule's own next tick untouched.
    let before = http(addr, "GET", "/schedules/nightly", None).await.json()["next_run_at"].clone();
    let r = http(addr, "POST", "/schedules/nightly/trigger", None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let job = r.json();
    assert_eq!(job["payload"], json!({"r": 2}));
    let r = http(addr, "GET", &format!("/jobs/{}?wait=10s", job["id"].as_str().unwrap()), None).await;
    assert_eq!(r.json()["status"], "done");
    let got = http(addr, "GET", "/schedules/nightly", None).await.json();
    assert_eq!(got["next_run_at"], before);
    assert_eq!(got["last_job_id"], job["id"]);
    assert_eq!(got["recent_jobs"][0]["job_id"], job["id"]);
    assert_eq!(
        (got["recent_jobs"][0]["manual"].clone(), got["recent_jobs"][0]["status"].clone()),
        (json!(true), json!("done"))
    );

    // Pause an every-second schedule; a later pass of the scheduler (proved by planning a psql
    // insert) creates nothing for it. Resume: it goes on from a future tick, with no catch-up.
    assert_eq!(put(addr, "tick", json!({"cron": "* * * * * *"})).await.status, 201);
    eventually(Duration::from_secs(20), "a tick ran", || async { (runs(&c, "tick").await >= 1).then_some(()) }).await;
    let r = http(addr, "POST", "/schedules/tick/pause", None).await;
    assert_eq!((r.status, r.json()["next_runs"].clone()), (200, json!([])), "{}", r.body);
    let paused_at = runs(&c, "tick").await;
    let paused_ts: chrono::DateTime<Utc> = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    // Let ticks come due while paused, then prove a scheduler pass ran (it plans a psql insert).
    eventually(Duration::from_secs(10), "two ticks due while paused", || async {
        let now: chrono::DateTime<Utc> = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
        (now > paused_ts + chrono::Duration::milliseconds(2100)).then_some(())
    })
    .await;
    c.execute("INSERT INTO schedules (name, cron) VALUES ('probe', '0 0 * * *')", &[]).await.unwrap();
    let planned = "SELECT count(*) FROM schedules WHERE name = 'probe' AND next_run_at IS NOT NULL";
    wait_count(&c, Duration::from_secs(10), "probe planned", planned, 1).await;
    assert_eq!(runs(&c, "tick").await, paused_at, "a paused schedule creates no job");
    let r = http(addr, "POST", "/schedules/tick/resume", None).await;
    assert_eq!((r.status, r.json()["paused"].clone()), (200, json!(false)), "{}", r.body);
    let resumed_ts: chrono::DateTime<Utc> = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    eventually(Duration::from_secs(20), "ticking again", || async {
        (runs(&c, "tick").await > paused_at).then_some(())
    })
    .await;
    let caught_up = c
        .query_one(
            "SELECT count(*) FROM schedule_runs WHERE schedule = 'tick' AND tick > $1 AND tick < $2",
            &[&paused_ts, &resumed_ts],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(caught_up, 0, "the ticks of the pause are not caught up");

    let list = http(addr, "GET", "/schedules", None).await.json();
    let names: Vec<&str> = list["schedules"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["nightly", "probe", "tick"]);
    let r = http(addr, "DELETE", "/schedules/tick", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(http(addr, "GET", "/schedules/tick", None).await.status, 404);
    assert_eq!(http(addr, "DELETE", "/schedules/tick", None).await.status, 404);
    assert_eq!(count(&c, "SELECT count(*) FROM schedule_runs WHERE schedule = 'tick'").await, 0);
    service.stop().await.expect("stops cleanly");
}

fn spec(cron: &str) -> ScheduleSpec {
    ScheduleSpec {
        name: "from-file".into(),
        cron: cron.into(),
        timezone: "UTC".into(),
        queue: "default".into(),
        payload: json!({"f": 1}),
        priority: 0,
        max_attempts: None,
        missed: Missed::Skip,
    }
}

/// The rule for config files: a file creates a missing schedule and updates one a file wrote; the
/// instance that started last wins, once; one written through the API is never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_schedules_sync_at_start_up_without_overwriting_the_api() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let cron_of = || async {
        let r = c.query_one("SELECT cron, source FROM schedules WHERE name = 'from-file'", &[]).await.unwrap();
        (r.get::<_, String>(0), r.get::<_, String>(1))
    };
    let with = |cron: &str, id: &str| Config { schedules: vec![spec(cron)], instance_id: id.into(), ..db.config(1) };
    let (a, addr) = start(with("0 1 * * *", "a")).await;
    assert_eq!(cron_of().await, ("0 1 * * *".into(), "config".into()));
    // A second instance with a different file: it started last, so its definition stands.
    let (b, _) = start(with("0 2 * * *", "b")).await;
    assert_eq!(cron_of().await, ("0 2 * * *".into(), "config".into()));
    // Running instances do not write again: a's file never comes back while it runs.
    b.stop().await.expect("stops cleanly");
    assert_eq!(cron_of().await.0, "0 2 * * *");
    // Once changed through the API, no file touches it.
    assert_eq!(put(addr, "from-file", json!({"cron": "0 3 * * *"})).await.status, 200);
    a.stop().await.expect("stops cleanly");
    let (a, _) = start(with("0 1 * * *", "a")).await;
    assert_eq!(cron_of().await, ("0 3 * * *".into(), "api".into()));
    a.stop().await.expect("stops cleanly");
}

#[test]
fn config_file_schedules_are_checked_like_the_api() {
    let parse =
        |text: &str| jobqueue::config::file::parse(std::path::Path::new("x.toml"), text).map_err(|e| e.to_string());
    let ok = parse(
        "[schedules.nightly-report]\ncron = \"0 2 * * *\"\ntimezone = \"Europe/Berlin\"\nqueue = \"reports\"\npayload = { report = \"daily\", days = 1 }\nmissed = \"once\"\n",
    )
    .unwrap();
    assert_eq!(ok.schedules.len(), 1);
    assert_eq!(ok.schedules[0].payload, json!({"report": "daily", "days": 1}));
    assert_eq!(ok.schedules[0].missed, Missed::Once);
    let e = parse("[schedules.x]\ncron = \"0 2 * *\"\n").unwrap_err();
    assert!(e.contains("[schedules.x] cron:"), "{e}");
    let e = parse("[schedules.x]\ncron = \"0 2 * * *\"\ntimezone = \"Nowhere\"\n").unwrap_err();
    assert!(e.contains("[schedules.x] timezone:"), "{e}");
    let e = parse("[schedules.x]\ncron = \"0 2 * * *\"\nevery = 3\n").unwrap_err();
    assert!(e.contains("unknown key \"every\""), "{e}");
}
