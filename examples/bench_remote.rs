//! Remote-worker benchmark: how fast HTTP clients drain a queue through the lease protocol, and the
//! claim→complete round trip of one job.
//!
//! ```sh
//! cargo run --release --example bench_remote -- --jobs 20000 --clients 4 --batch 100
//! ```
//!
//! Runs against a scratch database (`--database`, default `jobqueue_bench_remote`, on the server of
//! `DATABASE_URL`), which it creates, migrates and drops. One in-process instance serves the API with no
//! in-process workers; every job is claimed and completed over HTTP on keep-alive connections.
//!
//! Phase 1: `--jobs` no-op jobs inserted in one statement, then `--clients` clients each loop: claim up
//! to `--batch` jobs, complete them over 8 connections at once, until the queue is empty.
//! Phase 2: one client claims one job and completes it, 1000 times, one job in the queue at a time; the
//! percentiles are of that claim+complete pair.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use jobqueue::db::{self, queries};
use jobqueue::{Builder, Config};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Completion connections per client.
const COMPLETERS: usize = 8;

/// One keep-alive HTTP/1.1 connection: enough for JSON requests to the service.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn { stream: BufReader::new(stream) }
    }

    async fn post(&mut self, path: &str, body: &Value) -> (u16, Value) {
        let body = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).await.unwrap();
        let status: u16 = line.split_whitespace().nth(1).expect("status line").parse().unwrap();
        let mut length = 0;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut buf = vec![0; length];
        self.stream.read_exact(&mut buf).await.unwrap();
        (status, serde_json::from_slice(&buf).unwrap_or(Value::Null))
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
}

async fn complete_all(conns: &mut [Conn], jobs: Vec<Value>) {
    let mut chunks: Vec<Vec<Value>> = vec![Vec::new(); conns.len()];
    for (i, job) in jobs.into_iter().enumerate() {
        chunks[i % conns.len()].push(job);
    }
    let calls = conns.iter_mut().zip(chunks).map(|(conn, jobs)| async move {
        for job in jobs {
            let body = json!({"lease_token": job["lease_token"], "result": null});
            let (status, answer) = conn.post(&format!("/jobs/{}/complete", job["id"].as_str().unwrap()), &body).await;
            assert_eq!(status, 200, "{answer}");
        }
    });
    futures_util::future::join_all(calls).await;
}

#[tokio::main]
async fn main() {
    let (n_jobs, clients, batch) = (arg("--jobs", 20_000), arg("--clients", 4), arg("--batch", 100));
    let database =
        std::env::args().skip_while(|a| a != "--database").nth(1).unwrap_or_else(|| "jobqueue_bench_remote".into());
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| jobqueue::config::DEFAULT_DATABASE_URL.into());
    let mut admin = tokio_postgres::Config::from_str(&server).expect("DATABASE_URL");
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.expect("connect to postgres");
    tokio::spawn(conn);
    client.batch_execute(&queries::database_drop(&database)).await.unwrap();
    client.batch_execute(&queries::database_create(&database)).await.unwrap();
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => server.clone(),
    };

    let config = Config {
        database_url: url.clone(),
        bind: "127.0.0.1".parse().unwrap(),
        port: 0,
        queues: vec![],
        db_pool_size: (clients as u32 * (COMPLETERS as u32 + 1)).clamp(4, 64),
        ..Config::default()
    };
    let service = Builder::new(config).start().await.expect("instance starts");
    let addr = service.local_addr().unwrap();
    let pool = db::Connector::new(&url, Duration::from_secs(30)).unwrap().pool(2, Duration::from_secs(5));
    queries::job_insert_series(&*pool.get().await.unwrap(), "bench", n_jobs as i64).await.unwrap();

    // Phase 1: throughput.
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(async move {
                let mut claimer = Conn::open(addr).await;
                let mut completers = Vec::new();
                for _ in 0..COMPLETERS {
                    completers.push(Conn::open(addr).await);
                }
                let claim = json!({"worker": format!("bench-{c}"), "max": batch});
                loop {
                    let (status, answer) = claimer.post("/queues/bench/claim", &claim).await;
                    assert_eq!(status, 200, "{answer}");
                    let jobs = answer["jobs"].as_array().cloned().unwrap_or_default();
                    if jobs.is_empty() {
                        return;
                    }
                    complete_all(&mut completers, jobs).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let left = queries::job_count_unfinished(&*pool.get().await.unwrap()).await.unwrap();
    assert_eq!(left, 0, "every job done");
    println!(
        "remote throughput: {n_jobs} jobs drained by {clients} HTTP clients (claims of {batch}) in {:.2}s = {:.0} jobs/s",
        elapsed.as_secs_f64(),
        n_jobs as f64 / elapsed.as_secs_f64()
    );

    // Phase 2: one job at a time, claim then complete.
    let mut conn = Conn::open(addr).await;
    let mut times = Vec::new();
    for _ in 0..1000 {
        queries::job_insert_series(&*pool.get().await.unwrap(), "bench", 1).await.unwrap();
        let t = Instant::now();
        let (_, answer) = conn.post("/queues/bench/claim", &json!({"worker": "rtt", "max": 1})).await;
        let job = answer["jobs"][0].clone();
        complete_all(std::slice::from_mut(&mut conn), vec![job]).await;
        times.push(t.elapsed());
    }
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "remote round trip (claim + complete of one job) ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    service.stop().await.expect("stops cleanly");
    drop(pool);
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.batch_execute(&queries::database_drop(&database)).await.unwrap();
}
