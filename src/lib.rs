//! jobqueue: a durable job queue on PostgreSQL.
//!
//! The `jobs` table is the queue. Inserting a row (over HTTP or with plain SQL) fires a NOTIFY that
//! wakes workers, who claim rows with `FOR UPDATE SKIP LOCKED` under a lease. See
//! `docs/architecture.md` for the whole picture.
//!
//! Embedding the engine with handlers of your own:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use jobqueue::{Builder, Config, JobContext, HandlerError};
//! let service = Builder::new(Config::default())
//!     .handler("default", |ctx: JobContext| async move {
//!         Ok::<_, HandlerError>(serde_json::json!({"echo": ctx.job.payload}))
//!     })
//!     .start()
//!     .await?;
//! service.stop().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod db;
pub mod enqueue;
pub mod healthcheck;
pub mod instances;
pub mod job;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod maintenance;
pub mod metrics;
pub mod remote;
pub mod schedule;
pub mod scheduler;
pub mod service;
pub mod supervisor;
pub mod ui;
pub mod wait_series;
pub mod waiters;
pub mod worker;

pub use config::{Config, QueueConfig};
pub use job::{Job, JobStatus, NewJob, RetryPolicy};
pub use service::{Builder, Service, StartError};
pub use worker::handler::{default_handler, Handler, HandlerError, HandlerResult, JobContext};
