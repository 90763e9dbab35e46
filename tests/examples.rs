//! The worker examples in `examples/`, run for real against a real instance, so they never rot.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{count, wait_count, TestDb};
use jobqueue::{Builder, Config};
use serde_json::{json, Value};

/// A process in its own process group, killed with everything it started when dropped.
struct Worker {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(program: &str, script: &str, url: &str, lease_secs: u32) -> Worker {
        use std::os::unix::process::CommandExt;
        let log = std::env::temp_dir().join(format!("jq-example-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/").to_string() + script)
            .env("JOBQUEUE_URL", url)
            .env("JOBQUEUE_QUEUE", "example")
            .env("JOBQUEUE_WORKER", script)
            .env("JOBQUEUE_LEASE_SECS", lease_secs.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        Worker { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("worker output:\n{}", self.output());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn installed(program: &str) -> bool {
    Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

async fn insert(c: &tokio_postgres::Client, payload: Value, max_attempts: Option<i32>) -> uuid::Uuid {
    c.query_one(
        "INSERT INTO jobs (queue, payload, max_attempts) VALUES ('example', $1, $2) RETURNING id",
        &[&payload, &max_attempts],
    )
    .await
    .unwrap()
    .get(0)
}

async fn job(c: &tokio_postgres::Client, id: uuid::Uuid) -> Value {
    let row = c.query_one("SELECT to_jsonb(j) FROM jobs j WHERE id = $1", &[&id]).await.unwrap();
    row.get(0)
}

#[tokio::test]
async fn the_python_example_works_jobs_heartbeats_and_fails() {
    if !installed("python3") {
        eprintln!("\n!!! SKIPPED: python3 is not installed; examples/worker.py was NOT tested !!!\n");
        return;
    }
    let db = TestDb::new().await;
    let c = db.client().await;
    let service = Builder::new(Config { ..db.config(1) }).start().await.unwrap();
    let url = format!("http://{}", service.local_addr().unwrap());
    let ok = insert(&c, json!({"n": 1}), None).await;
    let bad = insert(&c, json!({"fail": "bad input"}), None).await;
    // Longer than its 2 s lease: only heartbeats keep the rescuer (every 500 ms here) away.
    let slow = insert(&c, json!({"sleep": 3}), None).await;
    let worker = Worker::start("python3", "worker.py", &url, 2);
    let finished = "SELECT count(*) FROM jobs WHERE status IN ('done', 'failed')";
    wait_count(&c, Duration::from_secs(30), "python worker finished the jobs", finished, 3).await;
    let ok = job(&c, ok).await;
    assert_eq!(
        (ok["status"].clone(), ok["result"].clone()),
        (json!("done"), json!({"echo": {"n": 1}, "worker": "worker.py"}))
    );
    let bad = job(&c, bad).await;
    assert_eq!(
        (bad["status"].clone(), bad["error"].clone(), bad["attempts"].clone()),
        (json!("failed"), json!("bad input"), json!(1))
    );
    let slow = job(&c, slow).await;
    assert_eq!(
        (slow["status"].clone(), slow["attempts"].clone(), slow["errors"].clone()),
        (json!("done"), json!(1), json!([]))
    );
    assert!(worker.output().contains("complete -> 200 done"), "{}", worker.output());
    drop(worker);
    service.stop().await.expect("stops cleanly");
}

/// The instance a Python worker talks to goes away while the worker runs a job, and comes back on the
/// same address: the worker rides it out (its `complete` is retried until the new instance answers)
/// and the result lands, within the lease, as the job's one and only attempt.
#[tokio::test]
async fn the_python_example_survives_a_restart_of_its_instance() {
    if !installed("python3") {
        eprintln!("\n!!! SKIPPED: python3 is not installed; examples/worker.py was NOT tested !!!\n");
        return;
    }
    let db = TestDb::new().await;
    let c = db.client().await;
    let first = Builder::new(db.config(1)).start().await.unwrap();
    let addr = first.local_addr().unwrap();
    let id = insert(&c, json!({"sleep": 3}), None).await;
    let worker = Worker::start("python3", "worker.py", &format!("http://{addr}"), 30);
    let claimed = "SELECT count(*) FROM jobs WHERE status = 'processing'";
    wait_count(&c, Duration::from_secs(30), "the worker claimed the job", claimed, 1).await;
    first.stop().await.expect("stops cleanly");
    // The job ends while nothing listens: the worker's complete must fail and be retried.
    common::eventually(Duration::from_secs(30), "the worker retries its complete", || async {
        worker.output().contains("/complete: ").then_some(())
    })
    .await;
    assert_eq!(count(&c, claimed).await, 1, "the job is still held while the instance is down");
    let second = Builder::new(Config { port: addr.port(), ..db.config(1) }).start().await.unwrap();
    let done = "SELECT count(*) FROM jobs WHERE status = 'done'";
    wait_count(&c, Duration::from_secs(30), "the retried complete landed", done, 1).await;
    let job = job(&c, id).await;
    assert_eq!(
        (job["attempts"].clone(), job["errors"].clone(), job["result"].clone()),
        (json!(1), json!([]), json!({"echo": {"sleep": 3}, "worker": "worker.py"}))
    );
    // The row is written before the answer reaches the worker, which prints it after.
    common::eventually(Duration::from_secs(30), "the worker got the 200 of its retried complete", || async {
        worker.output().contains("complete -> 200 done").then_some(())
    })
    .await;
    drop(worker);
    second.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn the_shell_example_works_jobs_and_fails() {
    if !installed("jq") || !installed("curl") {
        eprintln!("\n!!! SKIPPED: jq or curl is not installed; examples/worker.sh was NOT tested !!!\n");
        return;
    }
    let db = TestDb::new().await;
    let c = db.client().await;
    let service = Builder::new(db.config(1)).start().await.unwrap();
    let url = format!("http://{}", service.local_addr().unwrap());
    let ok = insert(&c, json!({"n": 2}), None).await;
    let bad = insert(&c, json!({"fail": "no such file"}), Some(1)).await;
    let worker = Worker::start("bash", "worker.sh", &url, 30);
    let finished = "SELECT count(*) FROM jobs WHERE status IN ('done', 'failed')";
    wait_count(&c, Duration::from_secs(30), "shell worker finished the jobs", finished, 2).await;
    let ok = job(&c, ok).await;
    assert_eq!(
        (ok["status"].clone(), ok["result"].clone()),
        (json!("done"), json!({"echo": {"n": 2}, "worker": "worker.sh"}))
    );
    let bad = job(&c, bad).await;
    assert_eq!((bad["status"].clone(), bad["error"].clone()), (json!("failed"), json!("no such file")));
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'processing'").await, 0);
    drop(worker);
    service.stop().await.expect("stops cleanly");
}
