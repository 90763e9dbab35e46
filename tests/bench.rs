//! `jobqueue bench` as a user runs it: a real process against a scratch database it creates and drops.
//! Nothing here is timed; the test checks that the benchmark completes and reports every figure.

mod common;

use std::process::{Command, Stdio};

use common::TestDb;

/// The number after `label` in `text` (e.g. `= 1234 jobs/s`), if any.
fn number_after(text: &str, label: &str) -> Option<f64> {
    let rest = &text[text.find(label)? + label.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).find(|s| !s.is_empty())?.parse().ok()
}

#[tokio::test]
async fn bench_drains_its_backlog_reports_every_figure_and_drops_its_database() {
    let db = TestDb::new().await;
    let scratch = format!("jq_bench_{}", uuid::Uuid::new_v4().simple());
    let out = tokio::task::spawn_blocking({
        let (env, scratch) = (db.env(), scratch.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_jobqueue"))
                .args(["bench", "--jobs", "500", "--rate", "100", "--latency-for", "500ms", "--database", &scratch])
                .envs(env)
                .env("LOG_LEVEL", "warn")
                .stdin(Stdio::null())
                .output()
                .expect("run jobqueue bench")
        }
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");

    let rate = number_after(&stdout, "throughput: 500 no-op jobs drained in").and(number_after(&stdout, "s = "));
    assert!(rate.is_some_and(|r| r > 0.0), "no drain rate in:\n{stdout}");
    assert!(number_after(&stdout, "started").is_some_and(|ms| ms >= 0.0), "no priority figure in:\n{stdout}");
    // 100 a second for half a second: 50 single inserts, each measured.
    assert!(stdout.contains("latency: 50 jobs at 100/s"), "{stdout}");
    assert!(
        number_after(&stdout, "insert-to-finished ms (database clocks): p50").is_some_and(|ms| ms > 0.0),
        "{stdout}"
    );

    let admin = common::connect(&db.url).await;
    let left: i64 =
        admin.query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&scratch]).await.unwrap().get(0);
    assert_eq!(left, 0, "the scratch database is dropped");
}
