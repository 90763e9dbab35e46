//! The HTTP server facing clients that misbehave, with the real binary over real sockets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{http, Proc, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn with(db: &TestDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = db.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Sends `raw` and reads the answer until the server closes (or `within` runs out).
async fn raw_exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Clients that send half a request and vanish, send garbage, or reset the connection are their own
/// problem: the server logs nothing about them as an error or as a request, and every line it does
/// write carries `instance`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_do_not_flood_the_log() {
    let db = TestDb::new().await;
    let p = Proc::jobqueue("server", &["serve"], &db.env());
    let addr = p.api_addr().await;

    for i in 0..60 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        match i % 3 {
            // Half a request line, then gone.
            0 => s.write_all(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Le").await.unwrap(),
            // Not HTTP at all.
            1 => s.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await.unwrap(),
            // Headers promising a body that never comes.
            _ => s
                .write_all(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pay")
                .await
                .unwrap(),
        }
        if i % 2 == 0 {
            // Reset rather than close: SO_LINGER 0.
            s.set_zero_linger().unwrap();
        }
        drop(s);
    }
    // The server still answers, and has seen all of the above by the time it answers this.
    let r = http(addr, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = http(addr, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    p.signal("TERM");
    // Read the log once the process has exited, so that no line is read half-written.
    let mut p = p;
    assert_eq!(p.wait(Duration::from_secs(60)).await, Some(0));

    let records = p.log_records();
    assert!(records.len() > 3, "the server logged its start: {records:?}");
    for r in &records {
        assert!(r.is_object(), "every line is JSON: {r}");
        assert!(r["instance"].is_string(), "every line names the instance: {r}");
        let level = r["level"].as_str().unwrap_or_default();
        assert!(!matches!(level, "ERRO" | "CRIT"), "client misbehaviour logged as an error: {r}");
    }
    let requests = records.iter().filter(|r| r["msg"] == "request").count();
    assert_eq!(requests, 2, "only the two whole requests were logged as requests");
}

/// Slowloris: 2,000 connections dribbling their headers one byte a second hold nothing for long.
/// New clients are answered meanwhile, and the slow connections are closed at the header deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_others_are_served() {
    let db = TestDb::new().await;
    let p = Proc::jobqueue("slowloris", &["serve"], &with(&db, &[("HTTP_HEADER_TIMEOUT", "2s")]));
    let addr = p.api_addr().await;
    let started = Instant::now();
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        slow.spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else { return None };
            let head = b"POST /jobs HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in head {
                if s.write_all(&[*byte]).await.is_err() {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None
        });
    }
    // Wait until the server holds the slow connections, then check a new client is served at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(5), http(addr, "GET", "/healthz", None))
            .await
            .expect("healthz answered while 2,000 slow clients are connected");
        assert_eq!(r.status, 200);
        let r = tokio::time::timeout(Duration::from_secs(5), http(addr, "POST", "/jobs", Some(r#"{"payload": 1}"#)))
            .await
            .expect("POST /jobs answered while 2,000 slow clients are connected");
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut cut = 0;
    while let Some(r) = slow.join_next().await {
        if let Some(at) = r.unwrap() {
            // Cut at the header deadline (2 s), not when the client finished: its head takes 57 s.
            assert!(at - started < Duration::from_secs(30), "a slow connection was held for {:?}", at - started);
            cut += 1;
        }
    }
    assert_eq!(cut, 2000, "every slow connection was closed by the server");
}

/// Past MAX_CONNECTIONS a new connection gets a 503 at once rather than exhausting file descriptors;
/// once idle connections time out, new clients are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_a_503_and_idle_ones_are_closed() {
    let db = TestDb::new().await;
    let env = with(&db, &[("MAX_CONNECTIONS", "50"), ("HTTP_HEADER_TIMEOUT", "1s")]);
    let p = Proc::jobqueue("limits", &["serve"], &env);
    let addr = p.api_addr().await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // The accept loop has taken all 50 once the 51st is refused.
    let refused = common::eventually(Duration::from_secs(10), "the 51st connection refused", || async {
        let r = raw_exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(2)).await;
        r.starts_with("HTTP/1.1 503").then_some(r)
    })
    .await;
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
    assert!(refused.contains("\"error\": \"unavailable\""), "{refused}");
    // Idle connections are closed by the server after the header timeout...
    for mut s in idle {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("idle connection closed");
        assert!(matches!(n, Ok(0) | Err(_)), "the server closed it");
    }
    // ...and the slots are free again.
    let r = http(addr, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200);
}

/// A body over MAX_BODY_BYTES reaches an ordinary client as the JSON 413, not as a broken pipe: the
/// server reads and discards the rest before answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_a_413_the_client_can_read() {
    let db = TestDb::new().await;
    let p = Proc::jobqueue("big", &["serve"], &db.env());
    let addr = p.api_addr().await;
    let body = format!(r#"{{"payload": "{}"}}"#, "x".repeat(3 << 20));
    for round in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap_or_else(|e| panic!("round {round}: the server broke off: {e}"));
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 413"), "round {round}: {out}");
        assert!(out.contains("payload_too_large"), "round {round}: {out}");
    }
    assert_eq!(common::count(&db.client().await, "SELECT count(*) FROM jobs").await, 0);
}

/// A body that stops arriving gets a 408; waits are bounded by MAX_WAITERS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_surplus_requests_are_refused() {
    let db = TestDb::new().await;
    let env = with(&db, &[("HTTP_BODY_TIMEOUT", "1s"), ("MAX_WAITERS", "2"), ("QUEUES", "other:1")]);
    let p = Proc::jobqueue("refusals", &["serve"], &env);
    let addr = p.api_addr().await;

    let stalled =
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"payl";
    let r = raw_exchange(addr, stalled, Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(r.contains("request_timeout"), "{r}");

    // The default queue is not served here, so its job stays pending and waiters keep waiting.
    let job = http(addr, "POST", "/jobs", Some(r#"{"payload": 1}"#)).await.json();
    let path = format!("/jobs/{}?wait=30s", job["id"].as_str().unwrap());
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let path = path.clone();
        waiters.spawn(async move { http(addr, "GET", &path, None).await });
    }
    // Two wait; the third is refused at once, with a hint when to come back.
    let refused = waiters.join_next().await.unwrap().unwrap();
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(waiters.try_join_next().is_none(), "the other two are still waiting");
    p.signal("TERM");
    let mut answered = Vec::new();
    while let Some(r) = waiters.join_next().await {
        answered.push(r.unwrap().status);
    }
    assert_eq!(answered, [200, 200], "the two waiters were answered at shutdown");
}

/// A request with both Transfer-Encoding and Content-Length is refused and the connection closed (RFC
/// 9112: behind a proxy that frames by the other header it is a smuggling attempt), and nothing it
/// carries is run: neither its body nor what the other framing would make a second request. Ordinary
/// keep-alive requests of either framing on one connection still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_body_framing_is_refused() {
    let db = TestDb::new().await;
    let p = Proc::jobqueue("smuggling", &["serve"], &db.env());
    let addr = p.api_addr().await;

    // Content-Length says the body ends early; the rest would be a second POST by the other reading.
    let smuggled = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"payload\": 1}  \r\n0\r\n\r\nPOST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"payload\": 2}";
    let r = raw_exchange(addr, smuggled, Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("Transfer-Encoding and Content-Length"), "{r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "one answer, then the connection closed: {r}");
    assert_eq!(common::count(&db.client().await, "SELECT count(*) FROM jobs").await, 0);

    // Keep-alive: a sized request, a chunked one, then a GET, on one connection.
    let ok = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"payload\": 1}POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\ne\r\n{\"payload\": 2}\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let r = raw_exchange(addr, ok, Duration::from_secs(10)).await;
    assert_eq!(r.matches("HTTP/1.1 201").count(), 2, "{r}");
    assert_eq!(r.matches("HTTP/1.1 200").count(), 1, "{r}");
    assert_eq!(common::count(&db.client().await, "SELECT count(*) FROM jobs").await, 2);
}

/// Client misbehaviour is visible to an operator at info level, rate-limited: 200 slow or broken
/// connections of four kinds make at most a couple of lines per kind (one per window, and the tail at
/// shutdown), each line counting the events it did not show (`suppressed`), so that the lines of a
/// kind add up to what the clients did. Every line carries `instance`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_misbehaviour_is_logged_at_info_rate_limited() {
    const PER_KIND: u64 = 50;
    let db = TestDb::new().await;
    let env = with(&db, &[("HTTP_HEADER_TIMEOUT", "1s"), ("HTTP_BODY_TIMEOUT", "1s")]);
    let mut p = Proc::jobqueue("noise", &["serve"], &env);
    let addr = p.api_addr().await;
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..4 * PER_KIND {
        clients.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let sent: &[u8] = match i % 4 {
                // Part of a head, then nothing: cut at the header timeout.
                0 => b"POST /jobs HTTP/1.1\r\nHost: x\r\nX-Slow: a",
                // A body promised and never sent whole: 408 at the body timeout.
                1 => b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pay",
                // Not HTTP at all: 400.
                2 => b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
                // Half a request line, then a reset.
                _ => b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Le",
            };
            s.write_all(sent).await.unwrap();
            if i % 4 == 3 {
                s.set_zero_linger().unwrap();
                return;
            }
            // Until the server answers and closes.
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
        });
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    assert_eq!(http(addr, "GET", "/healthz", None).await.status, 200);
    p.signal("TERM");
    assert_eq!(p.wait(Duration::from_secs(60)).await, Some(0));
    let elapsed = started.elapsed();

    let records = p.log_records();
    for r in &records {
        assert!(r["instance"].is_string(), "every line names the instance: {r}");
        let level = r["level"].as_str().unwrap_or_default();
        assert!(!matches!(level, "ERRO" | "CRIT"), "client misbehaviour logged as an error: {r}");
    }
    let window = jobqueue::api::noise::WINDOW.as_secs();
    let most_lines = elapsed.as_secs() / window + 2;
    for kind in ["slow_head", "slow_body", "malformed", "broken_off"] {
        let lines: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == kind).collect();
        assert!(!lines.is_empty(), "{kind}: reported at least once");
        assert!(lines.len() as u64 <= most_lines, "{kind}: {} lines in {elapsed:?}: {lines:?}", lines.len());
        let mut events = 0;
        for l in &lines {
            assert_eq!(l["level"], "INFO", "{l}");
            let suppressed = l["suppressed"].as_u64().unwrap_or_else(|| panic!("a suppressed count: {l}"));
            // A line with a peer shows one event besides those it counts; the shutdown's tail only counts.
            events += suppressed + u64::from(l["peer"].is_string());
        }
        // A connection reset before the server accepted it is never seen at all.
        if kind == "broken_off" {
            assert!((1..=PER_KIND).contains(&events), "{kind}: {events} events: {lines:?}");
        } else {
            assert_eq!(events, PER_KIND, "{kind}: the lines add up to the clients: {lines:?}");
        }
    }
}
