//! Connections: one factory ([`Connector`]) for the pool, the listener and every dedicated connection,
//! so that what each connection needs (its `application_name`, the server-side statement deadline,
//! TLS as `sslmode` asks) is decided in one place rather than at each call site.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use slog::Logger;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::TlsSettings;
use super::{queries, DbError};

pub type Pool = bb8::Pool<PostgresConnectionManager<MakeRustlsConnect>>;

/// The stream under a connection: TLS or plain, as negotiated.
type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// A connection and the task-less half that must be polled to drive it.
pub type RawConnection = (Client, Connection<Socket, Stream>);

/// What a connection is for. It decides the `application_name` operators see in
/// `pg_stat_activity` and whether statements get the server-side deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The pool behind the API, maintenance and the waiters.
    Pool,
    /// A dedicated engine connection (the completer, the heartbeat).
    Engine,
    /// A producer's connection, which runs only claims, committed without waiting for the WAL flush
    /// (`synchronous_commit = off`). A claim is a lease, not a result: if the server crashes before
    /// the claim reaches disk, the job is simply pending again, its attempt uncounted, and runs again
    /// as after any crash (at least once). Nothing durable can depend on a claim that was lost: the
    /// finish of that attempt commits synchronously, and its flush covers every earlier WAL record,
    /// the claim's included. A claim's commit no longer waits for an fsync: 200,000-job drains ran
    /// 1.2 times as fast with every commit asynchronous (see docs/performance.md).
    Claim,
    /// The LISTEN connection.
    Listener,
    /// A flusher of coalesced `POST /jobs` inserts (`crate::enqueue`): its own connection, so that its
    /// statement is prepared once.
    Enqueue,
    /// Migrations and database creation: no statement deadline, since a migration may rightly wait
    /// for a lock or rewrite a large table.
    Admin,
}

impl Purpose {
    pub fn application_name(self) -> &'static str {
        match self {
            Purpose::Pool => "jobqueue",
            Purpose::Engine => "jobqueue-engine",
            Purpose::Claim => "jobqueue-claim",
            Purpose::Listener => crate::listener::APPLICATION_NAME,
            Purpose::Enqueue => "jobqueue-enqueue",
            Purpose::Admin => "jobqueue-admin",
        }
    }
}

/// How long a client waits beyond the server-side `statement_timeout` before it gives a connection up
/// as broken (a half-open TCP connection answers nothing, not even the server's cancellation).
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// Opens connections to one database with the settings each purpose needs.
#[derive(Clone)]
pub struct Connector {
    config: Config,
    tls: MakeRustlsConnect,
    statement_timeout: Duration,
}

impl Connector {
    /// `statement_timeout` is set on the server for every connection but [`Purpose::Admin`]: a statement
    /// that waits longer (for a lock a DBA holds, say) is cancelled by the server, so no backend is left
    /// working for a client that has given up.
    pub fn new(url: &str, statement_timeout: Duration) -> Result<Connector, DbError> {
        let (driver_url, tls) = TlsSettings::from_url(url)?;
        let config = Config::from_str(&driver_url).map_err(|e| DbError::Url(e.to_string()))?;
        Ok(Connector { config, tls: tls.connector()?, statement_timeout })
    }

    /// The same server with another database (for creating the configured one).
    pub fn with_dbname(&self, dbname: &str) -> Connector {
        let mut c = self.clone();
        c.config.dbname(dbname);
        c
    }

    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// The longest a client should wait for one statement on a connection of this connector.
    pub fn deadline(&self) -> Duration {
        self.statement_timeout + DEADLINE_MARGIN
    }

    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    fn config_for(&self, purpose: Purpose) -> Config {
        let mut c = self.config.clone();
        c.application_name(purpose.application_name());
        let mut options: Vec<String> =
            self.config.get_options().map(str::trim).filter(|o| !o.is_empty()).map(String::from).into_iter().collect();
        if purpose != Purpose::Admin && !self.statement_timeout.is_zero() {
            options.push(format!("-c statement_timeout={}", self.statement_timeout.as_millis()));
        }
        // The completer's and the heartbeat's statements take whole batches as arrays. Planned for
        // the arrays' actual contents (the first five executions of a prepared statement are), the
        // finish of 200 jobs took 9 to 14 ms against 3 to 4 ms with the generic plan it settles on,
        // so they get the generic plan at once. The claim too, for its planning: 0.36 ms of every
        // claim, 3 µs a claimed job, when each was planned for its own parameters.
        //
        // A generic plan is built once, at the first execution, and kept until the table's statistics
        // change. That first execution may see an empty or never analyzed table (the completer's
        // warm-up, a producer's first claim on an empty queue); planned so, the finish read all of
        // jobs_active for every job of a batch until autovacuum happened to run (20,000 jobs drained
        // at 5,700 jobs/s), and a claim read the whole backlog (5,000 rows for 100 jobs). With
        // sequential scans priced out both probe their indexes whatever the table looked like then;
        // the plan tests in tests/queries.rs hold them to it.
        if matches!(purpose, Purpose::Engine | Purpose::Claim) {
            options.push("-c plan_cache_mode=force_generic_plan".into());
            options.push("-c enable_seqscan=off".into());
        }
        if purpose == Purpose::Claim {
            options.push("-c synchronous_commit=off".into());
            // The claim wants its jobs in claim order, which `jobs_claim_idx` gives as it is read. A
            // table whose statistics were taken with a backlog, then vacuumed once that backlog had
            // drained (no live row counted in its pages), looks like it holds one row; planned so, a
            // claim after a cursor collected every runnable job through a bitmap of the index and
            // sorted them all to keep a few hundred: 124 ms a claim behind 150,000 jobs, a whole
            // 200,000-job drain at 7,000 jobs/s instead of 30,000. Without bitmap scans the planner
            // has only the ordered index scan left.
            options.push("-c enable_bitmapscan=off".into());
        }
        if !options.is_empty() {
            c.options(options.join(" "));
        }
        c
    }

    /// A connection whose driving half the caller polls (the listener reads notifications from it).
    pub async fn connect_raw(&self, purpose: Purpose) -> Result<RawConnection, DbError> {
        self.config_for(purpose).connect(self.tls.clone()).await.map_err(DbError::Connect)
    }

    /// Opens a connection and drives it on a background task.
    pub async fn connect(&self, purpose: Purpose, log: &Logger) -> Result<Client, DbError> {
        let (client, connection) = self.connect_raw(purpose).await?;
        let log = log.clone();
        // Not supervised on purpose: it ends when the client is dropped or the connection breaks,
        // and the client's next call reports that as a closed connection.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                slog::debug!(log, "database connection closed"; "err" => format!("{e:?}"));
            }
        });
        Ok(client)
    }

    /// The pool for the API, maintenance and the waiters; `acquire_timeout` bounds the wait for a
    /// free connection.
    pub fn pool(&self, size: u32, acquire_timeout: Duration) -> Pool {
        let manager = PostgresConnectionManager::new(self.config_for(Purpose::Pool), self.tls.clone());
        bb8::Pool::builder().max_size(size).connection_timeout(acquire_timeout).build_unchecked(manager)
    }

    /// Creates the configured database if it does not exist yet, so that a local run needs no set-up.
    pub async fn ensure_database(&self, log: &Logger) -> Result<(), DbError> {
        let Some(name) = self.dbname().map(str::to_string) else { return Ok(()) };
        match self.connect_raw(Purpose::Admin).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
            Err(e) => return Err(e),
        }
        let admin = self.with_dbname("postgres").connect(Purpose::Admin, log).await?;
        match admin.batch_execute(&queries::database_create(&name)).await {
            Ok(()) => {
                slog::info!(log, "created database"; "database" => &name);
                Ok(())
            }
            // Another instance created it first.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A dedicated connection whose statements are prepared once and reused.
///
/// The engine's hot path (claim, finish, heartbeat) runs thousands of times a second; a prepared
/// statement saves the parse/describe round trip that an unnamed statement costs on every call.
pub struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    pub fn new(client: Client) -> Conn {
        Conn { client, statements: HashMap::new() }
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The client, for statements that are not worth preparing.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) async fn prepared(&mut self, sql: &'static str) -> Result<(&Client, Statement), DbError> {
        if !self.statements.contains_key(sql) {
            let stmt = self.client.prepare(sql).await?;
            self.statements.insert(sql, stmt);
        }
        Ok((&self.client, self.statements[sql].clone()))
    }
}

/// A [`Conn`] that reconnects itself: engine loops hold one and never deal with reconnection.
pub struct ConnSlot {
    connector: Arc<Connector>,
    purpose: Purpose,
    log: Logger,
    conn: Option<Conn>,
}

impl ConnSlot {
    pub fn new(connector: &Arc<Connector>, log: &Logger) -> ConnSlot {
        ConnSlot::with_purpose(connector, Purpose::Engine, log)
    }

    /// A slot whose connections are opened for `purpose` (a producer's: [`Purpose::Claim`]).
    pub fn with_purpose(connector: &Arc<Connector>, purpose: Purpose, log: &Logger) -> ConnSlot {
        ConnSlot { connector: connector.clone(), purpose, log: log.clone(), conn: None }
    }

    /// The longest one engine statement may take, for `tokio::time::timeout` around it.
    pub fn deadline(&self) -> Duration {
        self.connector.deadline()
    }

    /// Bounds the wait for one engine statement, e.g.
    /// `slot.settle(timeout(slot.deadline(), async { query(slot.get().await?).await }).await)`.
    /// A statement that does not answer in time (a half-open TCP connection after a network fault, a
    /// server that stopped answering) costs the connection: the next call opens a new one rather than
    /// queueing behind the stuck one. The server cancels the statement itself at its
    /// `statement_timeout`, a little before this deadline, so no backend keeps working for it.
    pub fn settle<T>(&mut self, result: Result<Result<T, DbError>, tokio::time::error::Elapsed>) -> Result<T, DbError> {
        result.unwrap_or_else(|_| {
            self.conn = None;
            Err(DbError::Timeout(self.connector.deadline()))
        })
    }

    /// The live connection, opening a new one if there is none or the last one broke.
    pub async fn get(&mut self) -> Result<&mut Conn, DbError> {
        if self.conn.as_ref().is_none_or(Conn::is_closed) {
            let client = self.connector.connect(self.purpose, &self.log).await?;
            self.conn = Some(Conn::new(client));
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }
}
