//! Remote workers over HTTP: real instances, real sockets, a real database of the test's own. The
//! queue `remote` has no in-process handler, so only the HTTP clients of each test work it.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, http, noop, wait_count, HttpResponse, TestDb};
use jobqueue::{Builder, Config, Service};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(config: Config) -> (Service, SocketAddr) {
    let service = Builder::new(config).handler("default", noop()).start().await.expect("service starts");
    let addr = service.local_addr().unwrap();
    (service, addr)
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> HttpResponse {
    http(addr, "POST", path, Some(&body.to_string())).await
}

/// Claims from `queue`; asserts the answer is 200 and returns its jobs.
async fn claim(addr: SocketAddr, queue: &str, body: Value) -> Vec<Value> {
    let r = post(addr, &format!("/queues/{queue}/claim"), body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["jobs"].as_array().unwrap().clone()
}

fn id_token(job: &Value) -> (String, String) {
    (job["id"].as_str().unwrap().to_string(), job["lease_token"].as_str().unwrap().to_string())
}

fn assert_lease_lost(r: &HttpResponse) {
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"], "lease_lost", "{}", r.body);
}

async fn insert(addr: SocketAddr, queue: &str, payload: Value) -> String {
    let r = post(addr, "/jobs", json!({"queue": queue, "payload": payload})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_remote_clients_work_5000_jobs_each_exactly_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(db.config(1)).await;
    c.execute(
        "INSERT INTO jobs (queue, payload) SELECT 'remote', jsonb_build_object('n', i) FROM generate_series(1, 5000) i",
        &[],
    )
    .await
    .unwrap();
    let completed = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for w in 0..4 {
        let completed = completed.clone();
        let url = db.url.clone();
        clients.push(tokio::spawn(async move {
            let c = common::connect(&url).await;
            let worker = format!("client-{w}");
            loop {
                let jobs = claim(addr, "remote", json!({"worker": worker, "max": 100, "wait": "1s"})).await;
                if jobs.is_empty() {
                    let left = count(&c, "SELECT count(*) FROM jobs WHERE status <> 'done'").await;
                    if left == 0 {
                        return;
                    }
                    continue;
                }
                // Complete the batch concurrently, so the server sees many completions at once.
                let calls = jobs.iter().map(|job| {
                    let (id, token) = id_token(job);
                    let worker = worker.clone();
                    async move {
                        let body = json!({"lease_token": token, "result": {"by": worker}});
                        let r = post(addr, &format!("/jobs/{id}/complete"), body).await;
                        assert_eq!(r.status, 200, "{}", r.body);
                        assert_eq!(r.json()["status"], "done");
                        id
                    }
                });
                let ids = futures_util::future::join_all(calls).await;
                completed.lock().unwrap().extend(ids);
            }
        }));
    }
    for client in clients {
        tokio::time::timeout(Duration::from_secs(300), client).await.expect("clients finish").unwrap();
    }
    let completed = completed.lock().unwrap().clone();
    let distinct: HashSet<&String> = completed.iter().collect();
    assert_eq!(completed.len(), 5000, "every job completed once");
    assert_eq!(distinct.len(), 5000, "no job completed twice");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'done' AND attempts = 1").await, 5000);
    let by = count(&c, "SELECT count(DISTINCT result->>'by') FROM jobs").await;
    assert!(by >= 2, "the work was shared ({by} clients did any)");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE lease_token IS NOT NULL").await, 0, "tokens cleared");
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_long_poll_returns_with_a_job_inserted_while_it_waits() {
    let db = TestDb::new().await;
    // Only the insert's notification can end the wait in time: the fallback poll is a minute away.
    let (service, addr) = start(Config { poll_interval: Duration::from_secs(60), ..db.config(1) }).await;
    let waiting =
        tokio::spawn(
            async move { claim(addr, "remote", json!({"worker": "poller", "wait": "30s", "lease": "45s"})).await },
        );
    // An empty queue: the claim waits rather than answering.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a claim with wait answered before any job existed");
    let id = insert(addr, "remote", json!({"x": 1})).await;
    let jobs = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the long-poll returned within 2 s of the insert")
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job["id"], id.as_str());
    assert_eq!((job["status"].as_str(), job["attempts"].as_i64()), (Some("processing"), Some(1)));
    assert_eq!(job["locked_by"], "poller");
    assert_eq!(job["lease_expires_at"], job["locked_until"]);
    let token = job["lease_token"].as_str().unwrap();
    assert!(token.len() == 64 && token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    // The token is shown to the claimer only.
    let got = http(addr, "GET", &format!("/jobs/{id}"), None).await;
    assert!(!got.body.contains(token) && !got.body.contains("lease_token"), "{}", got.body);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_insert_of_many_jobs_reaches_as_many_waiting_workers_as_it_needs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(Config { poll_interval: Duration::from_secs(60), ..db.config(1) }).await;
    let waiters: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(async move {
                claim(addr, "remote", json!({"worker": format!("w{i}"), "max": 2, "wait": "30s"})).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()), "claims with wait answered before any job existed");
    // One statement, one notification, which wakes one waiter; each full claim wakes the next.
    c.execute("INSERT INTO jobs (queue, payload) SELECT 'remote', to_jsonb(i) FROM generate_series(1, 6) i", &[])
        .await
        .unwrap();
    let mut got = HashSet::new();
    for w in waiters {
        let jobs = tokio::time::timeout(Duration::from_secs(5), w).await.expect("every waiter woken").unwrap();
        assert_eq!(jobs.len(), 2);
        got.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
    }
    assert_eq!(got.len(), 6);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_loses_its_job_and_its_late_complete_writes_nothing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(db.config(1)).await;
    let id = insert(addr, "remote", json!("slow")).await;
    let jobs = claim(addr, "remote", json!({"worker": "sleepy", "lease": "1s"})).await;
    let (_, old) = id_token(&jobs[0]);
    // The lease runs out and the rescuer (every 500 ms here) returns the job.
    let rescued =
        format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'pending' AND error LIKE 'worker lost%'");
    wait_count(&c, Duration::from_secs(10), "job rescued", &rescued, 1).await;
    let late = post(addr, &format!("/jobs/{id}/complete"), json!({"lease_token": old, "result": "late"})).await;
    assert_lease_lost(&late);
    let unchanged = format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'pending' AND result IS NULL");
    assert_eq!(count(&c, &unchanged).await, 1, "the late complete wrote nothing");

    // Attempt 2 gets a new token; attempt 1's cannot touch it.
    let jobs = claim(addr, "remote", json!({"worker": "second"})).await;
    let (_, new) = id_token(&jobs[0]);
    assert_eq!(jobs[0]["attempts"], 2);
    assert_ne!(old, new);
    for (call, body) in [
        ("heartbeat", json!({"lease_token": old})),
        ("complete", json!({"lease_token": old, "result": 1})),
        ("fail", json!({"lease_token": old, "error": "x", "retry": false})),
        ("snooze", json!({"lease_token": old, "delay": "1h"})),
        ("release", json!({"lease_token": old})),
        ("complete", json!({"lease_token": "0".repeat(64)})),
    ] {
        assert_lease_lost(&post(addr, &format!("/jobs/{id}/{call}"), body).await);
    }
    let held =
        format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'processing' AND locked_by = 'second'");
    assert_eq!(count(&c, &held).await, 1, "attempt 2 untouched");
    let done = post(addr, &format!("/jobs/{id}/complete"), json!({"lease_token": new, "result": {"ok": true}})).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!((done.json()["status"].clone(), done.json()["result"].clone()), (json!("done"), json!({"ok": true})));
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_released_attempt_keeps_its_number_but_its_token_is_dead() {
    let db = TestDb::new().await;
    let (service, addr) = start(db.config(1)).await;
    let id = insert(addr, "remote", json!(1)).await;
    let (_, first) = id_token(&claim(addr, "remote", json!({"worker": "w"})).await[0]);
    let r = post(addr, &format!("/jobs/{id}/release"), json!({"lease_token": first})).await;
    assert_eq!((r.status, r.json()["status"].clone(), r.json()["attempts"].clone()), (200, json!("pending"), json!(0)));
    let again = claim(addr, "remote", json!({"worker": "w"})).await;
    assert_eq!(again[0]["attempts"], 1, "release does not count the attempt");
    assert_lease_lost(&post(addr, &format!("/jobs/{id}/complete"), json!({"lease_token": first})).await);
    // fail with retry: back to pending with the default backoff; retry_after is honoured.
    let (_, second) = id_token(&again[0]);
    let r =
        post(addr, &format!("/jobs/{id}/fail"), json!({"lease_token": second, "error": "boom", "retry_after": "1h"}))
            .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let job = r.json();
    assert_eq!((job["status"].clone(), job["error"].clone()), (json!("pending"), json!("boom")));
    let run_at = chrono::DateTime::parse_from_rfc3339(job["run_at"].as_str().unwrap()).unwrap();
    assert!(run_at > chrono::Utc::now() + chrono::Duration::minutes(59), "retry_after honoured: {run_at}");
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn cancel_reaches_a_remote_worker_through_its_heartbeat() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // No rescuer in the way: the heartbeat after the lease ran out is what ends the second job.
    let config = Config { maintenance_interval: Duration::from_secs(3600), ..db.config(1) };
    let (service, addr) = start(config).await;
    let id = insert(addr, "remote", json!(1)).await;
    let (_, token) = id_token(&claim(addr, "remote", json!({"worker": "w"})).await[0]);
    let beat = post(addr, &format!("/jobs/{id}/heartbeat"), json!({"lease_token": token, "lease": "1m"})).await;
    assert_eq!((beat.status, beat.json()["cancel_requested"].clone()), (200, json!(false)), "{}", beat.body);
    assert_eq!(http(addr, "POST", &format!("/jobs/{id}/cancel"), None).await.status, 202);
    let beat = post(addr, &format!("/jobs/{id}/heartbeat"), json!({"lease_token": token})).await;
    assert_eq!((beat.status, beat.json()["cancel_requested"].clone()), (200, json!(true)), "{}", beat.body);
    let r = post(addr, &format!("/jobs/{id}/release"), json!({"lease_token": token})).await;
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("cancelled")), "{}", r.body);

    // A worker that ignores the request and keeps heartbeating: the lease is not extended any more,
    // and the first heartbeat after it ran out ends the job cancelled.
    let id = insert(addr, "remote", json!(2)).await;
    let (_, token) = id_token(&claim(addr, "remote", json!({"worker": "w", "lease": "1s"})).await[0]);
    assert_eq!(http(addr, "POST", &format!("/jobs/{id}/cancel"), None).await.status, 202);
    let expired = format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND locked_until < now()");
    wait_count(&c, Duration::from_secs(10), "lease ran out", &expired, 1).await;
    let r = post(addr, &format!("/jobs/{id}/heartbeat"), json!({"lease_token": token, "lease": "1m"})).await;
    assert_lease_lost(&r);
    assert_eq!(r.json()["job"]["status"], "cancelled");
    let cancelled =
        format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'cancelled' AND locked_by IS NULL");
    assert_eq!(count(&c, &cancelled).await, 1);

    // A worker that fails the job after the request ends it cancelled too, even asking for no retry;
    // its error is kept.
    let id = insert(addr, "remote", json!(3)).await;
    let (_, token) = id_token(&claim(addr, "remote", json!({"worker": "w"})).await[0]);
    assert_eq!(http(addr, "POST", &format!("/jobs/{id}/cancel"), None).await.status, 202);
    let r = post(addr, &format!("/jobs/{id}/fail"), json!({"lease_token": token, "error": "stopped", "retry": false}))
        .await;
    assert_eq!(
        (r.status, r.json()["status"].clone(), r.json()["error"].clone()),
        (200, json!("cancelled"), json!("stopped"))
    );
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_long_poll_whose_client_disconnects_leaves_no_job_in_processing() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(db.config(1)).await;
    let mut ghost = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({"worker": "ghost", "wait": "30s", "lease": "1h"}).to_string();
    let req = format!(
        "POST /queues/remote/claim HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    ghost.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), ghost.read(&mut buf)).await;
    assert!(early.is_err(), "the long-poll answered before any job existed");
    drop(ghost);
    // Whether the server dropped the long-poll before the insert woke it, or the claim was already
    // under way and its jobs were released because nobody could receive them, the job must reach a
    // live worker on its first attempt, not sit in processing under the ghost's hour-long lease.
    let id = insert(addr, "remote", json!(1)).await;
    // A long-poll that survived its client would claim the job within milliseconds of the insert's
    // notification; one second is the window in which nothing may claim it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let untouched = format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'pending' AND attempts = 0");
    assert_eq!(count(&c, &untouched).await, 1, "nobody claimed the job for the departed client");
    let jobs = claim(addr, "remote", json!({"worker": "alive", "wait": "5s"})).await;
    assert_eq!(jobs.len(), 1, "the job reached the live worker");
    assert_eq!((jobs[0]["id"].as_str(), jobs[0]["attempts"].as_i64()), (Some(id.as_str()), Some(1)));
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE locked_by = 'ghost'").await, 0);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx() {
    let db = TestDb::new().await;
    let (service, addr) = start(db.config(1)).await;
    let id = insert(addr, "remote", json!(1)).await;
    let claim_cases = [
        (json!({"worker": ""}), "worker"),
        (json!({"worker": "x".repeat(129)}), "worker"),
        (json!({"max": 1}), "worker"),
        (json!({"worker": "w", "max": 0}), "max"),
        (json!({"worker": "w", "max": 1001}), "max"),
        (json!({"worker": "w", "lease": "500ms"}), "lease"),
        (json!({"worker": "w", "lease": "2h"}), "lease"),
        (json!({"worker": "w", "wait": "61s"}), "wait"),
        (json!({"worker": "w", "wait": "soon"}), "wait"),
        (json!({"worker": "w", "lesae": "1m"}), "lesae"),
    ];
    for (body, field) in claim_cases {
        let r = post(addr, "/queues/remote/claim", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.json()["message"].as_str().unwrap().contains(field), "{body}: {}", r.body);
    }
    let lease_cases = [
        ("heartbeat", json!({}), "lease_token"),
        ("heartbeat", json!({"lease_token": "t", "lease": "0s"}), "lease"),
        ("complete", json!({"lease_token": "t", "error": "x"}), "error"),
        ("fail", json!({"lease_token": "t"}), "error"),
        ("fail", json!({"lease_token": "t", "error": "x", "retry": "no"}), "retry"),
        ("snooze", json!({"lease_token": "t"}), "delay"),
        ("release", json!({"lease_token": "t", "delay": "1s"}), "delay"),
    ];
    for (call, body, field) in lease_cases {
        let r = post(addr, &format!("/jobs/{id}/{call}"), body.clone()).await;
        assert_eq!(r.status, 400, "{call} {body}: {}", r.body);
        assert!(r.json()["message"].as_str().unwrap().contains(field), "{call} {body}: {}", r.body);
    }
    assert_eq!(http(addr, "GET", "/queues/remote/claim", None).await.status, 405);
    assert_eq!(http(addr, "GET", &format!("/jobs/{id}/complete"), None).await.status, 405);
    assert_eq!(post(addr, "/queues/%FF/claim", json!({"worker": "w"})).await.status, 400);
    let unknown = post(addr, &format!("/jobs/{}/complete", uuid::Uuid::new_v4()), json!({"lease_token": "t"})).await;
    assert_lease_lost(&unknown);
    // A queue name with a space travels percent-encoded.
    insert(addr, "with space", json!(1)).await;
    assert_eq!(claim(addr, "with%20space", json!({"worker": "w"})).await.len(), 1);
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn jobs_claimed_for_a_client_that_already_left_go_straight_back_to_pending() {
    let db = TestDb::new().await;
    let mut c = db.client().await;
    // No in-process producer, whose claims would block on the lock below as well.
    let (service, addr) = start(Config { queues: vec![], ..db.config(1) }).await;
    let id = insert(addr, "remote", json!(1)).await;
    // Hold the claim inside the database: it reads `queues` (the pause check), which this lock blocks.
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE queues IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let mut ghost = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({"worker": "ghost", "lease": "1h"}).to_string();
    let req = format!(
        "POST /queues/remote/claim HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    ghost.write_all(req.as_bytes()).await.unwrap();
    let observer = db.client().await;
    let blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE SKIP LOCKED%'";
    wait_count(&observer, Duration::from_secs(10), "claim blocked on the lock", blocked, 1).await;
    drop(ghost);
    // Let the server see the closed socket while the claim is still blocked, then let the claim run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await.unwrap();
    // Claimed (the row was updated) and already pending again with the attempt not counted, long
    // before the hour-long lease could have run out.
    let back = format!(
        "SELECT count(*) FROM jobs WHERE id = '{id}' AND status = 'pending' AND attempts = 0 AND locked_by IS NULL
         AND updated_at > created_at"
    );
    wait_count(&observer, Duration::from_secs(5), "claimed job released at once", &back, 1).await;
    let jobs = claim(addr, "remote", json!({"worker": "alive"})).await;
    assert_eq!((jobs[0]["id"].as_str(), jobs[0]["attempts"].as_i64()), (Some(id.as_str()), Some(1)));
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn long_polls_beyond_the_cap_are_told_to_come_back_later() {
    use jobqueue::api::{routes, ApiState};
    let db = TestDb::new().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let api = routes(Arc::new(ApiState {
        shutdown: shutdown.clone(),
        ..common::api_state_with(&db.url, Duration::from_secs(10), 1)
    }));
    let request = |wait: &str| {
        warp::test::request()
            .method("POST")
            .path("/queues/remote/claim")
            .header("content-type", "application/json")
            .body(json!({"worker": "w", "wait": wait}).to_string())
    };
    let first = tokio::spawn({
        let (api, req) = (api.clone(), request("30s"));
        async move { req.reply(&api).await }
    });
    // This test runs on one thread: the spawned long-poll runs at the next yield and takes the only
    // slot before its first real wait (the database).
    tokio::task::yield_now().await;
    assert!(!first.is_finished());
    let busy = request("1s").reply(&api).await;
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers().get("retry-after").unwrap(), "1");
    let body: Value = serde_json::from_slice(busy.body()).unwrap();
    assert_eq!(body["error"], "busy");
    // A claim without wait holds no long-poll slot, so it is still answered.
    assert_eq!(request("0s").reply(&api).await.status(), 200);
    // Shutdown answers the waiting claim at once, with what it has.
    shutdown.cancel();
    let first = tokio::time::timeout(Duration::from_secs(5), first).await.expect("answered on shutdown").unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(serde_json::from_slice::<Value>(first.body()).unwrap(), json!({"jobs": []}));
}
