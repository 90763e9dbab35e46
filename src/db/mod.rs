//! Everything that talks to PostgreSQL: the connection factory and pool, dedicated connections with
//! prepared statements, migrations, error classes, and (in [`queries`]) every SQL statement the
//! service runs.
//!
//! Only this module issues SQL. The rest of the crate calls the named functions in [`queries`].

mod connect;
mod error;
pub mod lease;
pub mod migrate;
pub mod queries;
pub mod queues;
mod row_address;
pub mod schedules;
pub mod stored;
pub mod tls;

pub use connect::{Conn, ConnSlot, Connector, Pool, Purpose, RawConnection, DEADLINE_MARGIN};
pub(crate) use error::describe;
pub use error::{DbError, ErrorClass};
pub use row_address::RowAddress;

/// Runs `f` again while it fails with a transient error (a deadlock or serialization failure the
/// server resolved by aborting our statement), a few times with a short pause. Only for statements
/// that are safe to repeat: each attempt is its own transaction.
pub async fn retry_transient<T, F, Fut>(mut f: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut pause = std::time::Duration::from_millis(5);
    for _ in 0..4 {
        match f().await {
            Err(e) if e.class() == ErrorClass::Transient => {
                tokio::time::sleep(pause + pause.mul_f64(fastrand::f64())).await;
                pause *= 3;
            }
            other => return other,
        }
    }
    f().await
}
