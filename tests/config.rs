//! The config file through the real binary: bad files stop it with exit code 2 and a message naming
//! the file, queue and key; the example file starts it; and `jobqueue serve` runs each queue's
//! handler kind end to end.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::hook_server::HookServer;
use common::{eventually, Proc, TestDb};
use serde_json::{json, Value};
use uuid::Uuid;

/// A file in a temporary directory of its own, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("jq-config-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// An environment in which nothing but the file can configure queues, and nothing can be reached: a
/// file that is accepted by mistake makes the binary fail differently (not with 2) or run (and time
/// out), both of which fail the test.
fn isolated_env() -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), "postgres://nobody@127.0.0.1:1/none".into()),
        ("PORT".into(), "0".into()),
        ("LOG_FORMAT".into(), "json".into()),
    ]
}

#[tokio::test]
async fn each_kind_of_bad_file_exits_2_naming_the_key() {
    let webhook = "[queues.email]\nhandler = \"webhook\"\n";
    let cases = [
        ("unknown key", "[queues.email]\nconcurency = 3\n".to_string(), "[queues.email] unknown key \"concurency\""),
        ("unknown top-level key", "prot = 8080\n".to_string(), "unknown key \"prot\""),
        (
            "bad URL",
            format!("{webhook}url = \"mailer.internal/jobs\"\nsecret = \"s\"\n"),
            "[queues.email] url: expected an absolute http or https URL, got \"mailer.internal/jobs\"",
        ),
        (
            "missing secret",
            format!("{webhook}url = \"https://mailer.internal/jobs\"\n"),
            "[queues.email] secret: required",
        ),
        (
            "wrong type",
            "[queues.email]\nconcurrency = \"32\"\n".to_string(),
            "[queues.email] concurrency: expected a whole number from 1 to 10000, got the string \"32\"",
        ),
        (
            "bad command",
            "[queues.thumbs]\nhandler = \"command\"\ncommand = \"./bin/resize --quality 80\"\n".to_string(),
            "[queues.thumbs] command: expected an array of strings",
        ),
        (
            "bad top-level value",
            "job_lease = \"forever\"\n".to_string(),
            "job_lease: expected a duration such as 500ms, 30s, 5m or 2h, at least 500ms, got \"forever\"",
        ),
        ("not TOML", "[queues.email\n".to_string(), "TOML parse error at line 1"),
    ];
    for (what, text, want) in cases {
        let file = TempFile::new("jobqueue.toml", &text);
        let mut proc = Proc::jobqueue("bad-config", &["--config", file.path()], &isolated_env());
        let code = proc.wait(Duration::from_secs(30)).await;
        let stderr = proc.stderr();
        assert_eq!(code, Some(2), "{what}: {stderr}");
        let prefix = format!("jobqueue: config file {}: ", file.path());
        assert!(stderr.starts_with(&prefix), "{what}: {stderr:?} does not start with {prefix:?}");
        assert!(stderr.contains(want), "{what}: {stderr:?} does not contain {want:?}");
    }

    // The environment variable names the file as well as the flag does; a missing file is an error.
    let env: Vec<_> =
        isolated_env().into_iter().chain([("JOBQUEUE_CONFIG".into(), "/nonexistent/jq.toml".into())]).collect();
    let mut proc = Proc::jobqueue("missing-config", &[], &env);
    assert_eq!(proc.wait(Duration::from_secs(30)).await, Some(2));
    assert!(
        proc.stderr().starts_with("jobqueue: config file /nonexistent/jq.toml: cannot read it"),
        "{}",
        proc.stderr()
    );
}

/// Waits for the instance's log to say it started, and returns the log.
async fn wait_started(proc: &Proc) -> String {
    eventually(Duration::from_secs(60), "the instance logs that it started", || async {
        let log = proc.stderr();
        log.contains("jobqueue started").then_some(log)
    })
    .await
}

#[tokio::test]
async fn the_example_file_starts_the_service() {
    let db = TestDb::new().await;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/jobqueue.toml");
    let env: Vec<_> = db
        .env()
        .into_iter()
        .chain([("JOBQUEUE_CONFIG".to_string(), example.to_string()), ("RUNTIME_THREADS".into(), "3".into())])
        .collect();
    let mut proc = Proc::jobqueue("example-config", &[], &env);
    let log = wait_started(&proc).await;
    let runtime = log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|l| l["msg"] == "runtime");
    assert_eq!(runtime.map(|l| l["threads"].clone()), Some(serde_json::json!(3)), "{log}");
    let handlers: Vec<(String, String)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["msg"] == "queue handler")
        .map(|l| (l["queue"].as_str().unwrap().to_string(), l["handler"].as_str().unwrap().to_string()))
        .collect();
    let want = [("default", "builtin"), ("email", "webhook"), ("thumbnails", "command")];
    assert_eq!(handlers, want.map(|(q, h)| (q.to_string(), h.to_string())));
    assert!(!log.contains("change-me"), "the secret is never logged");
    proc.signal("TERM");
    assert_eq!(proc.wait(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn serve_runs_each_queues_handler_kind() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let hook = HookServer::start(vec![]).await;
    let script = TempFile::new("upper.sh", "tr a-z A-Z\n");
    let file = TempFile::new(
        "jobqueue.toml",
        &format!(
            r#"poll_interval = "200ms"
[queues.default]
concurrency = 2
[queues.hooks]
handler = "webhook"
url = "{url}"
secret_env = "JQ_TEST_HOOK_SECRET"
[queues.cmd]
handler = "command"
command = ["/bin/sh", "{script}"]
"#,
            url = hook.url("/deliver"),
            script = script.path()
        ),
    );
    let env: Vec<_> = db.env().into_iter().chain([("JQ_TEST_HOOK_SECRET".to_string(), "s3cret".to_string())]).collect();
    let proc = Proc::jobqueue("serve-config", &["--config", file.path()], &env);
    wait_started(&proc).await;

    let mut ids = Vec::new();
    for (queue, payload) in [("default", json!(1)), ("hooks", json!({"to": "a"})), ("cmd", json!("shout"))] {
        let sql = "INSERT INTO jobs (queue, payload) VALUES ($1, $2) RETURNING id";
        ids.push(c.query_one(sql, &[&queue, &payload]).await.unwrap().get::<_, Uuid>(0));
    }
    let results = eventually(Duration::from_secs(30), "all three jobs done", || async {
        let rows = c
            .query(
                "SELECT result FROM jobs WHERE id = ANY($1) AND status = 'done' ORDER BY array_position($1, id)",
                &[&ids],
            )
            .await
            .unwrap();
        (rows.len() == 3).then(|| rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>())
    })
    .await;
    assert_eq!(results, [json!("Job processed successfully"), json!({"ok": true}), json!("SHOUT")]);
    let got = hook.received();
    assert_eq!((got.len(), got[0].path.as_str()), (1, "/deliver"));
    assert!(got[0].header("Jobqueue-Signature").is_some_and(|s| s.starts_with("t=")));
}

/// The `drill` handler (for fault drills) panics on the attempts the payload asks for: each panic ends
/// its attempt as a retryable error, the job is retried, and the real process keeps serving.
#[tokio::test]
async fn the_drill_handler_panics_on_demand_and_the_instance_lives_on() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let file = TempFile::new(
        "jobqueue.toml",
        "poll_interval = \"200ms\"\n[queues.drill]\nhandler = \"drill\"\nmax_attempts = 3\nbackoff = \"10ms\"\nbackoff_max = \"10ms\"\n",
    );
    let env: Vec<_> = db.env().into_iter().chain([("INSTANCE_ID".to_string(), "drill-1".to_string())]).collect();
    let mut proc = Proc::jobqueue("drill", &["--config", file.path(), "serve"], &env);
    let addr = proc.api_addr().await;
    let mut ids = Vec::new();
    for panics in [0, 2, 5] {
        let sql = "INSERT INTO jobs (queue, payload) VALUES ('drill', $1) RETURNING id";
        ids.push(c.query_one(sql, &[&json!({ "panic_attempts": panics })]).await.unwrap().get::<_, Uuid>(0));
    }
    let finished = "SELECT count(*) FROM jobs WHERE status IN ('done', 'failed')";
    common::wait_count(&c, Duration::from_secs(30), "the drill jobs finished", finished, 3).await;
    let rows = c
        .query(
            "SELECT status, attempts, result, errors FROM jobs WHERE id = ANY($1) ORDER BY array_position($1, id)",
            &[&ids],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32, Option<Value>, Value)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    // The result names the job, the attempt that ran and the holder (the process's INSTANCE_ID).
    let result = |id: Uuid, attempt: i32| Some(json!({ "job": id, "attempt": attempt, "instance": "drill-1" }));
    assert_eq!((got[0].0.as_str(), got[0].1, got[0].2.clone()), ("done", 1, result(ids[0], 1)));
    assert_eq!((got[1].0.as_str(), got[1].1, got[1].2.clone()), ("done", 3, result(ids[1], 3)));
    assert_eq!((got[2].0.as_str(), got[2].1, got[2].2.clone()), ("failed", 3, None));
    for (errors, n) in [(&got[1].3, 2), (&got[2].3, 3)] {
        let errors = errors.as_array().unwrap();
        assert_eq!(errors.len(), n, "{errors:?}");
        for e in errors {
            let text = e["error"].as_str().unwrap();
            assert!(text.starts_with("handler panicked") && text.contains("panic_attempts"), "{text}");
        }
    }
    // Five panics later the process still serves and still runs.
    assert_eq!(common::http(addr, "GET", "/healthz", None).await.status, 200);
    assert!(proc.child.try_wait().unwrap().is_none(), "the instance is still running");
    proc.signal("TERM");
    assert_eq!(proc.wait(Duration::from_secs(30)).await, Some(0));
}
