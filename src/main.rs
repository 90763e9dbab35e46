//! The `jobqueue` binary: parses the configuration and wires the library together.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use jobqueue::config::{Cli, Command};
use jobqueue::worker::handlers;
use jobqueue::{logging, service, Builder};
use slog::{error, info};

/// mimalloc rather than glibc's malloc: in a drain of no-op jobs glibc's allocator (its free-list
/// consolidation above all) was a quarter of this process's CPU; see docs/performance.md. The
/// library leaves the choice to programs that embed it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A missing .env is normal; variables already set in the environment win over it.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let config = match cli.settings.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jobqueue: {e}");
            return ExitCode::from(2);
        }
    };
    let (root, _log_guard) = logging::init(config.log_format, config.log_level, Some(&config.instance_id));
    // The binary's own lines carry `instance` too; the service adds it to `root` itself.
    let log = root.new(slog::o!("instance" => config.instance_id.clone()));
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(config.runtime_threads).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                error!(log, "cannot start the runtime"; "err" => %e);
                return ExitCode::FAILURE;
            }
        };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Migrate { baseline } => {
                let applied = if baseline {
                    service::migrate_baseline(&config, &log).await?
                } else {
                    service::migrate(&config, &log).await?
                };
                info!(log, "migrations up to date"; "applied_now" => applied.versions.len());
                Ok(())
            }
            Command::Serve => {
                // Each served queue gets the handler its config file entry names (builtin when none
                // does); Rust programs embedding the library register handlers of their own.
                let client = handlers::http_client()?;
                info!(log, "runtime"; "threads" => config.runtime_threads);
                let mut builder = Builder::new(config.clone()).logger(root.clone());
                for q in &config.queues {
                    let spec = config.handler(&q.name);
                    let handler = handlers::for_spec(spec, &client).map_err(anyhow::Error::msg)?;
                    info!(log, "queue handler"; "queue" => &q.name, "handler" => spec.kind());
                    builder = builder.handler(&q.name, handler);
                }
                // A task that failed ends the process non-zero, so that an orchestrator restarts it.
                builder.start().await?.run_until_signal().await?;
                Ok(())
            }
            Command::Bench(args) => jobqueue::bench::run(&config, &args, &log).await,
            Command::Healthcheck { timeout } => {
                let timeout = jobqueue::config::parse_duration(&timeout)
                    .ok_or_else(|| anyhow::anyhow!("--timeout={timeout:?}: expected a duration such as 3s"))?;
                jobqueue::healthcheck::run(&config, timeout).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(log, "jobqueue failed"; "err" => e.to_string());
            drop(_log_guard);
            eprintln!("jobqueue: {e}");
            ExitCode::FAILURE
        }
    }
}
