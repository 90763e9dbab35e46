//! `POST /jobs` under concurrency: requests that arrive together share statements and commits, and
//! each still gets its own answer (its own job, the holder of its unique key, or its own error).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{count, eventually, TestDb};
use jobqueue::api::{routes, ApiState};
use serde_json::{json, Value};
use warp::Filter;

fn api(
    url: &str,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    routes(Arc::new(ApiState { ..common::api_state(url) }))
}

/// Posts every body at once, each from its own task; answers in the order of `bodies`.
async fn post_all<F>(api: &F, bodies: Vec<Value>) -> Vec<(u16, Value)>
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let api = api.clone();
            tokio::spawn(async move {
                let resp = warp::test::request()
                    .method("POST")
                    .path("/jobs")
                    .header("content-type", "application/json")
                    .body(b.to_string())
                    .reply(&api)
                    .await;
                (resp.status().as_u16(), serde_json::from_slice::<Value>(resp.body()).unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inserts_share_commits_and_each_gets_its_own_job() {
    let db = TestDb::new().await;
    let api = api(&db.url);
    let answers = post_all(&api, (0..300).map(|i| json!({"payload": {"n": i}})).collect()).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 201, "{body}");
        assert_eq!(body["payload"], json!({"n": i}), "request {i} got another request's job");
    }
    let ids: HashSet<&str> = answers.iter().map(|(_, b)| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 300);
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 300);
    // Rows of one statement share its transaction's now(): fewer distinct insert times than requests
    // means requests were written together.
    let statements = count(&c, "SELECT count(DISTINCT created_at) FROM jobs").await;
    assert!(statements < 300, "every request had its own commit ({statements} statements)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inserts_with_one_unique_key_create_it_once_and_answer_the_holder() {
    let db = TestDb::new().await;
    let api = api(&db.url);
    let bodies = (0..100).map(|i| json!({"payload": {"n": i}, "unique_key": format!("k{}", i % 10)})).collect();
    let answers = post_all(&api, bodies).await;
    let mut holder: HashMap<String, String> = HashMap::new();
    for (status, body) in &answers {
        if *status == 201 {
            let key = body["unique_key"].as_str().unwrap().to_string();
            assert!(holder.insert(key, body["id"].as_str().unwrap().to_string()).is_none(), "a key created twice");
        }
    }
    assert_eq!(holder.len(), 10, "each key created once");
    for (i, (status, body)) in answers.iter().enumerate() {
        assert!(*status == 200 || *status == 201, "{status} {body}");
        let key = format!("k{}", i % 10);
        assert_eq!(body["id"].as_str().unwrap(), holder[&key], "request {i} was not answered with its key's job");
    }
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_database_refuses_fails_its_own_request_only() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // A rule only the database knows, as a DBA might add one.
    c.batch_execute("ALTER TABLE jobs ADD CONSTRAINT no_evil CHECK (payload->>'evil' IS NULL)").await.unwrap();
    let api = api(&db.url);
    let bodies = (0..60)
        .map(|i| if i % 12 == 0 { json!({"payload": {"evil": i}}) } else { json!({"payload": {"n": i}}) })
        .collect();
    let answers = post_all(&api, bodies).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        if i % 12 == 0 {
            assert_eq!(*status, 400, "{body}");
            assert!(body["message"].as_str().unwrap().contains("no_evil"), "{body}");
        } else {
            assert_eq!((*status, &body["payload"]), (201, &json!({"n": i})), "{body}");
        }
    }
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 55);
}

/// Posts one body, answering its status and JSON.
async fn post<F>(api: &F, body: Value) -> (u16, Value)
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let resp = warp::test::request()
        .method("POST")
        .path("/jobs")
        .header("content-type", "application/json")
        .body(body.to_string())
        .reply(api)
        .await;
    (resp.status().as_u16(), serde_json::from_slice::<Value>(resp.body()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_insert_stuck_behind_an_open_transaction_does_not_hold_the_others_back() {
    let db = TestDb::new().await;
    let api = api(&db.url);
    // A psql user inserts a job with a key and leaves the transaction open: an insert of the same key
    // waits for that transaction to end.
    let mut holder = db.client().await;
    let open = holder.transaction().await.unwrap();
    open.batch_execute("INSERT INTO jobs (payload, unique_key) VALUES ('{}', 'held')").await.unwrap();
    let stuck = tokio::spawn({
        let api = api.clone();
        async move { post(&api, json!({"payload": {"n": 1}, "unique_key": "held"})).await }
    });
    let c = db.client().await;
    eventually(Duration::from_secs(10), "the keyed insert waiting for the open transaction", || async {
        let waiting = count(
            &c,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .await;
        (waiting > 0).then_some(())
    })
    .await;
    // Requests after it are written while it waits (with one statement in flight and nothing more,
    // they would wait for the open transaction too).
    let others = tokio::time::timeout(
        Duration::from_secs(5),
        post_all(&api, (2..12).map(|i| json!({"payload": {"n": i}})).collect()),
    )
    .await
    .expect("inserts queued behind a stuck one were not written");
    for (status, body) in &others {
        assert_eq!(*status, 201, "{body}");
    }
    assert!(!stuck.is_finished(), "the keyed insert did not wait for the open transaction");
    // The holder gives up: the waiting insert now creates the key's job.
    open.rollback().await.unwrap();
    let (status, body) = stuck.await.unwrap();
    assert_eq!((status, &body["payload"]), (201, &json!({"n": 1})), "{body}");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 11);
}
