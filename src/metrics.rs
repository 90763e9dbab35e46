//! Prometheus metrics: the recorder, the names and labels (kept here so that they are spelled once),
//! the scrape, and the one background task that refreshes the gauges read from the database.
//!
//! Recording is the `metrics` facade. The per-job calls go through handles registered once per queue
//! and thread (no registry lookup, no lock): about 0.4 µs a job in all (`examples/metrics_cost.rs`,
//! docs/performance.md, "Metrics overhead"); the recorder buffers histogram observations until an
//! upkeep, which [`refresh`] runs every few seconds so the buffer stays bounded. The database is never queried by a
//! scrape: `jobqueue_jobs` and `jobqueue_oldest_pending_age_seconds` come from one aggregate query
//! every [`REFRESH_INTERVAL`] by [`refresh`]. Gauges that live in memory (worker slots, pool
//! connections) are sampled at scrape time, which costs nothing and is never stale.
//!
//! A job id is never a label (unbounded cardinality); routes are templates such as `/jobs/{id}`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use slog::{warn, Logger};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::db::{queries, DbError, Pool};

/// How often the database gauges are refreshed.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(15);
/// How often buffered histogram observations are folded into their buckets: the buffer's bound, in
/// time (at 40,000 jobs/s, three observations a job, some 5 MB).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Job statuses as `jobqueue_jobs{status}` labels, in the `jobqueue_stats` view's column order.
pub const STATUSES: [&str; 5] = ["pending", "processing", "done", "failed", "cancelled"];

/// Handler time and HTTP latency: from a no-op job (well under a millisecond) to a long job.
const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Wait from run_at to claim: milliseconds when keeping up, minutes behind a backlog.
const WAIT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder on first use; every service in the process (tests start
/// several) shares it. None when another recorder was installed first by an embedding program: the
/// facade then records into that one and `/metrics` answers 503.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("jobqueue_job_duration_seconds".into()), DURATION_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("jobqueue_http_request_duration_seconds".into()),
                        DURATION_BUCKETS,
                    )
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("jobqueue_job_wait_seconds".into()), WAIT_BUCKETS))
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("jobqueue_jobs_inserted_total", "Jobs inserted through the API (duplicates not counted)");
    describe_counter!("jobqueue_job_attempts_total", "Attempts whose outcome was recorded, by outcome");
    describe_counter!("jobqueue_http_requests_total", "HTTP requests by route template and status");
    describe_counter!("jobqueue_listener_reconnects_total", "Reconnections of the LISTEN connection");
    describe_counter!("jobqueue_log_records_dropped_total", "Log records dropped because the log channel was full");
    describe_histogram!("jobqueue_job_duration_seconds", Unit::Seconds, "Handler time of one attempt");
    describe_histogram!("jobqueue_job_wait_seconds", Unit::Seconds, "Time from run_at to claim");
    describe_histogram!("jobqueue_http_request_duration_seconds", Unit::Seconds, "HTTP request latency");
    describe_gauge!("jobqueue_jobs", "Jobs by queue and status, refreshed every 15 s (less often if counting is slow)");
    describe_gauge!("jobqueue_oldest_pending_age_seconds", "Age of the oldest runnable pending job");
    describe_gauge!("jobqueue_worker_slots", "Worker slots of this instance by state");
    describe_gauge!("jobqueue_db_pool_connections", "Connections of the API and maintenance pool by state");
}

/// Installs the recorder (once per process) so that everything recorded from now on is kept.
pub fn init() {
    let _ = handle();
}

pub fn job_inserted(queue: &str, n: u64) {
    counter!("jobqueue_jobs_inserted_total", "queue" => queue.to_string()).increment(n);
}

/// One attempt's recorded outcome: done, retry, failed, cancelled, snoozed, released or lost.
pub fn attempt_finished(queue: &str, outcome: &'static str, handler_secs: f64) {
    with_handles(queue, |h| {
        let (attempts, duration) = h.outcomes.entry(outcome).or_insert_with(|| {
            let labels = [("queue", queue.to_string()), ("outcome", outcome.to_string())];
            (counter!("jobqueue_job_attempts_total", &labels), histogram!("jobqueue_job_duration_seconds", &labels))
        });
        attempts.increment(1);
        duration.record(handler_secs);
    });
}

/// One job claimed `wait_secs` after its `run_at`, by this instance's workers or a remote worker.
/// Also kept for the dashboard's wait-time chart ([`crate::wait_series`]).
pub fn job_claimed(queue: &str, wait_secs: f64) {
    with_handles(queue, |h| h.wait.record(wait_secs.max(0.0)));
    crate::wait_series::global().record_at(queue, wait_secs, crate::wait_series::now_secs());
}

/// A queue's registered metric handles. Recording through the facade's macros hashes the name and
/// labels and looks them up in the recorder's registry on every call, about 380 ns each
/// (`examples/metrics_cost.rs`), three times per job; a handle kept here goes straight to the
/// recorder's storage. Kept per thread, so that recording takes no lock: each runtime thread looks a
/// queue's handles up in the registry once.
struct QueueHandles {
    wait: metrics::Histogram,
    outcomes: std::collections::HashMap<&'static str, (metrics::Counter, metrics::Histogram)>,
}

fn with_handles(queue: &str, record: impl FnOnce(&mut QueueHandles)) {
    thread_local! {
        static HANDLES: std::cell::RefCell<std::collections::HashMap<String, QueueHandles>> = {
            // Handles made before the recorder is installed would record nowhere: install it first.
            init();
            Default::default()
        };
    }
    HANDLES.with_borrow_mut(|handles| {
        let h = match handles.get_mut(queue) {
            Some(h) => h,
            None => handles.entry(queue.to_string()).or_insert_with(|| QueueHandles {
                wait: histogram!("jobqueue_job_wait_seconds", "queue" => queue.to_string()),
                outcomes: Default::default(),
            }),
        };
        record(h)
    });
}

pub fn http_request(route: &'static str, status: u16, secs: f64) {
    counter!("jobqueue_http_requests_total", "route" => route, "status" => status.to_string()).increment(1);
    histogram!("jobqueue_http_request_duration_seconds", "route" => route).record(secs);
}

pub fn listener_reconnected() {
    counter!("jobqueue_listener_reconnects_total").increment(1);
}

/// The route template of a path, for labels: one of a fixed set, so that a client requesting random
/// paths cannot create series. Mirrors the router in `api::route`.
pub fn route_template(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["stats"] => "/stats",
        ["stats", "history"] => "/stats/history",
        ["metrics"] => "/metrics",
        ["openapi.json"] => "/openapi.json",
        ["whoami"] => "/whoami",
        ["jobs"] => "/jobs",
        ["jobs", "batch"] => "/jobs/batch",
        ["jobs", _] => "/jobs/{id}",
        ["jobs", _, "cancel"] => "/jobs/{id}/cancel",
        ["jobs", _, "retry"] => "/jobs/{id}/retry",
        ["jobs", _, "heartbeat"] => "/jobs/{id}/heartbeat",
        ["jobs", _, "complete"] => "/jobs/{id}/complete",
        ["jobs", _, "fail"] => "/jobs/{id}/fail",
        ["jobs", _, "snooze"] => "/jobs/{id}/snooze",
        ["jobs", _, "release"] => "/jobs/{id}/release",
        ["queues"] => "/queues",
        ["queues", _, "claim"] => "/queues/{queue}/claim",
        ["queues", _, "pause"] => "/queues/{queue}/pause",
        ["queues", _, "resume"] => "/queues/{queue}/resume",
        ["schedules"] => "/schedules",
        ["schedules", _] => "/schedules/{name}",
        ["schedules", _, "pause"] => "/schedules/{name}/pause",
        ["schedules", _, "resume"] => "/schedules/{name}/resume",
        ["schedules", _, "trigger"] => "/schedules/{name}/trigger",
        ["ui", ..] => "/ui",
        _ => "other",
    }
}

/// In-memory state sampled at scrape time.
pub struct Sampler {
    /// Per served queue: name, concurrency, and the semaphore whose permits are the free slots.
    pub slots: Vec<(String, usize, Arc<Semaphore>)>,
    pub pool: Pool,
}

impl Sampler {
    /// The exposition text, after sampling the in-memory gauges. None without a recorder.
    pub fn render(&self) -> Option<String> {
        let handle = handle()?;
        for (queue, concurrency, slots) in &self.slots {
            let free = slots.available_permits().min(*concurrency);
            gauge!("jobqueue_worker_slots", "queue" => queue.clone(), "state" => "free").set(free as f64);
            gauge!("jobqueue_worker_slots", "queue" => queue.clone(), "state" => "busy")
                .set((concurrency - free) as f64);
        }
        // Counted by the log drain in memory (it may drop records before the recorder exists).
        counter!("jobqueue_log_records_dropped_total").absolute(crate::logging::records_dropped());
        let state = self.pool.state();
        gauge!("jobqueue_db_pool_connections", "state" => "idle").set(state.idle_connections as f64);
        gauge!("jobqueue_db_pool_connections", "state" => "busy")
            .set((state.connections - state.idle_connections) as f64);
        // Histograms' summaries are not used; upkeep only drains what the recorder buffered.
        handle.run_upkeep();
        Some(handle.render())
    }
}

/// Refreshes `jobqueue_jobs` and `jobqueue_oldest_pending_age_seconds` from one aggregate query
/// (the `jobqueue_stats` view) every `interval`, until shutdown. A failed refresh keeps the previous
/// values and is logged; the next tick tries again. Queues that vanished from the table drop to 0.
pub async fn refresh(pool: Pool, interval: Duration, log: Logger, shutdown: CancellationToken) -> Result<(), String> {
    let mut known: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
            _ = upkeep.tick() => {
                // The recorder buffers histogram observations until upkeep folds them into buckets; a
                // scrape runs it too, but without scrapes the buffer would grow with every job.
                if let Some(h) = handle() {
                    h.run_upkeep();
                }
                continue;
            }
        }
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(interval, async {
            let client = pool.get().await.map_err(DbError::from)?;
            queries::stats(&*client).await
        })
        .await;
        tick.reset_after(next_refresh(interval, started.elapsed()));
        let stats = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(log, "could not refresh job gauges"; "err" => %e);
                continue;
            }
            Err(_) => {
                warn!(log, "could not refresh job gauges"; "err" => "timed out");
                continue;
            }
        };
        for gone in known.iter().filter(|q| !stats.iter().any(|s| &s.queue == *q)) {
            for status in STATUSES {
                gauge!("jobqueue_jobs", "queue" => gone.clone(), "status" => status).set(0.0);
            }
            gauge!("jobqueue_oldest_pending_age_seconds", "queue" => gone.clone()).set(0.0);
        }
        for s in &stats {
            let counts = [s.pending, s.processing, s.done, s.failed, s.cancelled];
            for (status, n) in STATUSES.iter().zip(counts) {
                gauge!("jobqueue_jobs", "queue" => s.queue.clone(), "status" => *status).set(n as f64);
            }
            gauge!("jobqueue_oldest_pending_age_seconds", "queue" => s.queue.clone()).set(s.oldest_pending_age_secs);
        }
        known = stats.into_iter().map(|s| s.queue).collect();
    }
}

/// How long until the next refresh of the database gauges, after one that took `cost`: `interval`,
/// or longer when the query is slow, so that it takes at most a twentieth of the time. The view counts
/// every finished job still kept, so its cost grows with the retained history (a second a call with a
/// million finished jobs on a 2-core machine), and every instance runs it.
fn next_refresh(interval: Duration, cost: Duration) -> Duration {
    interval.max(cost.saturating_mul(20))
}

/// Serves `/metrics` alone on its own listener (`METRICS_BIND`), with the API's connection bounds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sampler: Arc<Sampler>,
    log: Logger,
    shutdown: CancellationToken,
) -> Result<(), String> {
    use warp::http::{header, HeaderValue, Method};
    use warp::Filter;
    let error_log = log.clone();
    // and_then rather than map: the server takes a filter whose error type is warp's Rejection.
    let answer = move |method: Method, path: warp::path::FullPath| {
        let error = match (path.as_str().trim_end_matches('/'), method) {
            ("/metrics", Method::GET) => match sampler.render() {
                Some(text) => {
                    let mut resp = warp::reply::Response::new(text.into());
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    return resp;
                }
                None => crate::api::error::ApiError::unavailable("no metrics recorder"),
            },
            ("/metrics", _) => crate::api::error::ApiError::method_not_allowed("GET"),
            (other, _) => crate::api::error::ApiError::not_found(format!("no route for {other}: only /metrics here")),
        };
        error.into_response(&error_log)
    };
    let filter = warp::method().and(warp::path::full()).and_then(move |method, path| {
        let resp = answer(method, path);
        async move { Ok::<_, warp::Rejection>(resp) }
    });
    let limits = crate::config::HttpLimits::default();
    crate::api::server::serve(listener, filter, limits, Duration::from_secs(1), shutdown, log).await
}

#[cfg(test)]
mod tests {
    use super::{next_refresh, route_template};
    use std::time::Duration;

    #[test]
    fn a_slow_refresh_spaces_the_next_ones_out() {
        let every = Duration::from_secs(15);
        assert_eq!(next_refresh(every, Duration::from_millis(40)), every);
        assert_eq!(next_refresh(every, Duration::from_secs(1)), Duration::from_secs(20));
        assert_eq!(next_refresh(every, Duration::from_secs(15)), Duration::from_secs(300));
    }

    #[test]
    fn routes_are_templates() {
        assert_eq!(route_template("/jobs/0b6f1c8e-0000-4000-8000-000000000000"), "/jobs/{id}");
        assert_eq!(route_template("/jobs/x/cancel/"), "/jobs/{id}/cancel");
        assert_eq!(route_template("/jobs"), "/jobs");
        assert_eq!(route_template("/ui/jobs/abc"), "/ui");
        assert_eq!(route_template("/no/such/path/123"), "other");
        // Every route of the router is its own template (a schedule name is never a label).
        for (_, path) in crate::api::openapi::ROUTES {
            assert_eq!(route_template(path), *path);
        }
    }
}
