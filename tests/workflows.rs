//! Jobs that wait for other jobs (`after`): created waiting through the API, promoted by the
//! completion of their last parent (also when parents finish concurrently on several instances),
//! cancelled with their dependants when a parent fails, and released by the rescuer when a completion
//! bypassed the promotion.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{count, start_with, wait_count, TestDb};
use jobqueue::api::routes;
use jobqueue::{HandlerError, JobContext};
use serde_json::{json, Value};
use uuid::Uuid;
use warp::Filter;

fn api(url: &str) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    routes(Arc::new(common::api_state(url)))
}

async fn post<F>(api: &F, path: &str, body: Value) -> (u16, Value)
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let resp = warp::test::request()
        .method("POST")
        .path(path)
        .header("content-type", "application/json")
        .body(body.to_string())
        .reply(api)
        .await;
    (resp.status().as_u16(), serde_json::from_slice(resp.body()).unwrap())
}

async fn get<F>(api: &F, path: &str) -> Value
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let resp = warp::test::request().method("GET").path(path).reply(api).await;
    assert_eq!(resp.status(), 200, "{path}");
    serde_json::from_slice(resp.body()).unwrap()
}

fn ids(body: &Value) -> Vec<Uuid> {
    body.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().parse().unwrap()).collect()
}

/// Handler starts, in order: the job's payload and the time.
type Starts = Arc<Mutex<Vec<(String, DateTime<Utc>)>>>;

/// Records when each job's handler started, by payload name; fails the job named `fail`.
fn recorder(started: Starts) -> impl jobqueue::Handler {
    move |ctx: JobContext| {
        let started = started.clone();
        async move {
            let name = ctx.job.payload.as_str().unwrap_or_default().to_string();
            started.lock().unwrap().push((name.clone(), Utc::now()));
            if name == "fail" {
                return Err(HandlerError::fail("told to fail"));
            }
            Ok::<_, HandlerError>(Value::Null)
        }
    }
}

#[tokio::test]
async fn a_diamond_runs_in_order() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let api = api(&db.url);
    let (status, body) = post(
        &api,
        "/jobs/batch",
        json!([
            {"payload": "a"},
            {"payload": "b", "after": ["$0"]},
            {"payload": "c", "after": ["$0"]},
            {"payload": "d", "after": ["$1", "$2"]},
        ]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let statuses: Vec<&str> = body.as_array().unwrap().iter().map(|j| j["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["pending", "waiting", "waiting", "waiting"]);
    let ids = ids(&body);

    let started = Arc::new(Mutex::new(Vec::new()));
    let svc = start_with(db.config(4), recorder(started.clone())).await;
    wait_count(&c, Duration::from_secs(20), "all done", "SELECT count(*) FROM jobs WHERE status = 'done'", 4).await;
    svc.stop().await.expect("stops cleanly");

    let started = started.lock().unwrap().clone();
    let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names[0], "a");
    assert_eq!(names[3], "d");
    let d_started = started[3].1;
    for id in &ids[1..3] {
        let finished: DateTime<Utc> =
            c.query_one("SELECT finished_at FROM jobs WHERE id = $1", &[id]).await.unwrap().get(0);
        assert!(finished <= d_started, "d started at {d_started} before its parent {id} finished at {finished}");
    }
}

#[tokio::test]
async fn a_failed_parent_cancels_its_dependants_transitively() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let api = api(&db.url);
    let (status, body) = post(
        &api,
        "/jobs/batch",
        json!([
            {"payload": "a"},
            {"payload": "fail", "after": ["$0"], "max_attempts": 1},
            {"payload": "c", "after": ["$0"]},
            {"payload": "d", "after": ["$1", "$2"]},
            {"payload": "e", "after": ["$3"]},
        ]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let ids = ids(&body);
    let started = Arc::new(Mutex::new(Vec::new()));
    let svc = start_with(db.config(4), recorder(started.clone())).await;
    wait_count(
        &c,
        Duration::from_secs(20),
        "d and e cancelled",
        "SELECT count(*) FROM jobs WHERE status = 'cancelled'",
        2,
    )
    .await;
    wait_count(&c, Duration::from_secs(20), "a and c done", "SELECT count(*) FROM jobs WHERE status = 'done'", 2).await;
    svc.stop().await.expect("stops cleanly");
    let error = |id: Uuid| {
        let c = &c;
        async move { c.query_one("SELECT error FROM jobs WHERE id = $1", &[&id]).await.unwrap().get::<_, String>(0) }
    };
    assert_eq!(error(ids[3]).await, format!("parent {} ended failed", ids[1]));
    assert_eq!(error(ids[4]).await, format!("parent {} ended cancelled", ids[3]));
    let names: Vec<String> = started.lock().unwrap().iter().map(|(n, _)| n.clone()).collect();
    assert!(!names.iter().any(|n| n == "d" || n == "e"), "{names:?}");
}

#[tokio::test]
async fn a_fan_in_of_999_parents_finished_by_three_instances_promotes_the_child_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // Through SQL: the API accepts 100 parents per job; the table takes any number.
    c.batch_execute(
        "INSERT INTO jobs (payload) SELECT to_jsonb('p' || i) FROM generate_series(1, 999) i;
         INSERT INTO jobs (id, payload, status, waiting_on)
             VALUES ('00000000-0000-0000-0000-000000000001', '\"child\"', 'waiting', 999);
         INSERT INTO job_dependencies (parent, child)
             SELECT id, '00000000-0000-0000-0000-000000000001' FROM jobs WHERE status = 'pending';",
    )
    .await
    .unwrap();
    // The child's handler checks that it runs after every parent is done, and counts its runs.
    let child_runs = Arc::new(Mutex::new(Vec::new()));
    let mut services = Vec::new();
    for _ in 0..3 {
        let runs = child_runs.clone();
        let url = db.url.clone();
        let handler = move |ctx: JobContext| {
            let runs = runs.clone();
            let url = url.clone();
            async move {
                if ctx.job.payload == json!("child") {
                    let c = common::connect(&url).await;
                    let done = count(&c, "SELECT count(*) FROM jobs WHERE status = 'done'").await;
                    runs.lock().unwrap().push(done);
                }
                Ok::<_, HandlerError>(Value::Null)
            }
        };
        services.push(start_with(db.config(8), handler).await);
    }
    wait_count(&c, Duration::from_secs(60), "all done", "SELECT count(*) FROM jobs WHERE status = 'done'", 1000).await;
    for svc in services {
        svc.stop().await.expect("stops cleanly");
    }
    assert_eq!(*child_runs.lock().unwrap(), vec![999], "the child ran once, after its 999 parents");
    let row = c
        .query_one("SELECT attempts, waiting_on FROM jobs WHERE id = '00000000-0000-0000-0000-000000000001'", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 0));
}

#[tokio::test]
async fn a_completion_that_bypassed_the_promotion_is_caught_by_the_rescuer() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let api = api(&db.url);
    let (status, body) = post(&api, "/jobs", json!({"payload": "a", "queue": "elsewhere"})).await;
    assert_eq!(status, 201, "{body}");
    let a: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let (status, body) = post(&api, "/jobs", json!({"payload": "b", "after": [a]})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "waiting");
    // The instance that finished `a` died before the promotion: as if a plain UPDATE had finished it.
    c.execute("UPDATE jobs SET status = 'done', finished_at = now() WHERE id = $1", &[&a]).await.unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'waiting'").await, 1);
    let svc = start_with(db.config(2), common::noop()).await;
    wait_count(&c, Duration::from_secs(20), "b done", "SELECT count(*) FROM jobs WHERE status = 'done'", 2).await;
    svc.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn parents_already_done_count_as_satisfied_and_cancelling_a_waiting_job_cascades() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let api = api(&db.url);
    let done: Uuid = c
        .query_one("INSERT INTO jobs (payload, status, finished_at) VALUES ('1', 'done', now()) RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let (status, body) = post(&api, "/jobs", json!({"payload": "x", "after": [done]})).await;
    assert_eq!((status, body["status"].as_str()), (201, Some("pending")), "{body}");

    let (status, body) = post(
        &api,
        "/jobs/batch",
        json!([{"payload": "p", "queue": "elsewhere"}, {"payload": "w", "after": ["$0"]}, {"payload": "z", "after": ["$1"]}]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let ids = ids(&body);
    let w = get(&api, &format!("/jobs/{}", ids[1])).await;
    assert_eq!((w["status"].as_str(), w["after"].clone()), (Some("waiting"), json!([ids[0]])), "{w}");
    assert_eq!(w["waiting_dependants"], 1, "{w}");
    let p = get(&api, &format!("/jobs/{}", ids[0])).await;
    assert_eq!((p["after"].clone(), p["waiting_dependants"].clone()), (Value::Null, json!(1)), "{p}");
    let (status, body) = post(&api, &format!("/jobs/{}/cancel", ids[1]), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    let row = c.query_one("SELECT status, error FROM jobs WHERE id = $1", &[&ids[2]]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "cancelled");
    assert_eq!(row.get::<_, String>(1), format!("parent {} ended cancelled", ids[1]));
}

#[tokio::test]
async fn bad_parents_are_400s() {
    let db = TestDb::new().await;
    let api = api(&db.url);
    let unknown = Uuid::now_v7();
    let cases = [
        ("/jobs", json!({"payload": 1, "after": [unknown]})),
        ("/jobs", json!({"payload": 1, "after": ["nope"]})),
        ("/jobs", json!({"payload": 1, "after": ["$0"]})),
        ("/jobs", json!({"payload": 1, "after": (0..101).map(|_| Uuid::now_v7()).collect::<Vec<_>>()})),
        ("/jobs/batch", json!([{"payload": 1, "after": ["$0"]}])),
        ("/jobs/batch", json!([{"payload": 1, "after": ["$1"]}, {"payload": 2, "after": ["$0"]}])),
        ("/jobs/batch", json!([{"payload": 1}, {"payload": 2, "after": ["$0", unknown]}])),
    ];
    for (path, body) in cases {
        let (status, reply) = post(&api, path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
    }
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 0, "all or nothing");
}

#[tokio::test]
async fn retention_keeps_a_finished_parent_that_a_waiting_job_needs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let api = api(&db.url);
    let (status, body) = post(
        &api,
        "/jobs/batch",
        json!([{"payload": "x"}, {"payload": "y"}, {"payload": "unrelated"}, {"payload": "child", "after": ["$0", "$1"]}]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let ids = ids(&body);
    // x and the unrelated job finished long ago (bypassing the release, as psql would); y still runs.
    c.execute(
        "UPDATE jobs SET status = 'done', finished_at = now() - interval '1 day' WHERE id = ANY($1)",
        &[&vec![ids[0], ids[2]]],
    )
    .await
    .unwrap();
    let deleted =
        jobqueue::db::queries::job_delete_expired(&c, Some(Duration::from_secs(60)), None, None, 100).await.unwrap();
    assert_eq!(deleted, 1, "only the unrelated job");
    assert_eq!(count(&c, &format!("SELECT count(*) FROM jobs WHERE id = '{}'", ids[0])).await, 1);
    assert_eq!(count(&c, "SELECT count(*) FROM job_dependencies").await, 2);
}

#[tokio::test]
async fn the_rescuer_cancels_the_dependants_of_a_parent_failed_behind_its_back() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let api = api(&db.url);
    let (status, body) = post(
        &api,
        "/jobs/batch",
        json!([{"payload": "a", "queue": "elsewhere"}, {"payload": "b", "after": ["$0"]}, {"payload": "c", "after": ["$1"]}]),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let ids = ids(&body);
    c.execute("UPDATE jobs SET status = 'failed', finished_at = now() WHERE id = $1", &[&ids[0]]).await.unwrap();
    let svc = start_with(db.config(2), common::noop()).await;
    wait_count(
        &c,
        Duration::from_secs(20),
        "b and c cancelled",
        "SELECT count(*) FROM jobs WHERE status = 'cancelled'",
        2,
    )
    .await;
    svc.stop().await.expect("stops cleanly");
    let error: String = c.query_one("SELECT error FROM jobs WHERE id = $1", &[&ids[2]]).await.unwrap().get(0);
    assert_eq!(error, format!("parent {} ended cancelled", ids[1]));
}
