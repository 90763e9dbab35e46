//! Queues as objects: pause and resume across instances and restarts, and `GET /queues`. Real
//! instances, real sockets, a real database of the test's own.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{count, eventually, http, noop, wait_count, HttpResponse, TestDb};
use jobqueue::{Builder, Config, Service};
use serde_json::{json, Value};

async fn start(config: Config) -> (Service, SocketAddr) {
    let service = Builder::new(config).handler("default", noop()).start().await.expect("service starts");
    let addr = service.local_addr().unwrap();
    (service, addr)
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> HttpResponse {
    http(addr, "POST", path, Some(&body.to_string())).await
}

async fn claim(addr: SocketAddr, queue: &str, body: Value) -> Vec<Value> {
    let r = post(addr, &format!("/queues/{queue}/claim"), body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["jobs"].as_array().unwrap().clone()
}

async fn insert(addr: SocketAddr, queue: &str, payload: Value) -> String {
    let r = post(addr, "/jobs", json!({"queue": queue, "payload": payload})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_paused_queue_is_claimed_by_nobody_on_any_instance_until_resumed() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let config = |id: &str| Config { instance_id: id.into(), ..db.config(4) };
    let (a, addr_a) = start(config("a")).await;
    let (b, addr_b) = start(config("b")).await;
    let r = http(addr_a, "POST", "/queues/default/pause", None).await;
    assert_eq!((r.status, r.json()["paused"].clone()), (200, json!(true)), "{}", r.body);
    for i in 0..20 {
        insert(addr_b, "default", json!(i)).await;
    }
    // A remote claim waits its full second and gets nothing; meanwhile the in-process producers of
    // both instances were woken by the inserts and claimed nothing either.
    assert!(claim(addr_b, "default", json!({"worker": "r", "wait": "1s"})).await.is_empty());
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'pending'").await, 20);

    let queues = eventually(Duration::from_secs(15), "both instances registered", || async {
        let q = http(addr_a, "GET", "/queues", None).await.json();
        let default = q["queues"].as_array()?.iter().find(|q| q["queue"] == "default")?.clone();
        (default["instances"] == json!(["a", "b"])).then_some(default)
    })
    .await;
    assert_eq!((queues["paused"].clone(), queues["pending"].clone()), (json!(true), json!(20)));

    // Stored in the database: a restarted instance still finds the queue paused.
    a.stop().await.expect("stops cleanly");
    let (a, addr_a) = start(config("a")).await;
    assert!(claim(addr_a, "default", json!({"worker": "r", "wait": "1s"})).await.is_empty());
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'pending'").await, 20);

    let r = http(addr_b, "POST", "/queues/default/resume", None).await;
    assert_eq!((r.status, r.json()["paused"].clone()), (200, json!(false)), "{}", r.body);
    wait_count(
        &c,
        Duration::from_secs(10),
        "all done after resume",
        "SELECT count(*) FROM jobs WHERE status = 'done'",
        20,
    )
    .await;
    a.stop().await.expect("stops cleanly");
    b.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn get_queues_lists_live_instances_only_and_queues_without_jobs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (service, addr) = start(Config { instance_id: "alive".into(), ..db.config(1) }).await;
    // A crashed instance: its row stopped being refreshed two minutes ago.
    c.execute("INSERT INTO instances (id, queues, heartbeat_at) VALUES ('crashed', '{default,gone}', now() - interval '2 minutes')", &[])
        .await
        .unwrap();
    assert_eq!(http(addr, "POST", "/queues/empty/pause", None).await.status, 200);
    let queues = eventually(Duration::from_secs(15), "this instance registered", || async {
        let q = http(addr, "GET", "/queues", None).await.json();
        let q = q["queues"].as_array()?.clone();
        q.iter().any(|q| q["queue"] == "default" && q["instances"] == json!(["alive"])).then_some(q)
    })
    .await;
    let names: Vec<&str> = queues.iter().map(|q| q["queue"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "empty"], "a dead instance's queues are not listed");
    assert_eq!(queues[1]["paused"], true);
    assert_eq!(queues[1]["pending"], 0);
    // A clean stop removes the instance's own row.
    service.stop().await.expect("stops cleanly");
    assert_eq!(count(&c, "SELECT count(*) FROM instances WHERE id = 'alive'").await, 0);
}
