//! What recording metrics costs per job, with the recorder the service installs: the calls one
//! in-process attempt makes (the claim's wait, which also feeds the dashboard's wait series, and the
//! attempt's outcome and handler time), and the calls one HTTP request makes.
//!
//! ```sh
//! cargo run --release --example metrics_cost
//! ```
//!
//! It prints nanoseconds per job and per request, single-threaded and with two threads recording at
//! once (the atomics then contend, as they do when the producer and the completer record together).
//! Compare with the per-job cost of a drain (about 25 µs at 40,000 jobs/s on two cores); see
//! docs/performance.md, "Metrics overhead".

use std::time::Instant;

use jobqueue::metrics;

const ROUNDS: u32 = 2_000_000;

fn per_job(rounds: u32) -> f64 {
    let start = Instant::now();
    for i in 0..rounds {
        let wait = f64::from(i % 1000) * 1e-5;
        metrics::job_claimed("default", wait);
        metrics::attempt_finished("default", "done", wait / 2.0);
    }
    start.elapsed().as_nanos() as f64 / f64::from(rounds)
}

fn claims_only(rounds: u32) -> f64 {
    let start = Instant::now();
    for i in 0..rounds {
        metrics::job_claimed("default", f64::from(i % 1000) * 1e-5);
    }
    start.elapsed().as_nanos() as f64 / f64::from(rounds)
}

fn series_only(rounds: u32) -> f64 {
    let start = Instant::now();
    let now = jobqueue::wait_series::now_secs();
    for i in 0..rounds {
        jobqueue::wait_series::global().record_at("default", f64::from(i % 1000) * 1e-5, now);
    }
    start.elapsed().as_nanos() as f64 / f64::from(rounds)
}

fn per_request(rounds: u32) -> f64 {
    let start = Instant::now();
    for i in 0..rounds {
        metrics::http_request("/jobs", 201, f64::from(i % 1000) * 1e-5);
    }
    start.elapsed().as_nanos() as f64 / f64::from(rounds)
}

fn main() {
    metrics::init();
    assert!(metrics::handle().is_some(), "the Prometheus recorder is installed");
    // Warm the registry (the first call of each label set allocates its entry).
    per_job(10_000);
    per_request(10_000);
    let best = |f: fn(u32) -> f64| (0..5).map(|_| f(ROUNDS)).fold(f64::INFINITY, f64::min);
    println!(
        "one thread:  {:>6.0} ns per job (claim + outcome), {:>6.0} ns per HTTP request",
        best(per_job),
        best(per_request)
    );
    println!(
        "of which:    {:>6.0} ns the claim (wait histogram and wait series), {:>6.0} ns the wait series alone",
        best(claims_only),
        best(series_only)
    );
    let both = std::thread::scope(|s| {
        let a = s.spawn(|| best(per_job));
        let b = s.spawn(|| best(per_job));
        (a.join().unwrap(), b.join().unwrap())
    });
    println!("two threads: {:>6.0} / {:>6.0} ns per job, recording at once", both.0, both.1);
    // The scrape still reads what was recorded.
    let text = metrics::handle().map(|h| h.render()).unwrap_or_default();
    assert!(text.contains("jobqueue_job_attempts_total"), "recorded attempts show in the scrape");
}
