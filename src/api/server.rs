//! The HTTP/1.1 server loop: accepts connections and serves the warp filter on each with hyper.
//!
//! warp's own `serve` gives no hold on the things a server exposed to real clients must bound: how
//! many connections are open, how long a client may take to send its headers, how large they may be;
//! and it logs every client's misbehaviour (a reset, a half-sent request) at ERROR level without the
//! instance's name. This loop owns those decisions. Client misbehaviour is the client's problem, and a
//! flood of it must not drown the log: it goes to [`super::noise`], which logs each kind at info level
//! at most once per window, with a count of what it did not show.

use std::sync::atomic::{AtomicBool, Ordering};
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

use super::framing::{Verdicts, Watch};
use super::noise::{ClientFault, Misbehaviour, Noise};
use crate::config::HttpLimits;
use crate::supervisor::TaskResult;
use hyper::service::Service as _;
use warp::Reply;

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
    let noise = Arc::new(Noise::new(log.clone()));
    let mut flush = tokio::time::interval(super::noise::WINDOW);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = flush.tick() => {
                noise.flush(false);
                continue;
            }
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
            noise.report(Misbehaviour::OverConnectionLimit, peer, &limits.max_connections);
            // A fresh socket's send buffer is empty: this never blocks. Whatever is not written is lost
            // with the connection, which is what the client would get anyway.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let verdicts = Verdicts::default();
        // Set once this connection's misbehaviour was reported, so that the error hyper then ends the
        // connection with (a body cut off) does not count the same client twice.
        let reported = Arc::new(AtomicBool::new(false));
        let warp_service = TowerToHyperService::new(warp::service(filter.clone()));
        let service = {
            let (verdicts, noise, reported) = (verdicts.clone(), noise.clone(), reported.clone());
            hyper::service::service_fn(move |req| {
                // Decided beneath hyper, which drops Content-Length before the service could see both.
                let ambiguous = verdicts.next();
                let answer = (!ambiguous).then(|| warp_service.call(req));
                let (noise, reported) = (noise.clone(), reported.clone());
                async move {
                    let Some(answer) = answer else {
                        reported.store(true, Ordering::Relaxed);
                        noise.report(Misbehaviour::Malformed, peer, &"both Transfer-Encoding and Content-Length");
                        return Ok(ambiguous_request());
                    };
                    let resp = answer.await;
                    if let Ok(resp) = &resp {
                        if let Some(ClientFault(what)) = resp.extensions().get::<ClientFault>() {
                            reported.store(true, Ordering::Relaxed);
                            noise.report(*what, peer, &resp.status());
                        }
                    }
                    resp
                }
            })
        };
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            // Runs while a connection waits for a request's head, idle keep-alive included.
            .header_read_timeout(limits.header_timeout)
            .max_headers(MAX_HEADERS)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(Watch::new(stream, verdicts.clone())), service));
        let (log, noise) = (log.clone(), noise.clone());
        connections.spawn(async move {
            if let Err(e) = conn.await {
                match misbehaviour(&e, verdicts.mid_head()) {
                    Some(what) if !reported.load(Ordering::Relaxed) => noise.report(what, peer, &e),
                    _ => debug!(log, "connection ended with an error"; "peer" => %peer, "err" => %e),
                }
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
    // The tail of a flood, whatever the window: the last word on it before the instance goes.
    noise.flush(true);
    Ok(())
}

/// What the error a connection ended with says about its client, if anything. A header timeout with
/// nothing of a head received is an idle keep-alive connection being closed: ordinary, not reported.
fn misbehaviour(e: &hyper::Error, mid_head: bool) -> Option<Misbehaviour> {
    if e.is_timeout() {
        mid_head.then_some(Misbehaviour::SlowHead)
    } else if e.is_parse() || e.is_parse_too_large() {
        // hyper has answered 400 or 431.
        Some(Misbehaviour::Malformed)
    } else {
        // Closed mid-request, reset, a broken pipe while we answered.
        Some(Misbehaviour::BrokenOff)
    }
}

/// The answer to a request with both Transfer-Encoding and Content-Length (see [`super::framing`]):
/// refused, and the connection closed after it, as RFC 9112 asks of a server that may sit behind a proxy.
fn ambiguous_request() -> Response {
    let body = serde_json::json!({
        "error": "bad_request",
        "message": "a request may not have both Transfer-Encoding and Content-Length",
    });
    let mut resp =
        warp::reply::with_status(warp::reply::json(&body), warp::http::StatusCode::BAD_REQUEST).into_response();
    resp.headers_mut().insert(warp::http::header::CONNECTION, warp::http::HeaderValue::from_static("close"));
    resp
}

/// Errors of one incoming connection that `accept` reports: nothing is wrong with the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
