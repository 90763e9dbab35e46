//! Applies the SQL migrations in `db/migrations/`, which are embedded in the binary at build time.
//!
//! refinery does the bookkeeping: each migration runs in its own transaction together with its row in
//! `jobqueue_migrations` (version, name, checksum), in version order, and a migration whose file no
//! longer matches the checksum recorded when it was applied is refused. What refinery does not do is
//! serialise instances that start at the same moment, so the whole run holds a session-level advisory
//! lock: the second instance waits, then finds nothing left to do.

use slog::Logger;
use tokio_postgres::Client;

use super::{queries, DbError};

refinery::embed_migrations!("db/migrations");

/// The table that records applied migrations.
pub const MIGRATIONS_TABLE: &str = "jobqueue_migrations";

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub versions: Vec<String>,
}

/// Applies every pending migration to the database behind `client`.
pub async fn run(client: &mut Client, log: &Logger) -> Result<Applied, DbError> {
    run_until(client, None, log).await
}

/// Applies pending migrations up to and including `version` (all of them with `None`): the upgrade
/// tests build a database as an older release left it, then upgrade it.
pub async fn run_until(client: &mut Client, version: Option<i32>, log: &Logger) -> Result<Applied, DbError> {
    client.batch_execute(queries::MIGRATION_LOCK).await?;
    let mut runner = migrations::runner();
    runner.set_migration_table_name(MIGRATIONS_TABLE);
    if let Some(v) = version {
        runner = runner.set_target(refinery::Target::Version(v));
    }
    let result = runner.set_abort_divergent(true).set_abort_missing(true).run_async(client).await;
    // Unlock even when the run failed; if the connection itself broke the server has released the lock.
    let unlocked = client.batch_execute(queries::MIGRATION_UNLOCK).await;
    let report = result.map_err(|e| DbError::Migration(describe(&e)))?;
    unlocked?;
    let versions: Vec<String> =
        report.applied_migrations().iter().map(|m| format!("V{}__{}", m.version(), m.name())).collect();
    for v in &versions {
        slog::info!(log, "applied migration"; "migration" => v);
    }
    Ok(Applied { versions })
}

/// Records every embedded migration as applied without running it: for a database whose schema a DBA
/// applied by hand (`psql -1 -f db/migrations/V1__jobs.sql`, ...), so that the service takes it over
/// instead of trying to create the tables again. Refuses when there is no `jobs` table.
pub async fn baseline(client: &mut Client, log: &Logger) -> Result<Applied, DbError> {
    client.batch_execute(queries::MIGRATION_LOCK).await?;
    let result = async {
        if !queries::jobs_table_exists(&*client).await? {
            return Err(DbError::Migration(
                "no jobs table here: --baseline is for a schema applied by hand; run plain `jobqueue migrate`".into(),
            ));
        }
        client.batch_execute(queries::MIGRATION_TABLE_CREATE).await?;
        let mut versions = Vec::new();
        for m in migrations::runner().get_migrations() {
            if queries::migration_record(&*client, m.version(), m.name(), m.checksum()).await? {
                let v = format!("V{}__{}", m.version(), m.name());
                slog::info!(log, "recorded migration as applied by hand"; "migration" => &v);
                versions.push(v);
            }
        }
        Ok(Applied { versions })
    }
    .await;
    let unlocked = client.batch_execute(queries::MIGRATION_UNLOCK).await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

/// refinery's messages, made to say what to do.
fn describe(e: &refinery::Error) -> String {
    match e.kind() {
        refinery::error::Kind::DivergentVersion(applied, _) => format!(
            "migration V{}__{} was edited after it was applied to this database (its checksum differs); \
             migrations are forward-only: restore the original file and put the change in a new migration",
            applied.version(),
            applied.name()
        ),
        refinery::error::Kind::MissingVersion(applied) => format!(
            "migration V{}__{} is applied to this database but missing from this build; \
             run a build that includes it",
            applied.version(),
            applied.name()
        ),
        // A statement of the migration failed: say which and why, not just "db error".
        refinery::error::Kind::Connection(what, source) => match source.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => format!("{what}: {}", super::describe(pg)),
            None => format!("{what}: {source}"),
        },
        _ => e.to_string(),
    }
}
