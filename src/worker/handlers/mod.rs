//! The handlers `jobqueue serve` can run for a queue, chosen by `handler = ...` in the config file:
//! `builtin` (the original service's), [`webhook`], [`command`] and [`drill`] (for fault drills). Rust
//! programs embedding the library register [`Handler`]s of their own instead.

pub mod command;
pub mod drill;
pub mod webhook;

use std::time::Duration;

use crate::config::HandlerSpec;
use crate::worker::handler::{default_handler, Handler, HandlerFuture, JobContext};

/// A handler of any kind the config file can name.
pub struct ServerHandler(Box<dyn Handler>);

impl Handler for ServerHandler {
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        self.0.handle(ctx)
    }
}

/// The handler `spec` describes. Webhook queues share `client`.
pub fn for_spec(spec: &HandlerSpec, client: &reqwest::Client) -> Result<ServerHandler, String> {
    Ok(ServerHandler(match spec {
        HandlerSpec::Builtin => Box::new(default_handler()),
        HandlerSpec::Webhook { url, secret } => {
            let url = reqwest::Url::parse(url).map_err(|e| format!("webhook url: {e}"))?;
            Box::new(webhook::WebhookHandler::new(client.clone(), url, secret.clone()))
        }
        HandlerSpec::Command { argv } => Box::new(command::CommandHandler::new(argv.clone())),
        HandlerSpec::Drill => Box::new(drill::DrillHandler),
    }))
}

/// The HTTP client of every webhook queue: rustls with the bundled and the system's roots (so a
/// receiver behind a private CA installed on the host works), pooled connections, no redirects (a
/// POST that gets redirected is a configuration mistake to report, not to guess around).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("jobqueue/", env!("CARGO_PKG_VERSION")))
        .build()
}
