//! The command handler with real scripts written into a temporary directory: the exit-code contract,
//! the environment, and that a timeout or a cancellation kills the whole process group.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, http, TestDb};
use jobqueue::config::HandlerSpec;
use jobqueue::worker::handlers;
use jobqueue::{Builder, QueueConfig, RetryPolicy, Service};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// A temporary directory, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let dir = std::env::temp_dir().join(format!("jq-command-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// Writes a shell script. It is run as `/bin/sh <script>`: exec'ing a file this process just
    /// wrote could fail with ETXTBSY while another test thread forks.
    fn script(&self, name: &str, body: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An instance serving the queue `cmd` with `/bin/sh script`: retries after 100 ms.
async fn start(db: &TestDb, script: &str, max_attempts: i32, timeout: Option<Duration>) -> Service {
    let mut config = db.config(1);
    config.poll_interval = Duration::from_millis(200);
    let retry =
        RetryPolicy { max_attempts, backoff: Duration::from_millis(100), jitter: 0.0, ..RetryPolicy::default() };
    config.queues = vec![QueueConfig { retry, timeout, ..QueueConfig::new("cmd", 2) }];
    let spec = HandlerSpec::Command { argv: vec!["/bin/sh".into(), script.into()] };
    let handler = handlers::for_spec(&spec, &handlers::http_client().unwrap()).unwrap();
    Builder::new(config).handler("cmd", handler).start().await.expect("service starts")
}

async fn insert(c: &Client, payload: Value) -> Uuid {
    c.query_one("INSERT INTO jobs (queue, payload) VALUES ('cmd', $1) RETURNING id", &[&payload]).await.unwrap().get(0)
}

/// Waits until the job is finished; returns (status, attempts, result, error, errors).
async fn finished(c: &Client, id: Uuid) -> (String, i32, Option<Value>, Option<String>, Value) {
    eventually(Duration::from_secs(30), "job finished", || async {
        let row = c
            .query_one("SELECT status::text, attempts, result, error, errors FROM jobs WHERE id = $1", &[&id])
            .await
            .unwrap();
        let status: String = row.get(0);
        (status != "pending" && status != "processing")
            .then(|| (status, row.get(1), row.get(2), row.get(3), row.get(4)))
    })
    .await
}

/// The pid a script wrote to `file`, once it has.
async fn pid_in(file: &Path) -> i32 {
    eventually(Duration::from_secs(20), &format!("a pid in {}", file.display()), || async {
        std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok())
    })
    .await
}

/// Whether the process is gone; a zombie (killed, not yet reaped by its new parent) counts as gone.
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_gone(pid: i32, what: &str) {
    eventually(Duration::from_secs(10), &format!("{what} (pid {pid}) killed"), || async { gone(pid).then_some(()) })
        .await;
}

#[tokio::test]
async fn exit_0_is_done_with_stdout_as_the_result() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let dir = Dir::new();
    let script = dir.script(
        "ok.sh",
        r#"payload=$(cat)
printf '{"payload": %s, "id": "%s", "queue": "%s", "attempt": %s}\n' "$payload" "$JOBQUEUE_JOB_ID" "$JOBQUEUE_QUEUE" "$JOBQUEUE_ATTEMPT"
"#,
    );
    let service = start(&db, &script, 3, None).await;
    let id = insert(&c, json!({"image": "cat.png", "sizes": [64, 128]})).await;

    let (status, attempts, result, ..) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("done", 1));
    let expected = json!({"payload": {"image": "cat.png", "sizes": [64, 128]}, "id": id, "queue": "cmd", "attempt": 1});
    assert_eq!(result, Some(expected));
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn exit_75_is_retried() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let dir = Dir::new();
    let script = dir.script(
        "tempfail.sh",
        r#"cat > /dev/null
if [ "$JOBQUEUE_ATTEMPT" = 1 ]; then echo "upstream busy" >&2; exit 75; fi
echo "resized on attempt $JOBQUEUE_ATTEMPT"
"#,
    );
    let service = start(&db, &script, 3, None).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, result, _, errors) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("done", 2));
    assert_eq!(result, Some(json!("resized on attempt 2")), "text that is not JSON is kept as text");
    assert_eq!(errors[0]["error"], json!("command exited with 75: upstream busy"));
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn another_exit_code_fails_at_once_with_the_tail_of_stderr() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let dir = Dir::new();
    // More stderr than is kept: the error holds its end.
    let script = dir.script(
        "fail.sh",
        r#"i=0; while [ $i -lt 500 ]; do echo "progress line $i" >&2; i=$((i+1)); done
echo "fatal: image is corrupt" >&2
exit 1
"#,
    );
    let service = start(&db, &script, 5, None).await;
    let id = insert(&c, json!({})).await;

    let (status, attempts, result, error, _) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts, result), ("failed", 1, None));
    let error = error.unwrap();
    assert!(error.starts_with("command exited with 1: "), "{error}");
    assert!(error.ends_with("fatal: image is corrupt"), "{error}");
    assert!(!error.contains("progress line 0\n"), "only the tail is kept");
    assert!(error.len() < 2100, "{}", error.len());
    service.stop().await.expect("stops cleanly");
}

/// A command that starts a child and waits on it forever; it writes its own pid and the child's to
/// `<marker>.self` and `<marker>.child`. Returns the script and the marker.
fn hanging_script(dir: &Dir, name: &str) -> (String, PathBuf) {
    let marker = dir.path("pids");
    let body = format!("sleep 300 &\necho $! > {m}.child\necho $$ > {m}.self\nwait\n", m = marker.display());
    (dir.script(name, &body), marker)
}

#[tokio::test]
async fn a_hanging_command_and_its_children_are_killed_at_the_timeout() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let dir = Dir::new();
    let (script, marker) = hanging_script(&dir, "hang.sh");
    let service = start(&db, &script, 1, Some(Duration::from_secs(3))).await;
    let id = insert(&c, json!({})).await;

    let (shell, grandchild) =
        (pid_in(&marker.with_extension("self")).await, pid_in(&marker.with_extension("child")).await);
    assert!(!gone(shell) && !gone(grandchild), "both run until the timeout");
    let (status, attempts, _, error, _) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("failed", 1));
    assert_eq!(error.as_deref(), Some("handler timed out after 3s"));
    wait_gone(shell, "the command").await;
    wait_gone(grandchild, "the command's child").await;
    service.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_cancelled_jobs_process_is_killed() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let dir = Dir::new();
    let (script, marker) = hanging_script(&dir, "long.sh");
    let service = start(&db, &script, 3, None).await;
    let id = insert(&c, json!({})).await;
    let (shell, grandchild) =
        (pid_in(&marker.with_extension("self")).await, pid_in(&marker.with_extension("child")).await);

    let addr = service.local_addr().unwrap();
    let answer = http(addr, "POST", &format!("/jobs/{id}/cancel"), None).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let (status, attempts, ..) = finished(&c, id).await;
    assert_eq!((status.as_str(), attempts), ("cancelled", 1));
    wait_gone(shell, "the command").await;
    wait_gone(grandchild, "the command's child").await;
    service.stop().await.expect("stops cleanly");
}
