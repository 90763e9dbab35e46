//! The HTTP API (warp).
//!
//! Routing is one `match` on method and path segments rather than a tree of combined warp filters:
//! warp merges the rejections of sibling filters by a priority of its own, which turns an unknown path
//! into a 405 or a bad body into a 404 depending on route order. Here every request reaches exactly
//! one handler or one error, so 400/404/405/413/415 are exact and every error has the same JSON shape
//! (see [`error`]). The API inserts and reads jobs; it claims them only on behalf of remote workers
//! (`remote`, the lease protocol), never for this instance's own engine.

pub(crate) mod access;
pub mod error;
mod framing;
pub(crate) mod jobs;
pub mod noise;
pub mod openapi;
mod queues;
mod remote;
mod schedules;
pub mod server;
mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use slog::{debug, info, Logger};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Buf, Filter, Reply};

use crate::db::{queries, Pool};
use crate::waiters::Waiters;
use crate::worker::Health;
use error::ApiError;

/// Most jobs in one `POST /jobs/batch`.
pub const MAX_BATCH: usize = 10_000;
/// Longest `?wait=` a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Largest `limit` of `GET /jobs`.
pub const MAX_LIMIT: i64 = 1000;

pub struct ApiState {
    pub pool: Pool,
    /// Single-job inserts, coalesced into shared statements and commits.
    pub enqueuer: Arc<crate::enqueue::Enqueuer>,
    pub waiters: Arc<Waiters>,
    /// Whether the engine runs, for `/healthz`.
    pub health: Arc<Health>,
    /// Remote workers' claims and lease calls.
    pub remote: Arc<crate::remote::Remote>,
    pub max_body_bytes: u64,
    /// Longest a request may spend on the database (waiting for a pooled connection included); past
    /// it the answer is a 503. The server cancels the statement itself at its `statement_timeout`.
    pub request_deadline: Duration,
    /// Time a client has to send a request's body.
    pub body_timeout: Duration,
    /// API tokens; open when none is configured.
    pub auth: crate::auth::Auth,
    /// Origins allowed to call from a browser (CORS); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Cancelled on shutdown: requests waiting for a job answer with what they have.
    pub shutdown: CancellationToken,
    pub log: Logger,
    /// In-memory gauges sampled by `/metrics` (worker slots, pool); None serves the recorder alone.
    pub metrics: Option<Arc<crate::metrics::Sampler>>,
    /// What the dashboard and `/stats/history` say about this instance.
    pub instance: crate::ui::InstanceInfo,
}

/// The whole API as one warp filter. Its only possible rejection is warp's own (a body taken twice),
/// which cannot happen here: every request is answered by [`route`].
pub fn routes(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync {
    let raw_query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::method()
        .and(warp::path::full())
        .and(raw_query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(move |method: Method, path: FullPath, query: String, headers: HeaderMap, body| {
            let state = state.clone();
            async move {
                let started = Instant::now();
                let query = serde_urlencoded::from_str(&query).map_err(|e| e.to_string());
                let req = Request { method, path: path.as_str().to_string(), query, headers };
                let (mut resp, fault) = match route(&state, &req, body).await {
                    Ok(resp) => (resp, None),
                    Err(e) => {
                        let fault = e.client_fault();
                        (e.into_response(&state.log), fault)
                    }
                };
                if let Some(origin) = access::allowed_origin(&state.cors_origins, &req.headers) {
                    access::add_cors(resp.headers_mut(), origin);
                }
                // A client that broke off mid-request or sent its body too slowly is its own problem:
                // a debug line here, and the server reports it, rate-limited (see `noise`), so that a
                // flood of them (a slowloris run) cannot flood the log.
                let (status, latency_ms) =
                    (resp.status().as_u16(), (started.elapsed().as_secs_f64() * 1e6).round() / 1e3);
                let path = req.path.as_str();
                crate::metrics::http_request(
                    crate::metrics::route_template(path),
                    status,
                    started.elapsed().as_secs_f64(),
                );
                if let Some(fault) = fault {
                    resp.extensions_mut().insert(noise::ClientFault(fault));
                    debug!(state.log, "request"; "method" => req.method.as_str(), "path" => path,
                           "status" => status, "latency_ms" => latency_ms);
                } else {
                    info!(state.log, "request"; "method" => req.method.as_str(), "path" => path,
                          "status" => status, "latency_ms" => latency_ms);
                }
                resp
            }
        })
}

pub(crate) struct Request {
    pub(crate) method: Method,
    pub(crate) path: String,
    /// The query string's pairs, parsed once; an error is reported only to a route that reads it.
    query: Result<Vec<(String, String)>, String>,
    pub(crate) headers: HeaderMap,
}

impl Request {
    /// The last value given for `name`.
    pub(crate) fn param(&self, name: &str) -> Result<Option<String>, ApiError> {
        let pairs = self.query.as_ref().map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
        Ok(pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }
}

async fn route<S, B>(state: &ApiState, req: &Request, body: S) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let path = req.path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let m = &req.method;
    if m == Method::OPTIONS {
        if let Some(origin) = access::allowed_origin(&state.cors_origins, &req.headers) {
            return Ok(access::preflight(origin));
        }
    }
    // The dashboard answers its pages in HTML, errors included; it authorizes through the same table.
    if segments.first() == Some(&"ui") {
        return crate::ui::route(state, req, &segments, body).await;
    }
    let scopes = access::authorize(&state.auth, m, &req.headers, access::need(m, &segments))?;
    access::check_content_type(m, &req.headers)?;
    match segments.as_slice() {
        ["whoami"] if m == Method::GET => {
            let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            Ok(reply(StatusCode::OK, &json!({"auth": !state.auth.is_open(), "scopes": scopes})))
        }
        ["whoami"] => Err(ApiError::method_not_allowed("GET")),
        ["healthz"] if m == Method::GET => healthz(state),
        ["healthz"] => Err(ApiError::method_not_allowed("GET")),
        ["readyz"] if m == Method::GET => ready(state).await,
        ["readyz"] => Err(ApiError::method_not_allowed("GET")),
        ["stats"] if m == Method::GET => within(state, stats::stats(state)).await,
        ["stats"] => Err(ApiError::method_not_allowed("GET")),
        ["stats", "history"] if m == Method::GET => within(state, stats::history(state)).await,
        ["stats", "history"] => Err(ApiError::method_not_allowed("GET")),
        ["metrics"] if m == Method::GET => metrics(state),
        ["metrics"] => Err(ApiError::method_not_allowed("GET")),
        ["openapi.json"] if m == Method::GET => Ok(openapi::document()),
        ["openapi.json"] => Err(ApiError::method_not_allowed("GET")),
        ["jobs"] if m == Method::GET => within(state, jobs::list(state, req)).await,
        ["jobs"] if m == Method::POST => {
            let body = read_json_body(state, req, body).await?;
            within(state, jobs::create(state, req, body)).await
        }
        ["jobs"] => Err(ApiError::method_not_allowed("GET, POST")),
        ["jobs", "batch"] if m == Method::POST => {
            let body = read_json_body(state, req, body).await?;
            within(state, jobs::create_batch(state, body)).await
        }
        ["jobs", "batch"] => Err(ApiError::method_not_allowed("POST")),
        // Not bounded as a whole: `?wait=` holds the request open on purpose; each read is bounded.
        ["jobs", id] if m == Method::GET => jobs::get(state, req, parse_id(id)?).await,
        ["jobs", _] => Err(ApiError::method_not_allowed("GET")),
        ["jobs", id, "cancel"] if m == Method::POST => within(state, jobs::cancel(state, parse_id(id)?)).await,
        ["jobs", id, "retry"] if m == Method::POST => within(state, jobs::retry(state, parse_id(id)?)).await,
        ["jobs", _, "cancel" | "retry"] => Err(ApiError::method_not_allowed("POST")),
        ["jobs", id, call @ ("heartbeat" | "complete" | "fail" | "snooze" | "release")] if m == Method::POST => {
            let (id, body) = (parse_id(id)?, read_json_body(state, req, body).await?);
            within(state, remote::lease_call(state, id, call, body)).await
        }
        ["jobs", _, "heartbeat" | "complete" | "fail" | "snooze" | "release"] => {
            Err(ApiError::method_not_allowed("POST"))
        }
        ["queues"] if m == Method::GET => within(state, queues::list(state)).await,
        ["queues"] => Err(ApiError::method_not_allowed("GET")),
        // Not bounded as a whole: `wait` holds the request open on purpose; each claim is bounded.
        ["queues", queue, "claim"] if m == Method::POST => {
            remote::claim(state, queues::name(queue)?, read_json_body(state, req, body).await?).await
        }
        ["queues", queue, action @ ("pause" | "resume")] if m == Method::POST => {
            within(state, queues::set_paused(state, queues::name(queue)?, *action == "pause")).await
        }
        ["queues", _, "claim" | "pause" | "resume"] => Err(ApiError::method_not_allowed("POST")),
        ["schedules"] if m == Method::GET => within(state, schedules::list(state)).await,
        ["schedules"] => Err(ApiError::method_not_allowed("GET")),
        ["schedules", name] if m == Method::GET => within(state, schedules::get(state, schedules::name(name)?)).await,
        ["schedules", name] if m == Method::PUT => {
            let name = schedules::name(name)?;
            let body = read_json_body(state, req, body).await?;
            within(state, schedules::put(state, name, body)).await
        }
        ["schedules", name] if m == Method::DELETE => {
            within(state, schedules::delete(state, schedules::name(name)?)).await
        }
        ["schedules", _] => Err(ApiError::method_not_allowed("GET, PUT, DELETE")),
        ["schedules", name, action @ ("pause" | "resume")] if m == Method::POST => {
            within(state, schedules::set_paused(state, schedules::name(name)?, *action == "pause")).await
        }
        ["schedules", name, "trigger"] if m == Method::POST => {
            within(state, schedules::trigger(state, schedules::name(name)?)).await
        }
        ["schedules", _, "pause" | "resume" | "trigger"] => Err(ApiError::method_not_allowed("POST")),
        _ => Err(ApiError::not_found(format!("no route for {}", req.path))),
    }
}

/// Runs a handler's database work under the request deadline: a database that does not answer (a lock
/// held by someone else, an overloaded server) gets the client a 503, not a hang.
pub(crate) async fn within<T>(
    state: &ApiState,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(state.request_deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::unavailable(format!(
            "the database did not answer within {}; try again",
            humantime::format_duration(state.request_deadline)
        ))
        .retry_after(1)),
    }
}

fn healthz(state: &ApiState) -> Result<Response, ApiError> {
    if state.health.engine_running() {
        Ok(reply(StatusCode::OK, &json!({"status": "ok"})))
    } else {
        Err(ApiError::unavailable("the engine is not running"))
    }
}

pub(crate) fn reply(status: StatusCode, body: &impl serde::Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

pub(crate) fn parse_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::bad_request(format!("invalid job id {s:?}: expected a UUID")))
}

/// Reads a JSON body: content type checked, size bounded (by Content-Length up front and by counting
/// while reading, for chunked bodies), syntax checked.
pub(crate) async fn read_json_body<S, B>(state: &ApiState, req: &Request, body: S) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    if let Some(ct) = req.headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or("").trim();
        if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
            return Err(ApiError::unsupported_media_type(if mime.is_empty() { "nothing" } else { mime }));
        }
    }
    let limit = state.max_body_bytes;
    let declared = req.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = std::pin::pin!(body);
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(state, body.as_mut(), 0).await);
    }
    let mut buf = BytesMut::new();
    let read = tokio::time::timeout(state.body_timeout, async {
        while let Some(chunk) = body.next().await {
            let mut chunk =
                chunk.map_err(|e| ApiError::client_gone(format!("could not read the request body: {e}")))?;
            if (buf.len() + chunk.remaining()) as u64 > limit {
                return Err(too_large(state, body.as_mut(), buf.len() + chunk.remaining()).await);
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                let n = part.len();
                buf.put_slice(part);
                chunk.advance(n);
            }
        }
        Ok(())
    });
    match read.await {
        Ok(result) => result?,
        Err(_) => return Err(ApiError::request_timeout(state.body_timeout)),
    }
    if buf.is_empty() {
        return Err(ApiError::malformed_json("request body is empty: expected a JSON object"));
    }
    Ok(buf.freeze())
}

/// The 413 for a body over the limit, after reading and discarding what the client still sends (up to
/// a bound of its own, briefly): a server that answers and closes while the client is still writing
/// makes the client see a broken pipe instead of the 413.
async fn too_large<S, B>(state: &ApiState, mut body: std::pin::Pin<&mut S>, mut seen: usize) -> ApiError
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let bound = (state.max_body_bytes as usize).saturating_mul(4).max(DISCARD_MIN);
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while seen <= bound {
            match body.next().await {
                Some(Ok(chunk)) => seen += chunk.remaining(),
                _ => break,
            }
        }
    })
    .await;
    ApiError::payload_too_large(state.max_body_bytes)
}

/// What [`too_large`] reads at least, and at most how long.
const DISCARD_MIN: usize = 16 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(5);

/// Deserializes with the path of the offending field in the message, e.g. `priority: invalid type`.
pub(crate) fn decode<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (prefix.is_empty(), path.as_str()) {
            (true, ".") => String::new(),
            (true, p) => format!("{p}: "),
            (false, ".") => format!("{prefix}: "),
            (false, p) => format!("{prefix}.{p}: "),
        };
        ApiError::bad_request(format!("{field}{}", e.into_inner()))
    })
}

pub(crate) fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::malformed_json(format!("malformed JSON: {e}")))
}

async fn ready(state: &ApiState) -> Result<Response, ApiError> {
    let check = async {
        let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
        queries::ping(&*client).await
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(())) => Ok(reply(StatusCode::OK, &json!({"status": "ready"}))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::unavailable("database did not answer within 3s")),
    }
}

/// The Prometheus exposition. Never touches the database: the job gauges are refreshed in the
/// background (see [`crate::metrics::refresh`]).
fn metrics(state: &ApiState) -> Result<Response, ApiError> {
    let text = match &state.metrics {
        Some(sampler) => sampler.render(),
        None => crate::metrics::handle().map(|h| h.render()),
    }
    .ok_or_else(|| ApiError::unavailable("no metrics recorder: the embedding program installed its own"))?;
    let mut resp = Response::new(text.into());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(resp)
}
