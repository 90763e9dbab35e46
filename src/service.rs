//! Wires the components into a running instance: migrations, pool, API, listener, workers,
//! maintenance. The binary and the tests both start the service through [`Builder`], and every task
//! it starts runs under one [`Supervisor`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use slog::{info, warn, Logger};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::{Config, QueueConfig};
use crate::db::{migrate, Connector, DbError, Pool, Purpose};
use crate::instances::Registry;
use crate::listener::Listener;
use crate::maintenance::Maintenance;
use crate::remote::{Remote, RemoteSettings};
use crate::scheduler::Scheduler;
use crate::supervisor::{Supervisor, TaskFailure};
use crate::waiters::Waiters;
use crate::worker::handler::Handler;
use crate::worker::running::Running;
use crate::worker::{Engine, EngineSettings, Health};

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// How often waiters of `GET /jobs/{id}?wait=` look for jobs finished by other instances.
const WAITER_POLL: Duration = Duration::from_millis(200);

/// How long start-up waits for an unreachable database (one starting alongside the service, as in
/// docker compose or after a host reboot) before giving up.
const STARTUP_DB_WAIT: Duration = Duration::from_secs(30);

/// Creates the database if needed and applies pending migrations, waiting up to 30 s for a database
/// that does not answer yet. Anything else (a wrong password, TLS the server requires, an edited
/// migration) fails at once: waiting cannot fix it.
pub async fn migrate(config: &Config, log: &Logger) -> Result<migrate::Applied, DbError> {
    let connector = Connector::new(&config.database_url, config.statement_timeout)?;
    let deadline = tokio::time::Instant::now() + STARTUP_DB_WAIT;
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = async {
            connector.ensure_database(log).await?;
            let mut client = connector.connect(Purpose::Admin, log).await?;
            migrate::run(&mut client, log).await
        };
        match attempt.await {
            Err(e) if e.is_unavailable() && tokio::time::Instant::now() + backoff < deadline => {
                warn!(log, "database not reachable yet; retrying"; "err" => %e, "retry_in_ms" => backoff.as_millis() as u64);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
}

/// Records the migrations as applied without running them (see [`migrate::baseline`]).
pub async fn migrate_baseline(config: &Config, log: &Logger) -> Result<migrate::Applied, DbError> {
    let connector = Connector::new(&config.database_url, config.statement_timeout)?;
    let mut client = connector.connect(Purpose::Admin, log).await?;
    migrate::baseline(&mut client, log).await
}

/// Writes the config file's schedules to the database, by the rule of
/// [`crate::db::schedules::schedule_sync`]: create what is missing, update what a config file wrote
/// and this file defines differently, never touch what the API or SQL wrote. Start-up only, so
/// instances with different files do not keep overwriting each other.
async fn sync_schedules(pool: &Pool, schedules: &[crate::schedule::ScheduleSpec], log: &Logger) -> Result<(), DbError> {
    if schedules.is_empty() {
        return Ok(());
    }
    let client = pool.get().await?;
    for spec in schedules {
        // Checked when the file was read; the time zone database is this binary's own.
        let next = spec.validate().ok().and_then(|t| t.next_after(chrono::Utc::now()));
        let synced = crate::db::schedules::schedule_sync(&*client, spec, next).await?;
        info!(log, "schedule from the config file"; "schedule" => &spec.name, "synced" => format!("{synced:?}"));
    }
    Ok(())
}

/// Builds a service from a [`Config`] and the handlers of the queues it serves.
pub struct Builder {
    config: Config,
    handlers: HashMap<String, Arc<dyn Handler>>,
    log: Logger,
    api: bool,
}

impl Builder {
    pub fn new(config: Config) -> Builder {
        Builder { config, handlers: HashMap::new(), log: crate::logging::discard(), api: true }
    }

    /// Registers the handler of `queue`. A queue is served when it has a handler and is listed in the
    /// configuration's queues (see [`Builder::queue`]).
    pub fn handler(mut self, queue: &str, handler: impl Handler) -> Self {
        self.handlers.insert(queue.to_string(), Arc::new(handler));
        self
    }

    /// Adds a queue to serve, or replaces the configuration of one with the same name.
    pub fn queue(mut self, queue: QueueConfig) -> Self {
        match self.config.queues.iter_mut().find(|q| q.name == queue.name) {
            Some(q) => *q = queue,
            None => self.config.queues.push(queue),
        }
        self
    }

    /// The logger; every line the service writes carries `instance` (the configured `instance_id`).
    pub fn logger(mut self, log: Logger) -> Self {
        self.log = log;
        self
    }

    /// Whether to serve the HTTP API (default true).
    pub fn api(mut self, on: bool) -> Self {
        self.api = on;
        self
    }

    /// Migrates, binds, and starts every component. Returns once the service is accepting requests.
    pub async fn start(self) -> Result<Service, StartError> {
        let Builder { config, mut handlers, log, api } = self;
        let log = log.new(slog::o!("instance" => config.instance_id.clone()));
        migrate(&config, &log).await?;
        let connector = Arc::new(Connector::new(&config.database_url, config.statement_timeout)?);
        let pool = connector.pool(config.db_pool_size, config.db_acquire_timeout);
        sync_schedules(&pool, &config.schedules, &log).await?;
        let running = Arc::new(Running::default());
        let waiters = Arc::new(Waiters::new(config.http.max_waiters));
        let health = Arc::new(Health::default());
        let shutdown = CancellationToken::new();

        let mut served = Vec::new();
        let mut served_settings = Vec::new();
        for q in &config.queues {
            match handlers.remove(&q.name) {
                Some(h) => {
                    served_settings.push(crate::ui::QueueSettings {
                        name: q.name.clone(),
                        concurrency: q.concurrency,
                        retry: q.retry.clone(),
                        timeout: q.timeout.unwrap_or(config.job_timeout),
                        handler: config.handler(&q.name).kind(),
                    });
                    served.push((q.clone(), h))
                }
                None => {
                    warn!(log, "queue has no handler on this instance; not served"; "queue" => &q.name)
                }
            }
        }
        for name in handlers.keys() {
            warn!(log, "handler registered for a queue that is not configured; not served"; "queue" => name);
        }

        let engine = Engine::new(
            EngineSettings {
                connector: connector.clone(),
                instance_id: config.instance_id.clone(),
                lease: config.job_lease,
                job_timeout: config.job_timeout,
                poll_interval: config.poll_interval,
                shutdown_timeout: config.shutdown_timeout,
            },
            served,
            running.clone(),
            waiters.clone(),
            &log,
        );
        let wakes = engine.wakes();
        let (remote, remote_writer) = Remote::new(RemoteSettings {
            connector: connector.clone(),
            pool: pool.clone(),
            policies: config.queues.iter().map(|q| (q.name.clone(), q.retry.clone())).collect(),
            default_retry: config.default_retry.clone(),
            default_lease: config.job_lease,
            poll_interval: config.poll_interval,
            waiters: waiters.clone(),
            // Long-polls and ?wait= requests are both waits a client holds open: one bound.
            max_long_polls: config.http.max_waiters,
            log: log.clone(),
        });
        let registry = Registry {
            pool: pool.clone(),
            instance_id: config.instance_id.clone(),
            queues: wakes.keys().cloned().collect(),
            log: log.clone(),
        };
        crate::metrics::init();
        let sampler = Arc::new(crate::metrics::Sampler { slots: engine.slots(), pool: pool.clone() });
        let schedule_wake = Arc::new(tokio::sync::Notify::new());
        let scheduler = Scheduler { pool: pool.clone(), wake: schedule_wake.clone(), log: log.clone() };
        let notifications = Listener {
            connector: connector.clone(),
            wakes: wakes.clone(),
            remote: remote.wakes(),
            running: running.clone(),
            schedules: schedule_wake,
            ping_interval: Duration::from_secs(10),
            log: log.clone(),
        };
        let maintenance = Maintenance {
            pool: pool.clone(),
            rescue_interval: config.maintenance_interval.min(config.job_lease / 2),
            retention_interval: config.maintenance_interval,
            retention: config.retention,
            default_max_attempts: config.default_retry.max_attempts,
            wakes,
            log: log.clone(),
        };

        if api && config.auth.is_open() {
            warn!(log, "no API_TOKENS configured: the API is open to anyone who can reach it");
        }
        let mut supervisor = Supervisor::new(shutdown.clone(), log.new(slog::o!("component" => "supervisor")));
        let mut addr = None;
        let mut metrics_addr = None;
        if api {
            let bind = SocketAddr::new(config.bind, config.port);
            let listener =
                tokio::net::TcpListener::bind(bind).await.map_err(|source| StartError::Bind { addr: bind, source })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind { addr: bind, source })?;
            let (enqueuer, flushers) =
                crate::enqueue::Enqueuer::new(connector.clone(), log.new(slog::o!("component" => "enqueue")));
            // Ends once the API (the only holder of the enqueuer) has stopped.
            supervisor.spawn("enqueue", flushers);
            let state = Arc::new(ApiState {
                pool: pool.clone(),
                enqueuer,
                waiters: waiters.clone(),
                health: health.clone(),
                remote: remote.clone(),
                max_body_bytes: config.max_body_bytes,
                request_deadline: config.db_acquire_timeout + connector.deadline(),
                body_timeout: config.http.body_timeout,
                auth: config.auth.clone(),
                cors_origins: config.cors_origins.clone(),
                shutdown: shutdown.clone(),
                log: log.new(slog::o!("component" => "api")),
                metrics: Some(sampler.clone()),
                instance: crate::ui::InstanceInfo { id: config.instance_id.clone(), queues: served_settings.clone() },
            });
            let serve = api::server::serve(
                listener,
                api::routes(state),
                config.http.clone(),
                config.shutdown_timeout + Duration::from_secs(1),
                shutdown.clone(),
                log.clone(),
            );
            supervisor.spawn("api", serve);
            info!(log, "listening"; "addr" => %local);
            addr = Some(local);
        }
        supervisor.spawn("engine", engine.run(shutdown.clone(), health.clone()));
        if api {
            // The API is the remote front's only user; without it the writer would end at once.
            supervisor.spawn("remote-finisher", remote_writer);
        } else {
            drop(remote_writer);
        }
        supervisor.spawn("listener", notifications.run(shutdown.clone()));
        supervisor.spawn("maintenance", maintenance.run(shutdown.clone()));
        supervisor.spawn("scheduler", scheduler.run(shutdown.clone()));
        supervisor.spawn("registry", registry.run(shutdown.clone()));
        supervisor.spawn(
            "wait-stats",
            crate::wait_series::flush(
                pool.clone(),
                config.instance_id.clone(),
                log.new(slog::o!("component" => "wait-stats")),
                shutdown.clone(),
            ),
        );
        let metrics_log = log.new(slog::o!("component" => "metrics"));
        let refresh = crate::metrics::refresh(
            pool.clone(),
            crate::metrics::REFRESH_INTERVAL,
            metrics_log.clone(),
            shutdown.clone(),
        );
        supervisor.spawn("metrics", refresh);
        if let Some(bind) = config.metrics_bind {
            let listener =
                tokio::net::TcpListener::bind(bind).await.map_err(|source| StartError::Bind { addr: bind, source })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind { addr: bind, source })?;
            info!(log, "metrics listening"; "addr" => %local);
            metrics_addr = Some(local);
            supervisor
                .spawn("metrics_listener", crate::metrics::serve(listener, sampler, metrics_log, shutdown.clone()));
        }
        {
            let waiters = waiters.clone();
            let (pool, log, shutdown) = (pool.clone(), log.clone(), shutdown.clone());
            supervisor.spawn("waiters", async move { waiters.poll(pool, WAITER_POLL, log, shutdown).await });
        }
        // The engine's own drain is bounded by the shutdown timeout plus its completer's 12 s; this
        // is the backstop beyond it.
        let drain = config.shutdown_timeout + Duration::from_secs(20);
        let supervisor = {
            let (shutdown, log) = (shutdown.clone(), log.clone());
            tokio::spawn(async move {
                let watch_log = log.clone();
                let announce = async move {
                    shutdown.cancelled().await;
                    info!(watch_log, "shutting down");
                };
                let (result, ()) = tokio::join!(supervisor.run(drain), announce);
                info!(log, "stopped");
                result
            })
        };
        info!(log, "jobqueue started");
        Ok(Service { addr, metrics_addr, shutdown, supervisor, pool, log, running })
    }
}

/// A running instance.
pub struct Service {
    addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    supervisor: JoinHandle<Result<(), TaskFailure>>,
    pool: Pool,
    log: Logger,
    running: Arc<Running>,
}

impl Service {
    /// Jobs this instance holds now (claimed, running or with an outcome not yet written): zero once
    /// everything it claimed is recorded.
    pub fn held(&self) -> usize {
        self.running.len()
    }

    /// The address the API listens on (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The address of the separate `/metrics` listener (`METRICS_BIND`), if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Cancel this token to begin a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Begins a graceful shutdown and waits for it to complete.
    pub async fn stop(self) -> Result<(), TaskFailure> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Waits until the service has stopped: after its shutdown token is cancelled, or after one of
    /// its tasks failed (then the error names it, and the process should exit non-zero).
    pub async fn join(self) -> Result<(), TaskFailure> {
        match self.supervisor.await {
            Ok(result) => result,
            Err(e) => Err(TaskFailure { task: "supervisor", what: e.to_string() }),
        }
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully (see README, "Shutdown"). A second
    /// signal during the graceful shutdown exits the process at once with code 130; jobs still running
    /// then are recovered by the rescuer when their leases expire.
    pub async fn run_until_signal(self) -> Result<(), TaskFailure> {
        let mut signals = Signals::new();
        let (shutdown, log) = (self.shutdown.clone(), self.log.clone());
        let join = self.join();
        tokio::pin!(join);
        tokio::select! {
            result = &mut join => return result,
            name = signals.next() => {
                info!(log, "signal received; shutting down gracefully"; "signal" => name);
                shutdown.cancel();
            }
        }
        tokio::select! {
            result = &mut join => result,
            name = signals.next() => {
                warn!(log, "second signal; exiting now"; "signal" => name);
                // An exit skips destructors: stop the commands of command-handler queues explicitly.
                crate::worker::handlers::command::kill_running();
                std::process::exit(130);
            }
        }
    }
}

/// SIGINT and SIGTERM.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        Signals { term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok() }
    }

    async fn next(&mut self) -> &'static str {
        let term = async {
            match &mut self.term {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term => "SIGTERM",
        }
    }
}
