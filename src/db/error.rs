//! Database errors and their classes.
//!
//! What a caller should do about a failed statement depends on why it failed, and tokio-postgres keeps
//! the reasons apart: an I/O error or a closed connection, an error the server sent (with a SQLSTATE),
//! or a client-side error such as a row that does not decode into the Rust type asked for. Lumping
//! them together as "unavailable" made a decode bug look like an outage (503, retried forever) and a
//! TLS or authentication misconfiguration look like a database still starting (retried for 30 s).
//!
//! Errors are classified by SQLSTATE and by the error's structure (closed, I/O cause, server error),
//! never by message text.

use std::time::Duration;

use thiserror::Error;
use tokio_postgres::error::SqlState;

#[derive(Debug, Error)]
pub enum DbError {
    /// A statement failed (server error, broken connection, or a value that did not convert).
    #[error("database error: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// Opening a connection failed.
    #[error("cannot connect to the database: {}", describe(.0))]
    Connect(tokio_postgres::Error),
    /// No pooled connection became free in time.
    #[error("no database connection available: {0}")]
    Pool(String),
    /// A connection ended (the server closed it, or it stopped answering pings).
    #[error("database connection lost: {0}")]
    Lost(&'static str),
    /// The database did not answer within the client-side deadline.
    #[error("the database did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("invalid database URL: {0}")]
    Url(String),
    /// TLS cannot be set up as the URL asks (an unreadable `sslrootcert`, no root certificates).
    #[error("TLS: {0}")]
    Tls(String),
    /// A statement lost a race repeatedly; trying again later will succeed.
    #[error("{0}")]
    Contended(String),
    /// A row did not have the shape this code expects (a bug, or a schema it does not know).
    #[error("unexpected row: {0}")]
    Decode(String),
    /// One failure answered to several callers (the requests of one coalesced insert).
    #[error("{0}")]
    Shared(std::sync::Arc<DbError>),
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database cannot be reached, or stopped answering, or is shutting down: retry with backoff.
    Unavailable,
    /// The statement lost a race (serialization failure, deadlock): run it again.
    Transient,
    /// The server refused the statement's data (a constraint, a value out of range): the caller's
    /// input is wrong, and retrying the same statement cannot help.
    Rejected,
    /// Our code is wrong (a column that does not decode, a statement the server does not understand):
    /// log it loudly and never retry it forever.
    Bug,
    /// The configuration cannot work (authentication, TLS, a bad URL): stop at start-up.
    Fatal,
}

impl DbError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DbError::Pool(_) | DbError::Timeout(_) | DbError::Lost(_) => ErrorClass::Unavailable,
            DbError::Contended(_) => ErrorClass::Transient,
            DbError::Migration(_) | DbError::Url(_) | DbError::Tls(_) => ErrorClass::Fatal,
            DbError::Decode(_) => ErrorClass::Bug,
            DbError::Postgres(e) => statement_class(e),
            DbError::Connect(e) => connect_class(e),
            DbError::Shared(e) => e.class(),
        }
    }

    /// True when the database could not be reached or the connection broke, as opposed to a
    /// statement the server refused.
    pub fn is_unavailable(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }

    /// Worth running again: the database may answer later, or the race may go the other way.
    pub fn is_retryable(&self) -> bool {
        matches!(self.class(), ErrorClass::Unavailable | ErrorClass::Transient)
    }

    /// The SQLSTATE of a server-side error.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            DbError::Postgres(e) | DbError::Connect(e) => e.code(),
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
}

/// The class of a SQLSTATE, where the code alone decides.
fn sqlstate_class(code: &SqlState) -> ErrorClass {
    let c = code.code();
    if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        ErrorClass::Transient
    } else if c.starts_with("08")          // connection exception
        || c.starts_with("53")             // insufficient resources (too many connections, disk full)
        || c.starts_with("57P")            // admin/crash shutdown, cannot connect now
        || *code == SqlState::QUERY_CANCELED // statement_timeout, or a cancel request on shutdown
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
    // a standby after a failover: the primary comes back
    {
        ErrorClass::Unavailable
    } else if c.starts_with("28") || c.starts_with("3D") || *code == SqlState::INSUFFICIENT_PRIVILEGE {
        // Authentication, a database that does not exist, missing privileges.
        ErrorClass::Fatal
    } else if c.starts_with("22") || c.starts_with("23") {
        // Data exception, integrity constraint violation: the values are wrong.
        ErrorClass::Rejected
    } else {
        // Syntax, undefined column or table, internal error, an aborted transaction: our SQL or our
        // schema is wrong.
        ErrorClass::Bug
    }
}

/// Whether the TLS handshake failed on the certificate or the protocol (rustls reports that inside an
/// I/O error): the configuration's fault, not the network's.
fn tls_refused(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

fn io_caused(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A statement's error: the server's SQLSTATE if it sent one; a broken connection is unavailable;
/// anything else failed on our side of the wire (decoding a column, a parameter of the wrong type).
fn statement_class(e: &tokio_postgres::Error) -> ErrorClass {
    if let Some(code) = e.code() {
        return sqlstate_class(code);
    }
    if e.is_closed() || io_caused(e) {
        return ErrorClass::Unavailable;
    }
    ErrorClass::Bug
}

/// A connection attempt's error: refused, reset or timed out is unavailable (the server may be
/// starting); the server's SQLSTATE decides if it sent one; anything else (TLS required but not
/// available, a password the server asks for and the URL lacks, an unusable option) is the
/// configuration's fault, and waiting will not fix it.
fn connect_class(e: &tokio_postgres::Error) -> ErrorClass {
    if let Some(code) = e.code() {
        return match sqlstate_class(code) {
            ErrorClass::Bug | ErrorClass::Rejected => ErrorClass::Fatal,
            c => c,
        };
    }
    if tls_refused(e) {
        return ErrorClass::Fatal;
    }
    // The connect timeout is the one client-side connection error without a cause.
    if e.is_closed() || io_caused(e) || std::error::Error::source(e).is_none() {
        return ErrorClass::Unavailable;
    }
    ErrorClass::Fatal
}

impl From<bb8::RunError<tokio_postgres::Error>> for DbError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            // The pool opens (and checks) connections on demand: its errors are connection errors.
            bb8::RunError::User(e) => DbError::Connect(e),
            bb8::RunError::TimedOut => DbError::Pool("timed out waiting for a pooled connection".into()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_what_the_caller_should_do() {
        assert_eq!(sqlstate_class(&SqlState::T_R_DEADLOCK_DETECTED), ErrorClass::Transient);
        assert_eq!(sqlstate_class(&SqlState::T_R_SERIALIZATION_FAILURE), ErrorClass::Transient);
        assert_eq!(sqlstate_class(&SqlState::ADMIN_SHUTDOWN), ErrorClass::Unavailable);
        assert_eq!(sqlstate_class(&SqlState::QUERY_CANCELED), ErrorClass::Unavailable);
        assert_eq!(sqlstate_class(&SqlState::TOO_MANY_CONNECTIONS), ErrorClass::Unavailable);
        assert_eq!(sqlstate_class(&SqlState::INVALID_PASSWORD), ErrorClass::Fatal);
        assert_eq!(sqlstate_class(&SqlState::UNIQUE_VIOLATION), ErrorClass::Rejected);
        assert_eq!(sqlstate_class(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE), ErrorClass::Rejected);
        assert_eq!(sqlstate_class(&SqlState::UNDEFINED_COLUMN), ErrorClass::Bug);
        assert_eq!(sqlstate_class(&SqlState::SYNTAX_ERROR), ErrorClass::Bug);
    }

    #[test]
    fn our_own_errors_have_fixed_classes() {
        assert_eq!(DbError::Pool("x".into()).class(), ErrorClass::Unavailable);
        assert_eq!(DbError::Timeout(Duration::from_secs(1)).class(), ErrorClass::Unavailable);
        assert_eq!(DbError::Contended("x".into()).class(), ErrorClass::Transient);
        assert_eq!(DbError::Url("x".into()).class(), ErrorClass::Fatal);
    }
}
