//! The webhook handler against a real HTTP server started inside the test: outcomes by status,
//! `Retry-After`, timeouts and the signature. Times are asserted on the requests the server recorded,
//! not on how long the test took.

mod common;

use std::time::Duration;

use common::hook_server::{HookServer, Received, Reply};
use common::{eventually, TestDb};
use hmac::{Hmac, KeyInit, Mac};
use jobqueue::config::{HandlerSpec, Secret};
use jobqueue::worker::handlers;
use jobqueue::{Builder, QueueConfig, RetryPolicy, Service};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_postgres::Client;
use uuid::Uuid;

const SECRET: &str = "whsec-test-secret";

/// An instance without API serving the queue `hooks` with a webhook to `url`: retries after 100 ms.
async fn start(db: &TestDb, url: &str, max_attempts: i32, timeout: Option<Duration>) -> Service {
    let mut config = db.config(1);
    config.poll_interval = Duration::from_millis(200);
    let retry =
        RetryPolicy { max_attempts, backoff: Duration::from_millis(100), jitter: 0.0, ..RetryPolicy::default() };
    config.queues = vec![QueueConfig { retry, timeout, ..QueueConfig::new("hooks", 2) }];
    let spec = HandlerSpec::Webhook { url: url.to_string(), secret: Secret::new(SECRET) };
    let handler = handlers::for_spec(&spec, &handlers::http_client().unwrap()).unwrap();
    Builder::new(config).api(false).handler("hooks", handler).start().await.expect("service starts")
}

async fn insert(c: &Client, payload: Value) -> Uuid {
    c.query_one("INSERT INTO jobs (queue, payload) VALUES ('hooks', $1) RETURNING id", &[&payload])
        .await
        .unwrap()
        .get(0)
}

/// Waits until the job is finished; returns (status, attempts, result, error, errors).
async fn finished(c: &Client, id: Uuid) -> (String, i32, Option<Value>, Option<String>, Value) {
    eventually(Duration::from_secs(30), "job finished", || async {
        let row = c
            .query_one("SELECT status::text, attempts, result, error, errors FROM jobs WHERE id = $1", &[&id])
            .await
            .unwrap();
        let status: String = row.get(0);
        (status != "pending" && status != "processing")
            .then(|| (status, row.get(1), row.get(2), row.get(3), row.get(4)))
    })
    .await
}

fn hmac_hex(secret: &str, signed: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signed);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a receiver does: split the header, recompute the HMAC of "<t>.<body>", compare.
fn verifies(req: &Received, secret: &str) -> bool {
    let header = req.header("Jobqueue-Signature").expect("signature header");
    let (t, v1) = header.split_once(',').expect("t=...,v1=...");
    let (t, v1) = (t.strip_prefix("t=").unwrap(), v1.strip_prefix("v1=").unwrap());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&req.body);
    hmac_hex(secret, &signed) == v1
}

#[tokio::test]
async fn a_2xx_with_json_is_done_with_that_result() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![Reply::new(200, r#"{"message_id": "m-1", "n": 3}"#)]).await;
    let service = start(&db, &hook.url("/jobs"), 3, None).await;
    let id = insert(&c, json!({"to": "a@example.com"})).await;

    let (status, attempts, result, _, _) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("done", 1));
    assert_eq!(result, Some(json!({"message_id": "m-1", "n": 3})));

    let got = hook.received();
    assert_eq!(got.len(), 1);
    let req = &got[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/jobs"));
    assert_eq!(req.header("Content-Type"), Some("application/json"));
    assert_eq!(req.header("Jobqueue-Job-Id"), Some(id.to_string().as_str()));
    assert_eq!(req.json(), json!({"id": id, "queue": "hooks", "attempt": 1, "payload": {"to": "a@example.com"}}));
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn the_signature_verifies_with_the_secret_and_not_with_another() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![]).await;
    let service = start(&db, &hook.url("/"), 3, None).await;
    let id = insert(&c, json!({"n": 1})).await;
    assert_eq!(finished(&c, id).await.0, "done");

    let req = &hook.received()[0];
    assert!(verifies(req, SECRET), "{:?}", req.header("Jobqueue-Signature"));
    assert!(!verifies(req, "another-secret"));
    // The timestamp is the sending time, for receivers that refuse old deliveries.
    let header = req.header("Jobqueue-Signature").unwrap();
    let t: i64 = header.strip_prefix("t=").unwrap().split(',').next().unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - t).abs() < 60, "t={t}");
    // A tampered body no longer verifies.
    let mut tampered = req.clone();
    tampered.body = br#"{"n": 2}"#.to_vec();
    assert!(!verifies(&tampered, SECRET));
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_500_is_retried_then_done() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![Reply::new(500, "database is down"), Reply::new(200, "accepted")]).await;
    let service = start(&db, &hook.url("/"), 3, None).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, result, error, errors) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("done", 2));
    assert_eq!(result, Some(json!("accepted")), "a body that is not JSON is kept as text");
    assert_eq!(error, None);
    let first = errors[0]["error"].as_str().unwrap();
    assert!(first.contains("500") && first.contains("database is down"), "{first}");
    let got = hook.received();
    assert_eq!(got.iter().map(|r| r.json()["attempt"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_429_is_not_retried_before_its_retry_after() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![Reply::new(429, "slow down").header("Retry-After", "2")]).await;
    // The queue's own backoff is 100 ms: only Retry-After can explain a 2 s gap.
    let service = start(&db, &hook.url("/"), 3, None).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, ..) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("done", 2));
    let got = hook.received();
    assert_eq!(got.len(), 2);
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_400_fails_at_once_with_the_status_in_the_error() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![Reply::new(400, r#"{"error": "unknown template"}"#)]).await;
    let service = start(&db, &hook.url("/"), 5, None).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, result, error, _) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts, result), ("failed", 1, None));
    let error = error.unwrap();
    assert!(error.contains("400") && error.contains("unknown template"), "{error}");
    assert_eq!(hook.received().len(), 1);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![Reply::new(200, "too late").delay(Duration::from_secs(10))]).await;
    let service = start(&db, &hook.url("/"), 3, Some(Duration::from_secs(1))).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, result, _, errors) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("done", 2));
    assert_eq!(result, Some(json!({"ok": true})));
    let first = errors[0]["error"].as_str().unwrap();
    assert_eq!(first, "handler timed out after 1s", "the queue's timeout, not JOB_TIMEOUT");
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn an_unreachable_receiver_is_retried_until_attempts_run_out() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // A port that was free a moment ago: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let service = start(&db, &format!("http://127.0.0.1:{port}/"), 2, None).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, _, error, _) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("failed", 2));
    let error = error.unwrap();
    assert!(error.starts_with("webhook request failed"), "{error}");
    service.stop().await.expect("stops cleanly");
}

/// The receiver example in README, run by python3 against a real delivery.
#[tokio::test]
async fn the_readme_receiver_example_verifies_a_delivery() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (_, after) = readme.split_once("<!-- webhook-verify-example").expect("README marks the example");
    let code = after.split_once("```python\n").unwrap().1.split_once("```").unwrap().0;

    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![]).await;
    let service = start(&db, &hook.url("/"), 3, None).await;
    let id = insert(&c, json!({"to": "ü@example.com", "n": [1, 2.5]})).await;
    assert_eq!(finished(&c, id).await.0, "done");
    service.stop().await.expect("stops cleanly");
    let req = &hook.received()[0];

    let dir = std::env::temp_dir().join(format!("jq-verify-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("verify.py");
    let driver = "\nimport sys\nbody = open(sys.argv[3], 'rb').read()\nprint('valid' if verify(sys.argv[1].encode(), sys.argv[2], body) else 'invalid')\n";
    std::fs::write(&script, format!("{code}{driver}")).unwrap();
    let (body, tampered) = (dir.join("body"), dir.join("tampered"));
    std::fs::write(&body, &req.body).unwrap();
    std::fs::write(&tampered, [&req.body[..], b" "].concat()).unwrap();
    let header = req.header("Jobqueue-Signature").unwrap();
    let run = |secret: &str, body: &std::path::Path| {
        let out = std::process::Command::new("python3")
            .arg(&script)
            .args([secret, header, body.to_str().unwrap()])
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(run(SECRET, &body), "valid");
    assert_eq!(run("another-secret", &body), "invalid");
    assert_eq!(run(SECRET, &tampered), "invalid");
    let _ = std::fs::remove_dir_all(&dir);
}
