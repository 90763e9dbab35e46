//! The HTTP API, in-process through `warp::test`, against a real database of the test's own. No
//! worker runs here, so jobs stay where the API put them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{count, TestDb};
use jobqueue::api::{routes, ApiState};
use jobqueue::worker::Health;
use serde_json::{json, Value};
use warp::Filter;

async fn api_for(
    url: &str,
    max_body: u64,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    api_with(url, max_body, Arc::new(Health::running())).await
}

async fn api_with(
    url: &str,
    max_body: u64,
    health: Arc<Health>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    routes(Arc::new(ApiState { health, max_body_bytes: max_body, ..common::api_state(url) }))
}

struct Reply {
    status: u16,
    body: Value,
    location: Option<String>,
    allow: Option<String>,
}

async fn call<F>(api: &F, method: &str, path: &str, body: Option<&str>) -> Reply
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    call_with(api, method, path, body, &[("content-type", "application/json")]).await
}

async fn call_with<F>(api: &F, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Reply
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let mut req = warp::test::request().method(method).path(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.reply(api).await;
    let status = resp.status().as_u16();
    let location = resp.headers().get("location").map(|v| v.to_str().unwrap().to_string());
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
    let body: Value = serde_json::from_slice(resp.body())
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {:?}", resp.body()));
    Reply { status, body, location, allow }
}

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert_eq!(r.body["error"], code, "{:?}", r.body);
    assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{:?}", r.body);
}

#[tokio::test]
async fn post_creates_a_pending_job_and_get_returns_it() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": "Process this data"}"#)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.location.as_deref(), Some(format!("/jobs/{id}").as_str()));
    assert_eq!(r.body["payload"], "Process this data");
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["result"], Value::Null);
    assert_eq!(r.body["queue"], "default");
    for field in ["created_at", "updated_at", "run_at"] {
        let s = r.body[field].as_str().unwrap_or_else(|| panic!("{field} missing"));
        chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{field}={s}: {e}"));
    }

    let g = call(&api, "GET", &format!("/jobs/{id}"), None).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, r.body);
}

#[tokio::test]
async fn description_is_accepted_in_place_of_payload() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let r = call(&api, "POST", "/jobs", Some(r#"{"description": "legacy client"}"#)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["payload"], "legacy client");
}

#[tokio::test]
async fn optional_fields_are_stored() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let body = r#"{"payload": {"a": 1}, "queue": "email", "priority": -5, "max_attempts": 3,
                   "run_at": "2030-01-01T00:00:00Z"}"#;
    let r = call(&api, "POST", "/jobs", Some(body)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["queue"], "email");
    assert_eq!(r.body["priority"], -5);
    assert_eq!(r.body["max_attempts"], 3);
    assert_eq!(r.body["run_at"], "2030-01-01T00:00:00Z");

    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "delay": "30s"}"#)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let run_at = chrono::DateTime::parse_from_rfc3339(r.body["run_at"].as_str().unwrap()).unwrap();
    let ahead = run_at.signed_duration_since(chrono::Utc::now()).num_seconds();
    assert!((25..=31).contains(&ahead), "run_at {ahead}s ahead");

    let r =
        call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "delay": "30s", "run_at": "2030-01-01T00:00:00Z"}"#)).await;
    assert_error(&r, 400, "invalid_field");
    assert!(r.body["message"].as_str().unwrap().contains("delay"));
}

#[tokio::test]
async fn get_answers_404_for_absent_and_400_for_bad_ids() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let r = call(&api, "GET", &format!("/jobs/{}", uuid::Uuid::new_v4()), None).await;
    assert_error(&r, 404, "not_found");
    let r = call(&api, "GET", "/jobs/not-a-uuid", None).await;
    assert_error(&r, 400, "bad_request");
    let r = call(&api, "POST", "/jobs/not-a-uuid/cancel", None).await;
    assert_error(&r, 400, "bad_request");
}

#[tokio::test]
async fn list_is_newest_first_with_limits_filters_and_keyset_pages() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let c = db.client().await;
    // 25 jobs, one statement each, so each gets a later (time-ordered) id; three of them in queue
    // "email", two failed.
    for i in 1..=25i32 {
        c.execute(
            "INSERT INTO jobs (payload, queue) VALUES (jsonb_build_object('n', $1::int),
                    CASE WHEN $1::int % 10 = 0 THEN 'email' ELSE 'default' END)",
            &[&i],
        )
        .await
        .unwrap();
    }
    c.batch_execute("UPDATE jobs SET status = 'failed', finished_at = now() WHERE payload->>'n' IN ('3', '4')")
        .await
        .unwrap();

    let r = call(&api, "GET", "/jobs", None).await;
    assert_eq!(r.status, 200);
    let jobs = r.body.as_array().unwrap();
    assert_eq!(jobs.len(), 10, "default limit is 10");
    let ns: Vec<i64> = jobs.iter().map(|j| j["payload"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, (16..=25).rev().collect::<Vec<_>>(), "newest first");

    let r = call(&api, "GET", "/jobs?limit=5&offset=5", None).await;
    let ns: Vec<i64> = r.body.as_array().unwrap().iter().map(|j| j["payload"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, vec![20, 19, 18, 17, 16]);

    let r = call(&api, "GET", "/jobs?limit=1000", None).await;
    assert_eq!(r.body.as_array().unwrap().len(), 25);
    for bad in ["/jobs?limit=1001", "/jobs?limit=0", "/jobs?limit=ten", "/jobs?offset=-1", "/jobs?status=sleeping"] {
        assert_error(&call(&api, "GET", bad, None).await, 400, "bad_request");
    }

    let r = call(&api, "GET", "/jobs?status=failed", None).await;
    let ns: Vec<i64> = r.body.as_array().unwrap().iter().map(|j| j["payload"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, vec![4, 3]);
    let r = call(&api, "GET", "/jobs?status=todo&queue=email", None).await;
    let ns: Vec<i64> = r.body.as_array().unwrap().iter().map(|j| j["payload"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, vec![20, 10]);
    let r = call(&api, "GET", "/jobs?status=in_progress", None).await;
    assert_eq!(r.body.as_array().unwrap().len(), 0);

    // Keyset: walk all pages of 7 with before=<last id>.
    let mut seen = Vec::new();
    let mut path = "/jobs?limit=7".to_string();
    loop {
        let page = call(&api, "GET", &path, None).await.body.as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        seen.extend(page.iter().map(|j| j["payload"]["n"].as_i64().unwrap()));
        path = format!("/jobs?limit=7&before={}", page.last().unwrap()["id"].as_str().unwrap());
    }
    assert_eq!(seen, (1..=25).rev().collect::<Vec<_>>());
    // A cursor whose job is gone (deleted by retention between two pages) still pages: ids order
    // the list. The id of job 13, deleted, continues with job 12.
    let thirteen = call(&api, "GET", "/jobs?limit=13", None).await.body[12]["id"].as_str().unwrap().to_string();
    let c = db.client().await;
    c.execute("DELETE FROM jobs WHERE id = $1::text::uuid", &[&thirteen]).await.unwrap();
    let r = call(&api, "GET", &format!("/jobs?limit=2&before={thirteen}"), None).await;
    let ns: Vec<i64> = r.body.as_array().unwrap().iter().map(|j| j["payload"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, vec![12, 11]);
}

#[tokio::test]
async fn bad_input_gets_a_clear_json_error_and_loses_nothing() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 2048).await;
    let kept = call(&api, "POST", "/jobs", Some(r#"{"payload": {"keep": true}}"#)).await;
    assert_eq!(kept.status, 201);

    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": "#)).await;
    assert_error(&r, 400, "malformed_json");
    let r = call(&api, "POST", "/jobs", Some("")).await;
    assert_error(&r, 400, "malformed_json");
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "priority": "high"}"#)).await;
    assert_error(&r, 400, "bad_request");
    assert!(r.body["message"].as_str().unwrap().starts_with("priority"), "{:?}", r.body);
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "run_at": "tomorrow"}"#)).await;
    assert!(r.body["message"].as_str().unwrap().starts_with("run_at"), "{:?}", r.body);
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "queue": 7}"#)).await;
    assert!(r.body["message"].as_str().unwrap().starts_with("queue"), "{:?}", r.body);
    let r = call(&api, "POST", "/jobs", Some(r#"{"queue": "q"}"#)).await;
    assert_error(&r, 400, "invalid_field");
    assert!(r.body["message"].as_str().unwrap().starts_with("payload"), "{:?}", r.body);
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "priority": 99999}"#)).await;
    assert_error(&r, 400, "invalid_field");
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "max_attempts": 0}"#)).await;
    assert_error(&r, 400, "invalid_field");
    let r = call(&api, "POST", "/jobs", Some(r#"["payload"]"#)).await;
    assert_error(&r, 400, "bad_request");
    // U+0000 cannot be stored in jsonb.
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": {"text": "nul\u0000byte"}}"#)).await;
    assert_error(&r, 400, "invalid_field");

    let big = format!(r#"{{"payload": "{}"}}"#, "x".repeat(4096));
    let r = call(&api, "POST", "/jobs", Some(&big)).await;
    assert_error(&r, 413, "payload_too_large");

    let r =
        call_with(&api, "POST", "/jobs", Some("payload=1"), &[("content-type", "application/x-www-form-urlencoded")])
            .await;
    assert_error(&r, 415, "unsupported_media_type");
    let r = call_with(&api, "POST", "/jobs", Some(r#"{"payload": 1}"#), &[("content-type", "text/plain")]).await;
    assert_error(&r, 415, "unsupported_media_type");
    let r = call_with(
        &api,
        "POST",
        "/jobs",
        Some(r#"{"payload": 1}"#),
        &[("content-type", "application/json; charset=utf-8")],
    )
    .await;
    assert_eq!(r.status, 201, "JSON with a charset is fine");

    assert_error(&call(&api, "GET", "/nope", None).await, 404, "not_found");
    assert_error(&call(&api, "GET", "/jobs/x/y/z", None).await, 404, "not_found");
    let r = call(&api, "DELETE", "/jobs", None).await;
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.allow.as_deref(), Some("GET, POST"));
    assert_error(&call(&api, "PUT", &format!("/jobs/{}", uuid::Uuid::new_v4()), None).await, 405, "method_not_allowed");
    assert_error(&call(&api, "GET", "/jobs/batch", None).await, 405, "method_not_allowed");
    assert_error(&call(&api, "POST", "/healthz", None).await, 405, "method_not_allowed");

    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 2, "only the two valid jobs were stored");
    let g = call(&api, "GET", &format!("/jobs/{}", kept.body["id"].as_str().unwrap()), None).await;
    assert_eq!(g.body, kept.body, "the stored job is untouched");
}

#[tokio::test]
async fn health_and_readiness() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let r = call(&api, "GET", "/healthz", None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("ok")));
    let r = call(&api, "GET", "/readyz", None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("ready")));

    // Nothing listens on port 1: readiness fails with 503, liveness still answers.
    let down = api_for("postgres://postgres@127.0.0.1:1/none", 1 << 20).await;
    assert_error(&call(&down, "GET", "/readyz", None).await, 503, "unavailable");
    assert_eq!(call(&down, "GET", "/healthz", None).await.status, 200);
    assert_error(&call(&down, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await, 503, "unavailable");

    // Liveness reflects the engine: an instance whose engine stopped is not alive, whatever its API
    // still answers.
    let no_engine = api_with(&db.url, 1 << 20, Arc::new(Health::default())).await;
    assert_error(&call(&no_engine, "GET", "/healthz", None).await, 503, "unavailable");
}

/// The API hands payloads to PostgreSQL and back without an f64 round trip: big integers and long
/// decimals come back digit for digit. (PostgreSQL's jsonb itself stores -0 as 0.)
#[tokio::test]
async fn payload_numbers_come_back_exactly() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let body = r#"{"payload": {"a": 18446744073709551617, "b": 1234567890.123456789, "c": [1e400, 0.1]}}"#;
    let r = call(&api, "POST", "/jobs", Some(body)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    for raw in [serde_json::to_string(&r.body).unwrap(), {
        let r = call(&api, "GET", &format!("/jobs/{id}"), None).await;
        serde_json::to_string(&r.body).unwrap()
    }] {
        assert!(raw.contains("18446744073709551617"), "{raw}");
        assert!(raw.contains("1234567890.123456789"), "{raw}");
    }
    let c = db.client().await;
    let stored: String = c.query_one("SELECT payload->>'a' FROM jobs", &[]).await.unwrap().get(0);
    assert_eq!(stored, "18446744073709551617");
}

/// RFC 3339 has four-digit years; a time outside them is refused rather than stored and echoed in a
/// form clients cannot parse.
#[tokio::test]
async fn run_at_years_past_9999_are_refused() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "run_at": "+262000-01-01T00:00:00Z"}"#)).await;
    assert_error(&r, 400, "invalid_field");
    assert!(r.body["message"].as_str().unwrap().starts_with("run_at"), "{:?}", r.body);
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "delay": "9000years"}"#)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = call(&api, "POST", "/jobs/batch", Some(r#"[{"payload": 1, "run_at": "+10000-01-01T00:00:00Z"}]"#)).await;
    assert_error(&r, 400, "bad_request");
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "run_at": "9999-12-31T23:59:59Z"}"#)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(count(&db.client().await, "SELECT count(*) FROM jobs").await, 1);
}

/// Two batches whose unique keys overlap in opposite orders: in PostgreSQL each would wait for the
/// other's key, a deadlock it resolves by aborting one. Inserted in one canonical order, one batch
/// wins (201) and the other finds the keys taken (409); never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_with_overlapping_keys_never_deadlock() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 64 << 20).await;
    for (round, size) in [(0, 2), (1, 2), (2, 2), (3, 2), (4, 2000), (5, 2000)] {
        let keys: Vec<String> = (0..size).map(|i| format!("r{round}-k{i}")).collect();
        let batch = |keys: Vec<&String>| {
            serde_json::to_string(&keys.iter().map(|k| json!({"payload": 1, "unique_key": k})).collect::<Vec<_>>())
                .unwrap()
        };
        let (a, b) = (batch(keys.iter().collect()), batch(keys.iter().rev().collect()));
        let (api1, api2) = (api.clone(), api.clone());
        let one = tokio::spawn(async move { call(&api1, "POST", "/jobs/batch", Some(&a)).await });
        let two = tokio::spawn(async move { call(&api2, "POST", "/jobs/batch", Some(&b)).await });
        let (one, two) = (one.await.unwrap(), two.await.unwrap());
        let mut statuses = [one.status, two.status];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "round {round} ({size} items): {:?} / {:?}", one.body, two.body);
    }
    // Request order is kept in the answer although rows go in sorted.
    let r = call(
        &api,
        "POST",
        "/jobs/batch",
        Some(
            r#"[{"payload": "z", "queue": "q", "unique_key": "z"},
        {"payload": "a", "queue": "q", "unique_key": "a"}, {"payload": "m", "queue": "a"}]"#,
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let payloads: Vec<&str> = r.body.as_array().unwrap().iter().map(|j| j["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["z", "a", "m"]);
}

#[tokio::test]
async fn batch_inserts_all_or_nothing() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 4 << 20).await;
    let c = db.client().await;
    let items: Vec<Value> =
        (0..500).map(|i| json!({"payload": {"i": i}, "queue": if i % 2 == 0 { "a" } else { "b" }})).collect();
    let r = call(&api, "POST", "/jobs/batch", Some(&Value::Array(items).to_string())).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let jobs = r.body.as_array().unwrap();
    assert_eq!(jobs.len(), 500);
    assert_eq!(jobs[7]["payload"]["i"], 7, "answers in request order");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 500);

    let bad = json!([{"payload": 1}, {"payload": 2}, {"payload": 3, "priority": "urgent"}]).to_string();
    let r = call(&api, "POST", "/jobs/batch", Some(&bad)).await;
    assert_error(&r, 400, "bad_request");
    assert!(r.body["message"].as_str().unwrap().starts_with("[2].priority"), "{:?}", r.body);
    let bad = json!([{"payload": 1}, {"queue": "x"}]).to_string();
    let r = call(&api, "POST", "/jobs/batch", Some(&bad)).await;
    assert!(r.body["message"].as_str().unwrap().starts_with("[1].payload"), "{:?}", r.body);
    let r = call(&api, "POST", "/jobs/batch", Some("[]")).await;
    assert_error(&r, 400, "bad_request");
    let too_many: Vec<Value> = (0..10_001).map(|_| json!({"payload": 1})).collect();
    let r = call(&api, "POST", "/jobs/batch", Some(&Value::Array(too_many).to_string())).await;
    assert_error(&r, 400, "bad_request");
    // One statement: one notification per queue, however many jobs.
    let (listen, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut s = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = s.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listen.batch_execute("LISTEN jobqueue").await.unwrap();
    let items: Vec<Value> =
        (0..300).map(|i| json!({"payload": i, "queue": if i % 2 == 0 { "x" } else { "y" }})).collect();
    assert_eq!(call(&api, "POST", "/jobs/batch", Some(&Value::Array(items).to_string())).await.status, 201);
    listen.batch_execute("SELECT 1").await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(q)) = tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await {
        got.push(q);
    }
    got.sort();
    assert_eq!(got, vec!["x", "y"]);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 800);

    // {"jobs": [...]} is accepted too.
    let r = call(&api, "POST", "/jobs/batch", Some(r#"{"jobs": [{"payload": "x"}]}"#)).await;
    assert_eq!(r.status, 201);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 801, "failed batches inserted nothing");
}

/// The batch's answer is built from the request and the commit's clock, not read back from the rows:
/// each answered job must be exactly what `GET /jobs/{id}` then reads, whatever the payload's key
/// order or numbers, times finer than PostgreSQL keeps (before and after its 2000 epoch), delays,
/// queues interleaved, with unique keys (the sorted statement) and without.
#[tokio::test]
async fn a_batch_answers_each_job_exactly_as_stored() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let plain = json!([
        {"payload": {"z": 1, "a": [1.0, 2.5e-7, -0.0, 12345678901234567890u64], "m": {"y": null, "b": "é\u{1}"}}},
        {"payload": "s", "queue": "other", "priority": -7, "max_attempts": 3},
        {"payload": 2, "run_at": "2031-02-03T04:05:06.123456789Z"},
        {"payload": 3, "run_at": "1999-12-31T23:59:59.999999999Z", "queue": "other"},
        {"payload": 4, "run_at": "1970-01-01T00:00:00.000000500+02:00"},
        {"payload": 5, "delay": "90s"},
        {"payload": [true, false]}
    ]);
    let keyed = json!([
        {"payload": 6, "unique_key": "k2", "queue": "b"},
        {"payload": 7},
        {"payload": 8, "unique_key": "k1", "queue": "a", "run_at": "2030-01-01T00:00:00.0000015Z"}
    ]);
    // Numbers as jsonb keeps them: exponents written out, no negative zero.
    let numbers: Value = serde_json::from_str(
        r#"[{"payload": [1e3, 1E+3, 1.50e1, 2.5e-7, -0.0, -0, 0e5, -1.5E+2, 123.456e-2, 10e-1, 1e-20, 9.99e2,
                          -0.0e-3, 1.000, 100e-2, 7E0, 18446744073709551617e-25, 0.5e30]}]"#,
    )
    .unwrap();
    for batch in [plain, keyed, numbers] {
        let r = call(&api, "POST", "/jobs/batch", Some(&batch.to_string())).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        let answered = r.body.as_array().unwrap();
        assert_eq!(answered.len(), batch.as_array().unwrap().len());
        let priorities: Vec<&Value> = answered.iter().map(|j| &j["priority"]).collect();
        let sent: Vec<Value> =
            batch.as_array().unwrap().iter().map(|j| j.get("priority").cloned().unwrap_or(json!(0))).collect();
        assert_eq!(priorities, sent.iter().collect::<Vec<_>>(), "answers in request order");
        for job in answered {
            let stored = call(&api, "GET", &format!("/jobs/{}", job["id"].as_str().unwrap()), None).await;
            assert_eq!(stored.status, 200, "{:?}", stored.body);
            assert_eq!(&stored.body, job, "answered as stored");
        }
    }
}

#[tokio::test]
async fn a_hundred_concurrent_unique_submissions_create_one_job() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "queue": "mail", "unique_key": "welcome-42"}"#))
                    .await
            } else {
                call_with(
                    &api,
                    "POST",
                    "/jobs",
                    Some(r#"{"payload": 1, "queue": "mail"}"#),
                    &[("content-type", "application/json"), ("idempotency-key", "welcome-42")],
                )
                .await
            }
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => created += 1,
            200 => {}
            s => panic!("unexpected {s}: {:?}", r.body),
        }
        ids.insert(r.body["id"].as_str().unwrap().to_string());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1, "every answer names the same job");
    let c = db.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 1);
    // Same key in another queue is a different job; once finished, the key is free again.
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "queue": "other", "unique_key": "welcome-42"}"#)).await;
    assert_eq!(r.status, 201);
    c.batch_execute("UPDATE jobs SET status = 'done', finished_at = now() WHERE queue = 'mail'").await.unwrap();
    let r = call(&api, "POST", "/jobs", Some(r#"{"payload": 1, "queue": "mail", "unique_key": "welcome-42"}"#)).await;
    assert_eq!(r.status, 201);
    // psql gets Postgres' unique violation.
    let e = c
        .batch_execute("INSERT INTO jobs (payload, queue, unique_key) VALUES ('1', 'mail', 'welcome-42')")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION));
    // A batch colliding with a live key inserts nothing and says so.
    let r = call(
        &api,
        "POST",
        "/jobs/batch",
        Some(r#"[{"payload": 1}, {"payload": 2, "queue": "mail", "unique_key": "welcome-42"}]"#),
    )
    .await;
    assert_error(&r, 409, "conflict");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 3);
}

#[tokio::test]
async fn cancel_and_retry_follow_the_state_machine() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let c = db.client().await;
    let id = call(&api, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await.body["id"].as_str().unwrap().to_string();

    let r = call(&api, "POST", &format!("/jobs/{id}/retry"), None).await;
    assert_error(&r, 409, "conflict");
    assert_eq!(r.body["job"]["status"], "pending");

    let r = call(&api, "POST", &format!("/jobs/{id}/cancel"), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "cancelled");
    assert!(r.body["finished_at"].is_string());
    let r = call(&api, "POST", &format!("/jobs/{id}/cancel"), None).await;
    assert_error(&r, 409, "conflict");
    assert_eq!(r.body["job"]["status"], "cancelled");

    c.execute("UPDATE jobs SET attempts = 3, max_attempts = 3 WHERE id = $1::text::uuid", &[&id]).await.unwrap();
    let r = call(&api, "POST", &format!("/jobs/{id}/retry"), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["attempts"], 0, "retry resets attempts");
    assert_eq!(r.body["finished_at"], Value::Null);

    c.execute("UPDATE jobs SET status = 'done', finished_at = now() WHERE id = $1::text::uuid", &[&id]).await.unwrap();
    assert_error(&call(&api, "POST", &format!("/jobs/{id}/retry"), None).await, 409, "conflict");
    assert_error(&call(&api, "POST", &format!("/jobs/{id}/cancel"), None).await, 409, "conflict");
    let missing = uuid::Uuid::new_v4();
    assert_error(&call(&api, "POST", &format!("/jobs/{missing}/cancel"), None).await, 404, "not_found");
    assert_error(&call(&api, "POST", &format!("/jobs/{missing}/retry"), None).await, 404, "not_found");
}

#[tokio::test]
async fn stats_count_per_queue_and_status() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO jobs (payload, queue) SELECT '1', 'a' FROM generate_series(1, 5);
         INSERT INTO jobs (payload, queue, run_at) VALUES ('1', 'a', now() - interval '90 seconds');
         INSERT INTO jobs (payload, queue, run_at) VALUES ('1', 'a', now() + interval '1 hour');
         INSERT INTO jobs (payload, queue, status, finished_at) VALUES ('1', 'b', 'done', now()),
             ('1', 'b', 'done', now() - interval '2 minutes'), ('1', 'b', 'failed', now()),
             ('1', 'b', 'cancelled', now());
         INSERT INTO jobs (payload, queue, status, locked_by, locked_until) VALUES ('1', 'b', 'processing', 'x', now());",
    )
    .await
    .unwrap();
    let r = call(&api, "GET", "/stats", None).await;
    assert_eq!(r.status, 200);
    let queues = r.body["queues"].as_array().unwrap();
    let a = queues.iter().find(|q| q["queue"] == "a").unwrap();
    let b = queues.iter().find(|q| q["queue"] == "b").unwrap();
    assert_eq!(a["pending"], 7);
    let age = a["oldest_pending_age_secs"].as_f64().unwrap();
    assert!((89.0..200.0).contains(&age), "oldest runnable is 90s old, got {age}");
    assert_eq!((b["done"].as_i64(), b["failed"].as_i64(), b["cancelled"].as_i64()), (Some(2), Some(1), Some(1)));
    assert_eq!(b["processing"], 1);
    assert_eq!(b["finished_last_minute"], 3);
    // The view gives psql users the same numbers.
    let row = c.query_one("SELECT pending, done FROM jobqueue_stats WHERE queue = 'a'", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (7, 0));
}

#[tokio::test]
async fn odd_input_never_gets_a_5xx() {
    let db = TestDb::new().await;
    let api = api_for(&db.url, 1 << 20).await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let bodies: Vec<String> = vec![
        r#"{"payload": 1, "priority": 1.5}"#.into(),
        r#"{"payload": 1, "priority": 99999999999999999999}"#.into(),
        r#"{"payload": 1e400}"#.into(),
        r#"{"payload": 1, "max_attempts": -1}"#.into(),
        r#"{"payload": 1, "delay": "100000000000h"}"#.into(),
        r#"{"payload": 1, "delay": "-5s"}"#.into(),
        r#"{"payload": 1, "run_at": "9999-12-31T23:59:59Z"}"#.into(),
        r#"{"payload": 1, "run_at": "0001-01-01T00:00:00Z"}"#.into(),
        r#"{"payload": 1, "queue": "a\u0000b"}"#.into(),
        r#"{"payload": 1, "unique_key": ""}"#.into(),
        r#"{"payload": 1, "queue": ""}"#.into(),
        format!(r#"{{"payload": 1, "queue": "{}"}}"#, "q".repeat(200)),
        format!(r#"{{"payload": {deep}}}"#),
        r#"{"payload": {"\u0000": 1}}"#.into(),
        r#"{"payload": "\ud800"}"#.into(),
        "\u{feff}{\"payload\": 1}".into(),
        "null".into(),
        "[]".into(),
        "{}".into(),
        r#"{"payload": null}"#.into(),
        r#"{"payload": 1,}"#.into(),
    ];
    for body in &bodies {
        for path in ["/jobs", "/jobs/batch"] {
            let b = if path == "/jobs/batch" { format!("[{body}]") } else { body.clone() };
            let r = call(&api, "POST", path, Some(&b)).await;
            assert!(r.status < 500, "{path} {body:.80} -> {} {:?}", r.status, r.body);
            if r.status >= 400 {
                assert!(r.body["error"].is_string() && r.body["message"].is_string(), "{:?}", r.body);
            }
        }
    }
    // Invalid UTF-8 is malformed JSON, not a crash.
    let resp = warp::test::request()
        .method("POST")
        .path("/jobs")
        .header("content-type", "application/json")
        .body(vec![b'{', 0xff, 0xfe, b'}'])
        .reply(&api)
        .await;
    assert_eq!(resp.status(), 400);
    for path in ["/jobs?limit=99999999999999999999", "/jobs?before=%zz", "/jobs/%00", "/jobs?status=", "/stats?x=1"] {
        let r = call(&api, "GET", path, None).await;
        assert!(r.status < 500, "{path} -> {} {:?}", r.status, r.body);
    }
}

/// While a DBA holds a lock on `jobs`, API requests answer 503 within their deadline instead of
/// hanging for as long as the lock lasts, and the server cancels their statements (statement_timeout),
/// so no backend is left waiting behind the lock for a client that has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_table_gets_a_503_and_leaves_no_backend_behind() {
    let db = TestDb::new().await;
    let api = routes(Arc::new(ApiState {
        request_deadline: Duration::from_secs(3),
        ..common::api_state_with(&db.url, Duration::from_millis(500), 16)
    }));
    let id = call(&api, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await.body["id"].as_str().unwrap().to_string();

    let mut dba = db.client().await;
    let tx = dba.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let answers = tokio::time::timeout(Duration::from_secs(30), async {
        vec![
            call(&api, "POST", "/jobs", Some(r#"{"payload": 2}"#)).await,
            call(&api, "GET", &format!("/jobs/{id}"), None).await,
            call(&api, "GET", "/jobs", None).await,
            call(&api, "POST", &format!("/jobs/{id}/cancel"), None).await,
        ]
    })
    .await
    .expect("requests answered while the table is locked, not held until the lock goes");
    for r in &answers {
        assert_error(r, 503, "unavailable");
    }
    // The server cancelled every statement the API started: nothing of ours waits on the lock.
    let waiting =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'", db.name);
    common::wait_count(&db.client().await, Duration::from_secs(10), "no backend waiting on the lock", &waiting, 0)
        .await;
    tx.rollback().await.unwrap();
    assert_eq!(call(&api, "POST", "/jobs", Some(r#"{"payload": 3}"#)).await.status, 201);
    assert_eq!(count(&db.client().await, "SELECT count(*) FROM jobs").await, 2, "the refused insert stored nothing");
}
