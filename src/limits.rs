//! Every range limit of the service, defined once: the job fields the schema's named CHECK constraints
//! enforce (validated here first so that the API can name the offending field), and the bounds of the
//! configuration. `job`, the API and `config` (environment, flags and the config file alike) all read
//! them from here, so an error message and the check behind it cannot disagree.

use std::time::Duration;

/// Longest delay a retry or snooze may ask for; longer requests are shortened to this.
pub const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

pub const PRIORITY_RANGE: (i32, i32) = (-1000, 1000);
pub const MAX_ATTEMPTS_RANGE: (i32, i32) = (1, 1000);
pub const QUEUE_NAME_MAX: usize = 128;
pub const UNIQUE_KEY_MAX: usize = 255;

/// Concurrent jobs of one queue on one instance (`WORKERS`, `QUEUES`, `concurrency` in the file).
pub const CONCURRENCY_RANGE: (usize, usize) = (1, 10_000);
/// Random spread of a retry backoff, as a fraction of it.
pub const JITTER_RANGE: (f64, f64) = (0.0, 1.0);
pub const MAX_BODY_BYTES_RANGE: (u64, u64) = (1024, 1 << 30);
pub const DB_POOL_SIZE_RANGE: (u32, u32) = (1, 1000);
pub const INSTANCE_ID_MAX: usize = 200;

/// Shorter polls would turn an idle instance into a load on the database.
pub const POLL_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// The heartbeat renews at a third of the lease; below this it could not keep up with a busy database.
pub const JOB_LEASE_MIN: Duration = Duration::from_millis(500);
/// Per instance (`JOB_TIMEOUT`) and per queue (`timeout` in the file).
pub const JOB_TIMEOUT_MIN: Duration = Duration::from_millis(1);
pub const MAINTENANCE_INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const STATEMENT_TIMEOUT_MIN: Duration = Duration::from_millis(100);
/// The pool's wait for a connection.
pub const DB_ACQUIRE_TIMEOUT_MIN: Duration = Duration::from_millis(10);
pub const MAX_CONNECTIONS_RANGE: (usize, usize) = (1, 1_000_000);
/// Header and body deadlines: shorter ones would cut off ordinary clients on a slow network.
pub const HTTP_TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const MAX_WAITERS_RANGE: (usize, usize) = (0, 1_000_000);
/// The runtime's worker threads: more than this many is a typo, not a machine.
pub const RUNTIME_THREADS_RANGE: (usize, usize) = (1, 1024);
