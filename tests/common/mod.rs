//! Test harness: a real PostgreSQL, a migrated template database built once per run, and a fresh
//! database cloned from it for every test, so tests run in parallel and their LISTEN/NOTIFY traffic
//! never meets.
//!
//! Also: starting instances in-process (through the library's `Builder`) or as real processes, a tiny
//! HTTP client for those, and `eventually`, which waits for a condition with a deadline.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod hook_server;

use jobqueue::config::Config;
use jobqueue::{Builder, HandlerError, JobContext, QueueConfig, Service};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};

pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| jobqueue::config::DEFAULT_DATABASE_URL.to_string())
}

fn url_for(db: &str) -> String {
    let mut cfg = tokio_postgres::Config::from_str(&server_url()).expect("DATABASE_URL parses");
    cfg.dbname(db);
    // Rebuild a URL: the harness only needs host, port and user.
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let password = cfg.get_password().map(|p| format!(":{}", String::from_utf8_lossy(p))).unwrap_or_default();
    format!("postgres://{user}{password}@{host}:{port}/{db}")
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| {
        panic!("cannot connect to {url}: {e:?}. Run the tests with scripts/test.sh, which starts PostgreSQL")
    });
    tokio::spawn(conn);
    client
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// The migrated template's name: a hash of the migrations, so that a changed migration gets a new
/// template (and checkouts with different migrations sharing one server each get their own).
async fn template() -> String {
    TEMPLATE
        .get_or_init(|| async {
            let mut hasher = DefaultHasher::new();
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/db/migrations");
            let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                f.file_name().hash(&mut hasher);
                std::fs::read(&f).unwrap().hash(&mut hasher);
            }
            let name = format!("jq_template_{:016x}", hasher.finish());
            build_template(&name).await;
            name
        })
        .await
        .clone()
}

/// Builds the template unless it exists; concurrent test binaries serialise on an advisory lock.
async fn build_template(name: &str) {
    let admin = connect(&url_for("postgres")).await;
    admin.execute("SELECT pg_advisory_lock(424242)", &[]).await.unwrap();
    let exists = admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await.unwrap();
    if exists.is_none() {
        let building = format!("{name}_building");
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {building}")).await.unwrap();
        let config = Config { database_url: url_for(&building), ..Config::default() };
        jobqueue::service::migrate(&config, &jobqueue::logging::discard()).await.expect("migrate template");
        // The migration's connection closes in the background; rename once it has gone.
        let sessions = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{building}'");
        eventually(Duration::from_secs(10), "migration connection closed", || async {
            (count(&admin, &sessions).await == 0).then_some(())
        })
        .await;
        admin.batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}")).await.unwrap();
    }
    admin.execute("SELECT pg_advisory_unlock(424242)", &[]).await.unwrap();
}

/// A database of the test's own, dropped when the value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let template = template().await;
        let name = format!("jq_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&url_for("postgres")).await;
        let mut tries = 0;
        loop {
            match admin.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}")).await {
                Ok(()) => break,
                // "source database is being accessed by other users": a template copy in flight.
                Err(e) if tries < 50 && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Someone dropped the template (a checkout of another version cleaning up): rebuild it.
                Err(e) if tries < 50 && e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {
                    tries += 1;
                    build_template(&template).await;
                }
                Err(e) => panic!("cannot create test database: {e:?}"),
            }
        }
        TestDb { url: url_for(&name), name }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A configuration for an instance on this database: API on a free port, small pool, quick
    /// maintenance, default queue with `workers` slots.
    pub fn config(&self, workers: usize) -> Config {
        Config {
            database_url: self.url.clone(),
            bind: "127.0.0.1".parse().unwrap(),
            port: 0,
            queues: vec![QueueConfig::new("default", workers)],
            db_pool_size: 4,
            maintenance_interval: Duration::from_millis(500),
            ..Config::default()
        }
    }

    /// Environment for a real process on this database.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.url.clone()),
            ("PORT".into(), "0".into()),
            ("BIND".into(), "127.0.0.1".into()),
            ("DB_POOL_SIZE".into(), "3".into()),
            ("LOG_FORMAT".into(), "json".into()),
        ]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee; use a private one on a private thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                if let Ok((c, conn)) = tokio_postgres::connect(&url_for("postgres"), NoTls).await {
                    tokio::spawn(conn);
                    let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            })
        })
        .join();
    }
}

/// Waits until `check` returns `Some`, polling every 20 ms, and panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until the count `sql` returns equals `expected`.
pub async fn wait_count(client: &Client, within: Duration, what: &str, sql: &str, expected: i64) {
    let mut last = -1;
    let ok = tokio::time::timeout(within, async {
        loop {
            last = count(client, sql).await;
            if last == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out after {within:?} waiting for: {what} (count {last}, want {expected})");
}

/// Starts an in-process instance with the given handler on the default queue.
pub async fn start_with<H: jobqueue::Handler>(config: Config, handler: H) -> Service {
    Builder::new(config).handler("default", handler).start().await.expect("service starts")
}

pub fn noop() -> impl jobqueue::Handler {
    |_ctx: JobContext| async { Ok::<_, HandlerError>(Value::String("ok".into())) }
}

// -------------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client for real (in-process or child) servers.
// -------------------------------------------------------------------------------------------------

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    http_with(addr, method, path, body, &[]).await
}

/// [`http`] with extra request headers (`Authorization`, say).
pub async fn http_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to API");
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response has a head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    HttpResponse { status, headers, body: body.to_string() }
}

// -------------------------------------------------------------------------------------------------
// Real processes.
// -------------------------------------------------------------------------------------------------

/// A child process, killed (SIGKILL) when dropped unless it has exited.
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// Where the process's stderr (its log) goes; a file, so a chatty process never blocks on a pipe.
    pub log: std::path::PathBuf,
}

fn log_file(name: &str) -> (std::path::PathBuf, Stdio) {
    let path = std::env::temp_dir().join(format!("jq-{name}-{}.log", uuid::Uuid::new_v4().simple()));
    let file = std::fs::File::create(&path).expect("create log file");
    (path, Stdio::from(file))
}

impl Proc {
    /// The real `jobqueue` binary with `args` and `env`.
    pub fn jobqueue(name: &str, args: &[&str], env: &[(String, String)]) -> Proc {
        let (log, stderr) = log_file(name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobqueue"));
        cmd.args(args).envs(env.iter().cloned()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        Proc { child: cmd.spawn().expect("spawn jobqueue"), name: name.to_string(), log }
    }

    /// This test binary re-run as a service instance whose handler records executions (see
    /// [`child_main`]). The calling test file must define the `#[ignore]` test `child_instance` that
    /// calls [`child_main`].
    pub fn instance(name: &str, env: &[(String, String)]) -> Proc {
        let (log, stderr) = log_file(name);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child_instance", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .envs(env.iter().cloned())
            .env("JQ_CHILD", "1")
            .env("INSTANCE_ID", name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        Proc { child: cmd.spawn().expect("spawn child instance"), name: name.to_string(), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for exit, at most `within`; returns the exit code (None: killed by a signal).
    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API address a process started with `PORT=0` and JSON logs reports in its `listening` line.
    pub async fn api_addr(&self) -> std::net::SocketAddr {
        eventually(Duration::from_secs(60), &format!("{} listening", self.name), || async {
            self.stderr()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| l["msg"] == "listening" && l["addr"].is_string())
                .and_then(|l| l["addr"].as_str()?.parse().ok())
        })
        .await
    }

    /// The process's log as JSON records (lines that are not JSON are returned as strings).
    pub fn log_records(&self) -> Vec<Value> {
        self.stderr().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.into()))).collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("log of {} kept at {}", self.name, self.log.display());
        }
    }
}

/// Side table in which child instances record every execution of a job.
pub const EXECUTIONS_DDL: &str = "
CREATE TABLE IF NOT EXISTS test_executions (
    job_id uuid NOT NULL,
    instance text NOT NULL,
    attempt int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)";

/// Body of the `#[ignore] child_instance` test of each test file: runs an instance whose default-queue
/// handler records each execution in `test_executions`, then sleeps `JQ_SLEEP_MS` (watching for
/// cancellation), until SIGTERM or SIGINT, like `jobqueue serve`.
pub fn child_main() {
    if std::env::var("JQ_CHILD").is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let settings = jobqueue::config::Settings {
            database_url: std::env::var("DATABASE_URL").ok(),
            port: std::env::var("PORT").ok(),
            bind: std::env::var("BIND").ok(),
            workers: std::env::var("WORKERS").ok(),
            queues: std::env::var("QUEUES").ok(),
            poll_interval: std::env::var("POLL_INTERVAL").ok(),
            job_lease: std::env::var("JOB_LEASE").ok(),
            shutdown_timeout: std::env::var("SHUTDOWN_TIMEOUT").ok(),
            db_pool_size: std::env::var("DB_POOL_SIZE").ok(),
            maintenance_interval: std::env::var("MAINTENANCE_INTERVAL").ok(),
            instance_id: std::env::var("INSTANCE_ID").ok(),
            ..Default::default()
        };
        let config = settings.resolve().expect("child config");
        let instance = config.instance_id.clone();
        let sleep_ms: u64 = std::env::var("JQ_SLEEP_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        let pool = jobqueue::db::Connector::new(&config.database_url, Duration::from_secs(10))
            .unwrap()
            .pool(4, Duration::from_secs(5));
        let handler = {
            let pool = pool.clone();
            move |ctx: JobContext| {
                let pool = pool.clone();
                let instance = instance.clone();
                async move {
                    let c = pool.get().await.map_err(|e| HandlerError::retry(format!("{e:?}")))?;
                    c.execute(
                        "INSERT INTO test_executions (job_id, instance, attempt) VALUES ($1, $2, $3)",
                        &[&ctx.job.id, &instance, &ctx.job.attempts],
                    )
                    .await
                    .map_err(|e| HandlerError::retry(format!("{e:?}")))?;
                    drop(c);
                    if sleep_ms > 0 {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                            _ = ctx.cancelled() => {}
                        }
                    }
                    Ok(Value::String(instance))
                }
            }
        };
        // The real logger, to stderr (the Proc's log file), so tests can read what the instance said.
        let (log, _guard) = jobqueue::logging::init(jobqueue::config::LogFormat::Json, slog::Level::Info, None);
        let mut builder = Builder::new(config).logger(log).handler("default", handler);
        for q in ["email", "reports", "flood", "slow"] {
            let h = handler_for_extra_queue();
            builder = builder.handler(q, h);
        }
        let service = builder.start().await.expect("child starts");
        service.run_until_signal().await.expect("child stops cleanly");
    });
}

fn handler_for_extra_queue() -> impl jobqueue::Handler {
    |ctx: JobContext| async move {
        let ms = ctx.job.payload.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0);
        if ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = ctx.cancelled() => {}
            }
        }
        Ok::<_, HandlerError>(Value::Null)
    }
}

/// Shared handle for in-process handlers that record what they saw.
pub type Seen = Arc<std::sync::Mutex<Vec<(uuid::Uuid, i32, Instant)>>>;

/// The API's state for an in-process API on `url` (open, no engine of its own), with the remote
/// finisher running on the test's runtime.
pub fn api_state(url: &str) -> jobqueue::api::ApiState {
    api_state_with(url, Duration::from_secs(10), 16)
}

/// [`api_state`] with the database's statement timeout and the long-poll cap given.
pub fn api_state_with(url: &str, statement_timeout: Duration, max_long_polls: usize) -> jobqueue::api::ApiState {
    let connector = Arc::new(jobqueue::db::Connector::new(url, statement_timeout).unwrap());
    let pool = connector.pool(4, Duration::from_secs(5));
    let waiters = Arc::new(jobqueue::waiters::Waiters::default());
    let (remote, writer) = jobqueue::remote::Remote::new(jobqueue::remote::RemoteSettings {
        connector: connector.clone(),
        pool: pool.clone(),
        policies: Default::default(),
        default_retry: Default::default(),
        default_lease: Duration::from_secs(30),
        poll_interval: Duration::from_secs(1),
        waiters: waiters.clone(),
        max_long_polls,
        log: jobqueue::logging::discard(),
    });
    // The remote finisher and the insert flushers; the service runs them under its supervisor.
    tokio::spawn(writer);
    let (enqueuer, flushers) = jobqueue::enqueue::Enqueuer::new(connector, jobqueue::logging::discard());
    tokio::spawn(flushers);
    jobqueue::api::ApiState {
        pool,
        enqueuer,
        waiters,
        health: Arc::new(jobqueue::worker::Health::running()),
        remote,
        max_body_bytes: 1 << 20,
        request_deadline: Duration::from_secs(20),
        body_timeout: Duration::from_secs(30),
        auth: Default::default(),
        cors_origins: Vec::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        log: jobqueue::logging::discard(),
        metrics: None,
        instance: Default::default(),
    }
}

/// Empties a test database of everything the migrations made (and the record of them), so that
/// migrations run for real: for the tests of migrating, baselining and upgrading.
pub async fn drop_schema(c: &Client) {
    c.batch_execute(
        "DROP TABLE jobqueue_migrations; DROP VIEW jobqueue_stats; DROP TABLE jobs; DROP TABLE queues;
         DROP TABLE instances;
         DROP FUNCTION jobs_touch_updated_at; DROP FUNCTION jobs_notify_inserted; DROP FUNCTION jobqueue_uuidv7;
         DROP FUNCTION jobqueue_cancel, jobqueue_retry, jobqueue_pause, jobqueue_resume;
         DROP FUNCTION jobqueue_schedule, jobqueue_schedule_run;
         DROP TABLE schedule_runs; DROP TABLE schedules;
         DROP FUNCTION schedules_before_update, schedules_notify;
         DROP TABLE job_dependencies; DROP FUNCTION jobqueue_release_dependants, jobqueue_has_dependants;
         DROP TABLE wait_stats;",
    )
    .await
    .unwrap();
}
