//! `jobqueue bench`: throughput and enqueue-to-start latency on a scratch database.
//!
//! The instance runs with the settings a user's `jobqueue serve` would have (its default concurrency
//! unless `--concurrency` or `WORKERS` says otherwise). Phase 1 starts it idle, inserts `--jobs` no-op
//! jobs in one statement, and measures from that statement's commit to the last job's `finished_at`:
//! the figure the side-by-side harness measures for every queue. Phase 2 enqueues single jobs at `--rate` per
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

/// Asks `count` every `every` until it answers zero. A count that stops going down for 60 s is a
/// stalled drain: a failure to report, not a reason to wait forever.
async fn until_none<F, Fut>(every: Duration, what: &str, mut count: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<i64>>,
{
    let (mut least, mut moved) = (i64::MAX, Instant::now());
    loop {
        let now = count().await?;
        if now == 0 {
            return Ok(());
        }
        if now < least {
            (least, moved) = (now, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("the drain stalled: {least} jobs {what} for 60 s");
        }
        tokio::time::sleep(every).await;
    }
}

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
    let job_sleep = parse_duration(&args.job_sleep).context("--job-sleep: expected a duration such as 50ms")?;
    if config.database_name().as_deref() == Some(args.database.as_str()) {
        anyhow::bail!("--database must differ from the service's database: the benchmark drops it");
    }
    let url = with_database(&config.database_url, &args.database);
    let server = db::Connector::new(&config.database_url, config.statement_timeout)?.with_dbname("postgres");
    let client = server.connect(db::Purpose::Admin, log).await.context("connecting to the postgres database")?;
    client.batch_execute(&db::queries::database_drop(&args.database)).await?;

    let concurrency = args
        .concurrency
        .unwrap_or_else(|| config.queues.first().map_or(QueueConfig::default().concurrency, |q| q.concurrency));
    let mut bench_config = config.clone();
    bench_config.database_url = url.clone();
    bench_config.queues = vec![QueueConfig::new(QUEUE, concurrency)];
    // The benchmark's own database: migrate it before inserting.
    crate::service::migrate(&bench_config, log).await?;
    let pool = db::Connector::new(&url, Duration::ZERO)?.pool(4, Duration::from_secs(5));

    // Phase 1: throughput.
    let n = args.jobs as i64;
    let count = Arc::new(AtomicU64::new(0));
    let all_started = Arc::new(Notify::new());
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One job with priority -1000 inserted once the drain is under way: how long it waits behind the
    // backlog (it should not: it sorts first).
    let (urgent_tx, urgent_rx) = tokio::sync::oneshot::channel::<Instant>();
    let urgent_started = Arc::new(Mutex::new(Some(urgent_tx)));
    let handler = {
        let (count, all_started, latencies, measuring, urgent_started) =
            (count.clone(), all_started.clone(), latencies.clone(), measuring.clone(), urgent_started.clone());
        move |ctx: JobContext| {
            if ctx.job.payload.get("urgent").is_some() {
                if let Some(tx) = urgent_started.lock().expect("urgent").take() {
                    let _ = tx.send(Instant::now());
                }
                return futures_util::future::Either::Left(async { Ok::<_, HandlerError>(serde_json::Value::Null) });
            }
            let seen = count.fetch_add(1, Ordering::Relaxed) + 1;
            if seen == n as u64 {
                all_started.notify_one();
            }
            if measuring.load(Ordering::Relaxed) {
                let ms = (Utc::now() - ctx.job.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                latencies.lock().expect("latencies").push(ms);
            }
            futures_util::future::Either::Right(async move {
                if !job_sleep.is_zero() {
                    tokio::time::sleep(job_sleep).await;
                }
                Ok::<_, HandlerError>(serde_json::Value::Null)
            })
        }
    };
    let service = Builder::new(bench_config).api(false).handler(QUEUE, handler).start().await?;
    // Idle first (its start-up sweep found nothing), as a service that jobs arrive at.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = pool.get().await?;
    let committed = db::queries::job_insert_series(&*c, QUEUE, n).await?;
    // Once a tenth has started, so that most of the backlog is still ahead of it.
    while count.load(Ordering::Relaxed) < (n as u64 / 10).max(1) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let urgent = NewJob { priority: -1000, ..NewJob::new(serde_json::json!({"urgent": true})).queue(QUEUE) };
    let urgent_at = Instant::now();
    db::queries::job_insert(&c, &urgent).await?;
    let urgent_ms = urgent_rx.await.map(|t| (t - urgent_at).as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
    all_started.notified().await;
    // Wait until the last outcome is recorded, not merely run. The instance says when it holds nothing
    // more, so the database is asked only then: a count every 5 ms during the drain's last batches
    // cost the server 1.5-3 ms of CPU each time, beside the statements being measured.
    until_none(Duration::from_millis(1), "held", || async { Ok(service.held() as i64) }).await?;
    until_none(Duration::from_millis(5), "unfinished", || async { Ok(db::queries::job_count_unfinished(&*c).await?) })
        .await?;
    let elapsed = db::queries::bench_drain_time(&*c, QUEUE, committed).await?;
    let rate = n as f64 / elapsed.as_secs_f64();
    let kind = if job_sleep.is_zero() { "no-op".to_string() } else { format!("{} sleeping", args.job_sleep) };
    println!(
        "throughput: {n} {kind} jobs drained in {:.2}s = {rate:.0} jobs/s (concurrency {concurrency})",
        elapsed.as_secs_f64()
    );
    println!("priority: a priority -1000 job inserted behind the remaining backlog started {urgent_ms:.1} ms after its insert was sent");
    info!(log, "bench throughput"; "jobs" => n, "seconds" => elapsed.as_secs_f64(), "jobs_per_sec" => rate);

    // Phase 2: latency under a steady trickle of single inserts.
    measuring.store(true, Ordering::Relaxed);
    let latency_since = chrono::Utc::now();
    let total = (args.rate as f64 * latency_for.as_secs_f64()) as u64;
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let t0 = tokio::time::Instant::now();
    let mut inserts = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(t0 + gap * i as u32).await;
        let pool = pool.clone();
        inserts.spawn(async move {
            if let Ok(c) = pool.get().await {
                let _ = db::queries::job_insert(&c, &NewJob::new(serde_json::json!({"i": i})).queue(QUEUE)).await;
            }
        });
        while inserts.try_join_next().is_some() {}
    }
    while inserts.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(30);
    while (latencies.lock().expect("latencies").len() as u64) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last outcomes are recorded a moment after their handlers started.
    let (mut finished, mut tries) = ((f64::NAN, f64::NAN), 0);
    while tries < 100 {
        if db::queries::job_count_unfinished(&*c).await? == 0 {
            finished = db::queries::bench_finish_latency(&*c, QUEUE, latency_since).await?;
            break;
        }
        tries += 1;
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
    println!("latency: insert-to-finished ms (database clocks): p50 {:.2}, p99 {:.2}", finished.0, finished.1);
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
