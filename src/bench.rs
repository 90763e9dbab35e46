//! `jobqueue bench`: throughput and enqueue-to-start latency on a scratch database.
//!
//! Phase 1 inserts `--jobs` no-op jobs in one statement, then starts an instance and measures how fast
//! it drains them (claimed, run, and recorded `done`). Phase 2 enqueues single jobs at `--rate` per
//! second through the pool, as API clients would, and reports the percentiles of the time from each
//! job's `created_at` to its handler starting. The service under test logs nothing, so that the numbers
//! measure the queue rather than the terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use slog::{info, Logger};
use tokio::sync::Notify;

use crate::config::{parse_duration, BenchArgs, Config, QueueConfig};
use crate::job::NewJob;
use crate::service::Builder;
use crate::{db, HandlerError, JobContext};

const QUEUE: &str = "bench";

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, params) = match url.split_once('?') {
        Some((b, p)) => (b, Some(p)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match params {
        Some(p) => format!("{host_part}/{name}?{p}"),
        None => format!("{host_part}/{name}"),
    }
}

pub async fn run(config: &Config, args: &BenchArgs, log: &Logger) -> anyhow::Result<()> {
    let latency_for = parse_duration(&args.latency_for).context("--latency-for: expected a duration such as 5s")?;
    if config.database_name().as_deref() == Some(args.database.as_str()) {
        anyhow::bail!("--database must differ from the service's database: the benchmark drops it");
    }
    let url = with_database(&config.database_url, &args.database);
    let server = db::Connector::new(&config.database_url, config.statement_timeout)?.with_dbname("postgres");
    let client = server.connect(db::Purpose::Admin, log).await.context("connecting to the postgres database")?;
    client.batch_execute(&db::queries::database_drop(&args.database)).await?;

    let concurrency = config.queues.first().map(|q| q.concurrency).unwrap_or(8).max(args.concurrency);
    let mut bench_config = config.clone();
    bench_config.database_url = url.clone();
    bench_config.queues = vec![QueueConfig::new(QUEUE, concurrency)];
    // The benchmark's own database: migrate it before inserting.
    crate::service::migrate(&bench_config, log).await?;
    let pool = db::Connector::new(&url, Duration::ZERO)?.pool(4, Duration::from_secs(5));

    // Phase 1: throughput.
    let n = args.jobs as i64;
    db::queries::job_insert_series(&*pool.get().await?, QUEUE, n).await?;
    let count = Arc::new(AtomicU64::new(0));
    let all_started = Arc::new(Notify::new());
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let (count, all_started, latencies, measuring) =
            (count.clone(), all_started.clone(), latencies.clone(), measuring.clone());
        move |ctx: JobContext| {
            let seen = count.fetch_add(1, Ordering::Relaxed) + 1;
            if seen == n as u64 {
                all_started.notify_one();
            }
            if measuring.load(Ordering::Relaxed) {
                let ms = (Utc::now() - ctx.job.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                latencies.lock().expect("latencies").push(ms);
            }
            async { Ok::<_, HandlerError>(serde_json::Value::Null) }
        }
    };
    let service = Builder::new(bench_config).api(false).handler(QUEUE, handler).start().await?;
    // The clock starts once the instance is up; its start-up sweep is the first claim.
    let started = Instant::now();
    all_started.notified().await;
    // Wait until the last outcome is recorded, not merely run.
    let c = pool.get().await?;
    while db::queries::job_count_unfinished(&*c).await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {n} no-op jobs drained in {:.2}s = {rate:.0} jobs/s (concurrency {concurrency})",
        elapsed.as_secs_f64()
    );
    info!(log, "bench throughput"; "jobs" => n, "seconds" => elapsed.as_secs_f64(), "jobs_per_sec" => rate);

    // Phase 2: latency under a steady trickle of single inserts.
    measuring.store(true, Ordering::Relaxed);
    let total = (args.rate as f64 * latency_for.as_secs_f64()) as u64;
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let t0 = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(t0 + gap * i as u32).await;
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Ok(c) = pool.get().await {
                let _ = db::queries::job_insert(&c, &NewJob::new(serde_json::json!({"i": i})).queue(QUEUE)).await;
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (latencies.lock().expect("latencies").len() as u64) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await?;
    let mut l = latencies.lock().expect("latencies").clone();
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| l.get(((l.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "latency: {} jobs at {}/s, enqueue-to-start ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
        l.len(),
        args.rate,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    drop(c);
    drop(pool);
    client.batch_execute(&db::queries::database_drop(&args.database)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_name_is_replaced() {
        assert_eq!(super::with_database("postgres://u@h:5432/a", "b"), "postgres://u@h:5432/b");
        assert_eq!(super::with_database("postgres://u@h/a?sslmode=disable", "b"), "postgres://u@h/b?sslmode=disable");
        assert_eq!(super::with_database("postgres://u@h", "b"), "postgres://u@h/b");
    }
}
