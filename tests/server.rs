//! The HTTP server facing clients that misbehave, with the real binary over real sockets.

mod common;

use common::{http, Proc, TestDb};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Clients that send half a request and vanish, send garbage, or reset the connection are their own
/// problem: the server says nothing above debug level about them, and every line it does write
/// carries `instance`.
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
