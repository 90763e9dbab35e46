//! `/metrics` scraped from a running instance and parsed as Prometheus text: counters, histograms
//! and the database gauges carry the values of what happened, with route templates and no job ids.

mod common;

use std::time::Duration;

use common::{eventually, http, TestDb};
use jobqueue::{HandlerError, JobContext};
use prometheus_parse::{Sample, Scrape, Value as PValue};
use serde_json::Value;

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matches = |s: &&Sample| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
    scrape.samples.iter().find(matches).map(|s| match &s.value {
        PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => *v,
        PValue::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        PValue::Summary(_) => f64::NAN,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_what_happened() {
    let db = TestDb::new().await;
    let mut config = db.config(4);
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    // Payload "fail" fails permanently; anything else succeeds.
    let handler = |ctx: JobContext| async move {
        match ctx.job.payload.as_str() {
            Some("fail") => Err(HandlerError::fail("asked to fail")),
            _ => Ok::<_, HandlerError>(Value::Null),
        }
    };
    let service = common::start_with(config, handler).await;
    let addr = service.local_addr().unwrap();
    let mut ids = Vec::new();
    for payload in [r#"{"payload": 1}"#, r#"{"payload": 2}"#, r#"{"payload": "fail", "max_attempts": 1}"#] {
        let r = http(addr, "POST", "/jobs", Some(payload)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let r = http(addr, "GET", &format!("/jobs/{}", ids[0]), None).await;
    assert_eq!(r.status, 200);

    // Attempts are counted once the completer has written them; the job gauges once the refresher
    // has run after that (every 15 s).
    let scrape = eventually(Duration::from_secs(40), "attempts and job gauges in /metrics", || async {
        let r = http(addr, "GET", "/metrics", None).await;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/plain"));
        let s = parse(&r.body);
        let done = value(&s, "jobqueue_job_attempts_total", &[("queue", "default"), ("outcome", "done")]);
        let failed = value(&s, "jobqueue_jobs", &[("queue", "default"), ("status", "failed")]);
        (done == Some(2.0) && failed == Some(1.0)).then_some(s)
    })
    .await;
    let v = |name: &str, labels: &[(&str, &str)]| value(&scrape, name, labels);
    assert_eq!(v("jobqueue_job_attempts_total", &[("queue", "default"), ("outcome", "failed")]), Some(1.0));
    assert_eq!(v("jobqueue_job_attempts_total", &[("queue", "default"), ("outcome", "retry")]), None);
    assert_eq!(v("jobqueue_jobs_inserted_total", &[("queue", "default")]), Some(3.0));
    assert_eq!(v("jobqueue_jobs", &[("queue", "default"), ("status", "done")]), Some(2.0));
    assert_eq!(v("jobqueue_jobs", &[("queue", "default"), ("status", "pending")]), Some(0.0));
    assert_eq!(v("jobqueue_oldest_pending_age_seconds", &[("queue", "default")]), Some(0.0));
    assert_eq!(v("jobqueue_http_requests_total", &[("route", "/jobs"), ("status", "201")]), Some(3.0));
    // prometheus-parse skips lines whose label values contain braces (Prometheus itself reads them),
    // so the route template's sample is checked on the text.
    let raw = http(addr, "GET", "/metrics", None).await.body;
    let line = raw.lines().find(|l| {
        l.starts_with("jobqueue_http_requests_total{")
            && l.contains(r#"route="/jobs/{id}""#)
            && l.contains(r#"status="200""#)
    });
    assert_eq!(line.and_then(|l| l.rsplit(' ').next()), Some("1"), "{raw}");
    // Histograms: every observation lands in the +Inf bucket.
    assert_eq!(v("jobqueue_job_wait_seconds", &[("queue", "default")]), Some(3.0));
    assert_eq!(v("jobqueue_job_duration_seconds", &[("queue", "default"), ("outcome", "done")]), Some(2.0));
    // Nothing runs now: all 4 slots free.
    assert_eq!(v("jobqueue_worker_slots", &[("queue", "default"), ("state", "free")]), Some(4.0));
    assert_eq!(v("jobqueue_worker_slots", &[("queue", "default"), ("state", "busy")]), Some(0.0));
    assert!(v("jobqueue_db_pool_connections", &[("state", "idle")]).is_some());
    // Exported from the first scrape on; this test's logger drops nothing.
    assert_eq!(v("jobqueue_log_records_dropped_total", &[]), Some(0.0));
    // No job id in any label.
    for s in &scrape.samples {
        for id in &ids {
            assert!(!s.labels.values().any(|l| l.contains(id.as_str())), "job id in labels of {}", s.metric);
        }
    }

    // METRICS_BIND serves the same exposition, and nothing else.
    let maddr = service.metrics_addr().expect("metrics listener");
    let r = http(maddr, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    let separate = parse(&r.body);
    assert_eq!(
        value(&separate, "jobqueue_job_attempts_total", &[("queue", "default"), ("outcome", "done")]),
        Some(2.0)
    );
    assert_eq!(http(maddr, "GET", "/jobs", None).await.status, 404);
    assert_eq!(http(maddr, "POST", "/metrics", None).await.status, 405);
    service.stop().await.unwrap();
}
