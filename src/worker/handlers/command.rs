//! The `command` handler: runs a program from the server's config file for each job.
//!
//! Contract: the argv runs without a shell, the payload as JSON on stdin, `JOBQUEUE_JOB_ID`,
//! `JOBQUEUE_QUEUE` and `JOBQUEUE_ATTEMPT` in its environment. Exit 0 is done with stdout as the
//! result (JSON if it parses, else text; at most 1 MiB); exit 75 (EX_TEMPFAIL) is a retry; anything
//! else fails the job with the tail of stderr.
//!
//! The command runs in a process group of its own. Timeout, cancellation, shutdown and the end of the
//! command all kill the whole group, so a shell script's children do not outlive their job: the
//! executor drops this handler's future on a timeout, and a guard's `Drop` does the killing.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::worker::handler::{Handler, HandlerError, HandlerFuture, HandlerResult, JobContext};

/// The exit code that asks for a retry (sysexits.h's EX_TEMPFAIL).
pub const EX_TEMPFAIL: i32 = 75;
/// Largest stdout kept as the result; the rest is read and dropped so the command never blocks on it.
pub const STDOUT_MAX: usize = 1 << 20;
/// How much of the end of stderr is kept for the job's error.
pub const STDERR_TAIL: usize = 2000;

pub struct CommandHandler {
    argv: Arc<[String]>,
}

impl CommandHandler {
    /// `argv` holds at least the program, checked when the configuration was read.
    pub fn new(argv: Vec<String>) -> CommandHandler {
        CommandHandler { argv: argv.into() }
    }
}

impl Handler for CommandHandler {
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        let argv = self.argv.clone();
        Box::pin(async move {
            let cancel = ctx.cancel_token();
            tokio::select! {
                result = run(&argv, &ctx) => result,
                // The group guard inside `run` kills the command as its future is dropped here.
                _ = cancel.cancelled() => Err(HandlerError::fail("cancelled")),
            }
        })
    }
}

/// The process groups of the commands running in this process, for [`kill_running`].
static RUNNING: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Kills the process group of every command still running, and returns how many there were. For an
/// exit that skips destructors (`std::process::exit` on a second signal): commands run in process
/// groups of their own, so neither a terminal's signal nor this process's end reaches them, and
/// without this they would run on while their jobs run again elsewhere once the leases expire.
pub fn kill_running() -> usize {
    let groups = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for &pgid in &groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    groups.len()
}

/// Kills its process group when dropped.
struct GroupGuard(Pid);

impl GroupGuard {
    fn new(pgid: Pid) -> GroupGuard {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).insert(pgid.as_raw());
        GroupGuard(pgid)
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0.as_raw());
        // ESRCH (the group is gone) is the normal case after a clean exit.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

async fn run(argv: &[String], ctx: &JobContext) -> HandlerResult {
    let job = &ctx.job;
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env("JOBQUEUE_JOB_ID", job.id.to_string())
        .env("JOBQUEUE_QUEUE", &job.queue)
        .env("JOBQUEUE_ATTEMPT", job.attempts.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // A program that cannot start now (missing while being deployed, out of processes) may start
    // later; the attempts bound how long that is tried.
    let mut child = command.spawn().map_err(|e| HandlerError::retry(format!("cannot start {:?}: {e}", argv[0])))?;
    let _group = child.id().map(|pid| GroupGuard::new(Pid::from_raw(pid as i32)));
    let payload = serde_json::to_vec(&job.payload).map_err(|e| HandlerError::fail(format!("cannot encode: {e}")))?;
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that exits without reading its input closes the pipe; that is its business.
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        }
    };
    let (_, (out, complete), err, status) =
        tokio::join!(feed, read_bounded(stdout, STDOUT_MAX), read_tail(stderr, STDERR_TAIL), child.wait());
    let status = status.map_err(|e| HandlerError::retry(format!("cannot wait for {:?}: {e}", argv[0])))?;
    let stderr = String::from_utf8_lossy(&err);
    let with_stderr = |head: String| match stderr.trim() {
        "" => head,
        tail => format!("{head}: {tail}"),
    };
    match status.code() {
        Some(0) => Ok(result_of(&out, complete)),
        Some(EX_TEMPFAIL) => Err(HandlerError::retry(with_stderr(format!("command exited with {EX_TEMPFAIL}")))),
        Some(code) => Err(HandlerError::fail(with_stderr(format!("command exited with {code}")))),
        None => Err(HandlerError::fail(with_stderr(format!(
            "command killed by signal {}",
            status.signal().unwrap_or_default()
        )))),
    }
}

/// Stdout as the job's result: JSON if it parses, else text without trailing whitespace; `null` when
/// empty. Output over the cap is kept as text, cut at the cap.
fn result_of(out: &[u8], complete: bool) -> Value {
    if out.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    if complete {
        if let Ok(v) = serde_json::from_slice(out) {
            return v;
        }
    }
    Value::String(String::from_utf8_lossy(out).trim_end().to_string())
}

/// Up to `max` bytes of `reader`, then drains the rest; `false` if there was more.
async fn read_bounded(reader: Option<impl AsyncRead + Unpin>, max: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut complete = true;
    let Some(mut reader) = reader else { return (kept, complete) };
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = max.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        complete &= n <= room;
    }
    (kept, complete)
}

/// The last `max` bytes of `reader`.
async fn read_tail(reader: Option<impl AsyncRead + Unpin>, max: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut reader) = reader else { return tail };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * max {
            tail.drain(..tail.len() - max);
        }
    }
    if tail.len() > max {
        tail.drain(..tail.len() - max);
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, JobStatus};
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    fn job() -> Job {
        let now = chrono::Utc::now();
        Job {
            id: uuid::Uuid::new_v4(),
            queue: "cmd".into(),
            payload: json!({}),
            status: JobStatus::Processing,
            result: None,
            error: None,
            errors: json!([]),
            priority: 0,
            run_at: now,
            attempts: 1,
            max_attempts: Some(1),
            unique_key: None,
            locked_by: None,
            locked_until: None,
            cancel_requested_at: None,
            created_at: now,
            updated_at: now,
            started_at: Some(now),
            finished_at: None,
        }
    }

    #[tokio::test]
    async fn kill_running_stops_every_command() {
        let pid_file = std::env::temp_dir().join(format!("jq-kill-running-{}", uuid::Uuid::new_v4().simple()));
        let script = format!("echo $$ > {}; exec sleep 300", pid_file.display());
        let handler = CommandHandler::new(vec!["/bin/sh".into(), "-c".into(), script]);
        let task = tokio::spawn(handler.handle(JobContext::new(job(), CancellationToken::new())));
        let mut pid = None;
        for _ in 0..500 {
            pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok());
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let pid = pid.expect("the command starts and writes its pid");
        assert!(kill_running() >= 1);
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), task).await.unwrap().unwrap();
        assert_eq!(result, Err(HandlerError::fail("command killed by signal 9")));
        assert!(!RUNNING.lock().unwrap().contains(&pid), "the finished command is no longer listed");
        let _ = std::fs::remove_file(&pid_file);
    }

    #[test]
    fn stdout_becomes_the_result() {
        assert_eq!(result_of(b"{\"w\": 3}\n", true), json!({"w": 3}));
        assert_eq!(result_of(b"resized\n", true), json!("resized"));
        assert_eq!(result_of(b"\n", true), Value::Null);
        assert_eq!(result_of(b"[1, 2", false), json!("[1, 2"));
    }

    #[tokio::test]
    async fn reading_is_bounded() {
        let big = vec![b'a'; 3000];
        let (kept, complete) = read_bounded(Some(&big[..]), 1000).await;
        assert_eq!((kept.len(), complete), (1000, false));
        let (kept, complete) = read_bounded(Some(&big[..]), 3000).await;
        assert_eq!((kept.len(), complete), (3000, true));
        let mut text = vec![b'x'; 5000];
        text.extend_from_slice(b"the end");
        let tail = read_tail(Some(&text[..]), 100).await;
        assert_eq!(tail.len(), 100);
        assert!(tail.ends_with(b"the end"));
    }
}
