//! The HTTP/1.1 server loop: accepts connections and serves the warp filter on each with hyper.
//!
//! warp's own `serve` gives no hold on the things a server exposed to real clients must bound: how
//! many connections are open, how long a client may take to send its headers, how large they may be;
//! and it logs every client's misbehaviour (a reset, a half-sent request) at ERROR level without the
//! instance's name. This loop owns those decisions. Client misbehaviour is logged at debug level:
//! it is the client's problem, and a flood of it must not drown the log.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use slog::{debug, info, warn, Logger};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warp::reply::Response;
use warp::Filter;

use crate::config::HttpLimits;
use crate::supervisor::TaskResult;

/// Most header lines in one request.
const MAX_HEADERS: usize = 100;
/// Largest request head (request line and headers) hyper buffers, in bytes; a larger one gets a 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What a connection over the limit gets before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 79\r\n\r\n{\"error\": \"unavailable\", \"message\": \"too many open connections; try again later\"}";

/// Serves `filter` on `listener` until `shutdown`, then lets in-flight requests finish (at most
/// `drain`).
pub async fn serve<F>(
    listener: TcpListener,
    filter: F,
    limits: HttpLimits,
    drain: Duration,
    shutdown: CancellationToken,
    log: Logger,
) -> TaskResult
where
    F: Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let log = log.new(slog::o!("component" => "http"));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    accept_backoff = Duration::from_millis(10);
                    pair
                }
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close rather than spin.
                    warn!(log, "cannot accept connections"; "err" => %e, "retry_in_ms" => accept_backoff.as_millis() as u64);
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        // Reap connections that have ended, so the set stays as large as what is open.
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(log, "connection refused: too many open"; "peer" => %peer);
            // A fresh socket's send buffer is empty: this never blocks. Whatever is not written is lost
            // with the connection, which is what the client would get anyway.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(warp::service(filter.clone()));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            // Runs while a connection waits for a request's head, idle keep-alive included.
            .header_read_timeout(limits.header_timeout)
            .max_headers(MAX_HEADERS)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let log = log.clone();
        connections.spawn(async move {
            if let Err(e) = conn.await {
                debug!(log, "connection ended with an error"; "peer" => %peer, "err" => %e);
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        info!(log, "waiting for open connections to finish"; "count" => open);
    }
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!(log, "connections still open after the drain; closing them"; "count" => connections.len());
    }
    connections.shutdown().await;
    Ok(())
}

/// Errors of one incoming connection that `accept` reports: nothing is wrong with the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
