//! Wires the components into a running instance: migrations, pool, API, dispatcher, workers,
//! maintenance. The binary and the tests both start the service through [`Builder`].

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
use crate::db::{self, migrate, DbError, Pool};
use crate::dispatcher::Dispatcher;
use crate::instances::Registry;
use crate::maintenance::Maintenance;
use crate::remote::{Remote, RemoteSettings};
use crate::waiters::Waiters;
use crate::worker::handler::Handler;
use crate::worker::running::Running;
use crate::worker::{Engine, EngineSettings};

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
/// that does not answer yet. Errors the database returns (bad password, edited migration) fail at once.
pub async fn migrate(config: &Config, log: &Logger) -> Result<migrate::Applied, DbError> {
    let deadline = tokio::time::Instant::now() + STARTUP_DB_WAIT;
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = async {
            db::ensure_database(&config.database_url, log).await?;
            let mut client = db::connect(&config.database_url, log).await?;
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
    let mut client = db::connect(&config.database_url, log).await?;
    migrate::baseline(&mut client, log).await
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
        let pool = db::pool(&config.database_url, config.db_pool_size).await?;
        let running = Arc::new(Running::default());
        let waiters = Arc::new(Waiters::default());
        let shutdown = CancellationToken::new();

        let mut served = Vec::new();
        for q in &config.queues {
            match handlers.remove(&q.name) {
                Some(h) => served.push((q.clone(), h)),
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
                url: config.database_url.clone(),
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
        let remote = Remote::new(RemoteSettings {
            url: config.database_url.clone(),
            pool: pool.clone(),
            policies: config.queues.iter().map(|q| (q.name.clone(), q.retry.clone())).collect(),
            default_retry: config.default_retry.clone(),
            default_lease: config.job_lease,
            poll_interval: config.poll_interval,
            waiters: waiters.clone(),
            max_long_polls: crate::remote::MAX_LONG_POLLS,
            log: log.clone(),
        });
        let registry = Registry {
            pool: pool.clone(),
            instance_id: config.instance_id.clone(),
            queues: wakes.keys().cloned().collect(),
            log: log.clone(),
        };
        let dispatcher = Dispatcher {
            url: config.database_url.clone(),
            wakes: wakes.clone(),
            remote: remote.wakes(),
            running: running.clone(),
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

        let mut addr = None;
        let mut api_task = None;
        if api {
            let bind = SocketAddr::new(config.bind, config.port);
            let listener =
                tokio::net::TcpListener::bind(bind).await.map_err(|source| StartError::Bind { addr: bind, source })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind { addr: bind, source })?;
            let state = Arc::new(ApiState {
                pool: pool.clone(),
                waiters: waiters.clone(),
                remote: remote.clone(),
                max_body_bytes: config.max_body_bytes,
                shutdown: shutdown.clone(),
                log: log.new(slog::o!("component" => "api")),
            });
            let server =
                warp::serve(api::routes(state)).incoming(listener).graceful(shutdown.clone().cancelled_owned());
            api_task = Some(tokio::spawn(server.run()));
            info!(log, "listening"; "addr" => %local);
            addr = Some(local);
        }

        let mut tasks =
            vec![tokio::spawn(dispatcher.run(shutdown.clone())), tokio::spawn(maintenance.run(shutdown.clone())), {
                let waiters = waiters.clone();
                let (pool, log, shutdown) = (pool.clone(), log.clone(), shutdown.clone());
                tokio::spawn(async move { waiters.poll(pool, WAITER_POLL, log, shutdown).await })
            }];
        tasks.push(tokio::spawn(registry.run(shutdown.clone())));
        let engine_task = tokio::spawn(engine.run(shutdown.clone()));
        let supervisor = {
            let (shutdown, log, grace) = (shutdown.clone(), log.clone(), config.shutdown_timeout);
            tokio::spawn(async move {
                shutdown.cancelled().await;
                info!(log, "shutting down");
                if let Some(api_task) = api_task {
                    // In-flight requests finish; waiting ones were told to answer now.
                    let _ = tokio::time::timeout(grace + Duration::from_secs(1), api_task).await;
                }
                let _ = engine_task.await;
                for t in tasks {
                    let _ = t.await;
                }
                info!(log, "stopped");
            })
        };
        info!(log, "jobqueue started");
        Ok(Service { addr, shutdown, supervisor, pool })
    }
}

/// A running instance.
pub struct Service {
    addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    supervisor: JoinHandle<()>,
    pool: Pool,
}

impl Service {
    /// The address the API listens on (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Cancel this token to begin a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Begins a graceful shutdown and waits for it to complete.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Waits until the service has stopped (after its shutdown token is cancelled).
    pub async fn join(self) {
        let _ = self.supervisor.await;
    }
}
