//! The root logger: human-readable on a terminal, JSON with `LOG_FORMAT=json`, always behind
//! slog-async so that a slow terminal or pipe never blocks a worker.
//!
//! Libraries that log through the `log` facade (tokio-postgres) or `tracing` (warp, which forwards to
//! `log` when no subscriber is installed) end up in the same drain via slog-stdlog.
//!
//! Stable keys: `job_id`, `queue`, `attempt`, `status`, `duration_ms`, `err`, `component`.

use slog::{o, Drain, Logger};

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
    // A full channel drops records (and reports how many) rather than block the caller.
    let (async_drain, async_guard) = slog_async::Async::new(drain)
        .chan_size(16 * 1024)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .thread_name("jobqueue-log".into())
        .build_with_guard();
    let drain = slog::LevelFilter::new(async_drain.fuse(), level).fuse();
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
