//! Everything that talks to PostgreSQL: the connection pool, dedicated connections with prepared
//! statements, migrations, and (in [`queries`]) every SQL statement the service runs.
//!
//! Only this module issues SQL. The rest of the crate calls the named functions in [`queries`].

pub mod lease;
pub mod migrate;
pub mod queries;
pub mod queues;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use slog::Logger;
use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

pub type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database error: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no database connection available: {0}")]
    Pool(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("invalid database URL: {0}")]
    Url(String),
    /// A statement lost a race repeatedly; trying again later will succeed.
    #[error("{0}")]
    Contended(String),
}

impl From<bb8::RunError<tokio_postgres::Error>> for DbError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::User(e) => DbError::Postgres(e),
            bb8::RunError::TimedOut => DbError::Pool("timed out waiting for a pooled connection".into()),
        }
    }
}

impl DbError {
    /// The SQLSTATE of a server-side error; errors are classified by code, never by message text.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            DbError::Postgres(e) => e.code(),
            _ => None,
        }
    }

    /// The constraint a check or unique violation names, if any.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) => e.as_db_error().and_then(|d| d.constraint()),
            _ => None,
        }
    }

    /// The server's message for an error the client caused (bad value, violated constraint).
    pub fn server_message(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) => e.as_db_error().map(|d| d.message()),
            _ => None,
        }
    }

    /// True when the database could not be reached or the connection broke, as opposed to a
    /// statement the server refused.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool(_) | DbError::Contended(_) => true,
            DbError::Postgres(e) => {
                e.is_closed()
                    || e.as_db_error().is_none()
                    || matches!(
                        e.code(),
                        Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                            || *c == SqlState::CANNOT_CONNECT_NOW
                            || *c == SqlState::TOO_MANY_CONNECTIONS
                            || *c == SqlState::CRASH_SHUTDOWN
                    )
            }
            _ => false,
        }
    }
}

/// A tokio-postgres error in one line. Its `Display` alone says only "db error" for errors the server
/// sent, so spell out SQLSTATE, message and detail; for client-side errors add the cause.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                s.push_str(&format!(" ({detail})"));
            }
            s
        }
        None => match std::error::Error::source(e) {
            Some(cause) if !e.to_string().contains(&cause.to_string()) => format!("{e}: {cause}"),
            _ => e.to_string(),
        },
    }
}

/// Builds the pool used by the API and maintenance. Hot-path engine work uses [`Conn`] instead.
pub async fn pool(url: &str, size: u32) -> Result<Pool, DbError> {
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))?;
    let manager = PostgresConnectionManager::new(cfg, NoTls);
    let pool = bb8::Pool::builder().max_size(size).connection_timeout(Duration::from_secs(5)).build_unchecked(manager);
    Ok(pool)
}

/// Opens a plain connection and drives it on a background task.
pub async fn connect(url: &str, log: &Logger) -> Result<Client, DbError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let log = log.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            slog::debug!(log, "database connection closed"; "err" => format!("{e:?}"));
        }
    });
    Ok(client)
}

/// Creates the database named in `url` if it does not exist yet, so that a local run needs no set-up.
pub async fn ensure_database(url: &str, log: &Logger) -> Result<(), DbError> {
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| DbError::Url(e.to_string()))?;
    let name = match cfg.get_dbname() {
        Some(n) => n.to_string(),
        None => return Ok(()),
    };
    match tokio_postgres::connect(url, NoTls).await {
        Ok(_) => return Ok(()),
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e.into()),
    }
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(NoTls).await?;
    tokio::spawn(connection);
    match client.batch_execute(&queries::database_create(&name)).await {
        Ok(()) => {
            slog::info!(log, "created database"; "database" => &name);
            Ok(())
        }
        // Another instance created it first.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) => Err(e.into()),
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
    pub async fn connect(url: &str, log: &Logger) -> Result<Conn, DbError> {
        Ok(Conn { client: connect(url, log).await?, statements: HashMap::new() })
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

/// Longest wait for one engine statement (or for a connection to open) before the connection is
/// given up as broken.
pub const STATEMENT_DEADLINE: Duration = Duration::from_secs(30);

/// A [`Conn`] that reconnects itself: engine loops hold one and never deal with reconnection.
pub struct ConnSlot {
    url: String,
    log: Logger,
    conn: Option<Conn>,
}

impl ConnSlot {
    pub fn new(url: &str, log: &Logger) -> ConnSlot {
        ConnSlot { url: url.to_string(), log: log.clone(), conn: None }
    }

    /// Bounds the wait for one engine statement, e.g.
    /// `slot.settle(timeout(STATEMENT_DEADLINE, async { query(slot.get().await?).await }).await)`.
    /// A statement that does not answer in time (a half-open TCP connection after a network fault, a
    /// server that stopped answering) costs the connection: the next call opens a new one rather than
    /// queueing behind the stuck one.
    pub fn settle<T>(&mut self, result: Result<Result<T, DbError>, tokio::time::error::Elapsed>) -> Result<T, DbError> {
        result.unwrap_or_else(|_| {
            self.conn = None;
            Err(DbError::Pool(format!("no answer within {}s; reconnecting", STATEMENT_DEADLINE.as_secs())))
        })
    }

    /// The live connection, opening a new one if there is none or the last one broke.
    pub async fn get(&mut self) -> Result<&mut Conn, DbError> {
        if self.conn.as_ref().is_none_or(Conn::is_closed) {
            self.conn = Some(Conn::connect(&self.url, &self.log).await?);
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }
}
