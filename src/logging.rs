//! The root logger: human-readable on a terminal, JSON with `LOG_FORMAT=json`, always behind
//! slog-async so that a slow terminal or pipe never blocks a worker.
//!
//! Libraries that log through the `log` facade (tokio-postgres) or `tracing` (warp, which forwards to
//! `log` when no subscriber is installed) end up in the same drain via slog-stdlog.
//!
//! Stable keys: `job_id`, `queue`, `attempt`, `status`, `duration_ms`, `err`, `component`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use slog::{o, Drain, Logger, OwnedKVList, Record};
use slog_async::{AsyncCore, AsyncError};

use crate::config::LogFormat;

/// Keeps the global `log` bridge installed; drop it last.
pub struct LogGuard {
    _scope: Option<slog_scope::GlobalLoggerGuard>,
    _async: Option<slog_async::AsyncGuard>,
}

/// Builds the root logger and, with `bridge_for` set to an instance id, routes the `log` facade into
/// it, every bridged line carrying that `instance` like the service's own lines (which get it from
/// `Builder::start`; the root logger itself carries no keys).
pub fn init(format: LogFormat, level: slog::Level, bridge_for: Option<&str>) -> (Logger, LogGuard) {
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match format {
        LogFormat::Term => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            Box::new(slog_term::FullFormat::new(decorator).build().fuse())
        }
        LogFormat::Json => {
            Box::new(slog_json::Json::new(std::io::stderr()).set_newlines(true).add_default_keys().build().fuse())
        }
    };
    // A full channel drops records (counted, and reported once there is room) rather than block the
    // caller.
    let (core, async_guard) =
        AsyncCore::custom(drain).chan_size(16 * 1024).thread_name("jobqueue-log".into()).build_with_guard();
    let drain = slog::LevelFilter::new(Dropping::new(core, &RECORDS_DROPPED).fuse(), level).fuse();
    let root = Logger::root(drain, o!());

    let scope = if let Some(instance) = bridge_for {
        let guard =
            slog_scope::set_global_logger(root.new(o!("instance" => instance.to_string(), "component" => "lib")));
        let _ = slog_stdlog::init_with_level(log_level(level));
        // tokio-postgres and hyper are chatty below info; keep them to warnings unless asked.
        log::set_max_level(if level >= slog::Level::Debug { log::LevelFilter::Debug } else { log::LevelFilter::Warn });
        Some(guard)
    } else {
        None
    };
    (root, LogGuard { _scope: scope, _async: Some(async_guard) })
}

/// Records dropped by every root logger of this process, for `jobqueue_log_records_dropped_total`.
static RECORDS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log records dropped so far because the log channel was full.
pub fn records_dropped() -> u64 {
    RECORDS_DROPPED.load(Ordering::Relaxed)
}

/// slog-async's non-blocking channel, counting what it drops. slog-async's own `Async` drain drops and
/// reports too, but keeps its count private; this is the same policy over its `AsyncCore`, which
/// answers `Full` instead: the record is counted in `total` (the metric) and in `pending`, and the
/// next record that finds room is preceded by one error line saying how many were lost.
pub struct Dropping<D> {
    inner: D,
    pending: AtomicUsize,
    total: &'static AtomicU64,
}

impl<D: Drain<Ok = (), Err = AsyncError>> Dropping<D> {
    pub fn new(inner: D, total: &'static AtomicU64) -> Self {
        Dropping { inner, pending: AtomicUsize::new(0), total }
    }

    fn dropped(&self, n: usize) {
        self.pending.fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl<D: Drain<Ok = (), Err = AsyncError>> Drain for Dropping<D> {
    type Ok = ();
    type Err = AsyncError;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), AsyncError> {
        let lost = self.pending.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let report = self.inner.log(
                &slog::record!(
                    slog::Level::Error,
                    "",
                    &format_args!("log records dropped: the log channel was full"),
                    slog::b!("count" => lost)
                ),
                values,
            );
            match report {
                Ok(()) => {}
                // Still full: the report waits for the next record, which is dropped too.
                Err(AsyncError::Full) => {
                    self.pending.fetch_add(lost, Ordering::Relaxed);
                    self.dropped(1);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        match self.inner.log(record, values) {
            Err(AsyncError::Full) => {
                self.dropped(1);
                Ok(())
            }
            other => other,
        }
    }
}

fn log_level(level: slog::Level) -> log::Level {
    match level {
        slog::Level::Critical | slog::Level::Error => log::Level::Error,
        slog::Level::Warning => log::Level::Warn,
        slog::Level::Info => log::Level::Info,
        slog::Level::Debug => log::Level::Debug,
        slog::Level::Trace => log::Level::Trace,
    }
}

/// A logger that discards everything, for library users and tests that do not care.
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    /// The log thread's drain: announces each record it is handed, then waits for permission, so the
    /// test knows exactly when the channel is empty and when it is full.
    struct Gate {
        entered: Mutex<mpsc::Sender<String>>,
        proceed: Mutex<mpsc::Receiver<()>>,
    }

    impl Drain for Gate {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, record: &Record, _: &OwnedKVList) -> Result<(), slog::Never> {
            struct Count(String);
            impl slog::Serializer for Count {
                fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
                    if key == "count" {
                        self.0 = val.to_string();
                    }
                    Ok(())
                }
            }
            let mut count = Count(String::new());
            let _ = slog::KV::serialize(&record.kv(), record, &mut count);
            let _ = self.entered.lock().unwrap().send(format!("{} {}", record.msg(), count.0).trim().to_string());
            let _ = self.proceed.lock().unwrap().recv();
            Ok(())
        }
    }

    #[test]
    fn a_full_channel_drops_counts_and_reports() {
        let (entered_tx, entered) = mpsc::channel();
        let (proceed, proceed_rx) = mpsc::channel();
        let gate = Gate { entered: Mutex::new(entered_tx), proceed: Mutex::new(proceed_rx) };
        let total: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let (core, guard) = AsyncCore::custom(gate).chan_size(2).build_with_guard();
        let drain = Arc::new(Dropping::new(core, total));
        let log = Logger::root(drain.clone().fuse(), o!());

        slog::info!(log, "first");
        // The log thread holds "first"; the channel (two slots) is empty.
        assert_eq!(entered.recv().unwrap(), "first");
        slog::info!(log, "a");
        slog::info!(log, "b"); // the channel is full
        for i in 0..4 {
            slog::info!(log, "lost"; "i" => i);
        }
        assert_eq!(total.load(Ordering::Relaxed), 4, "four records found the channel full");

        for next in ["a", "b"] {
            proceed.send(()).unwrap();
            assert_eq!(entered.recv().unwrap(), next);
        }
        // The thread holds "b" and the channel is empty: the next record is preceded by the report.
        slog::info!(log, "c");
        for next in ["log records dropped: the log channel was full 4", "c"] {
            proceed.send(()).unwrap();
            assert_eq!(entered.recv().unwrap(), next);
        }
        assert_eq!(total.load(Ordering::Relaxed), 4, "nothing else was dropped");
        drop(proceed);
        drop(log);
        drop(drain);
        drop(guard);
    }
}
