//! The OpenAPI 3.1 description of the API, `GET /openapi.json`.
//!
//! Written by hand (`openapi.json` beside this file, embedded at build time) rather than generated:
//! the router is one `match` on path segments, which no generator can read. What keeps the two in
//! step is [`ROUTES`]: the test `tests/openapi.rs` requires the spec to list exactly these
//! operations, and the router to answer each of them (and only them, with a 405 naming the same
//! methods otherwise). Adding a route means adding it to the router, to `ROUTES` and to the spec.

use warp::http::{header, HeaderValue};
use warp::reply::Response;

/// The document, as served.
pub const SPEC: &str = include_str!("openapi.json");

/// Every operation of the router, as (method, path template). The one list the spec is checked
/// against. `/ui` (the dashboard's pages, assets and sign-in) is HTML for people and stays out of the
/// spec; the JSON its charts read, `GET /stats/history`, is part of the API and in it.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/stats"),
    ("GET", "/stats/history"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/whoami"),
    ("GET", "/jobs"),
    ("POST", "/jobs"),
    ("POST", "/jobs/batch"),
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/cancel"),
    ("POST", "/jobs/{id}/retry"),
    ("POST", "/jobs/{id}/heartbeat"),
    ("POST", "/jobs/{id}/complete"),
    ("POST", "/jobs/{id}/fail"),
    ("POST", "/jobs/{id}/snooze"),
    ("POST", "/jobs/{id}/release"),
    ("GET", "/queues"),
    ("POST", "/queues/{queue}/claim"),
    ("POST", "/queues/{queue}/pause"),
    ("POST", "/queues/{queue}/resume"),
    ("GET", "/schedules"),
    ("GET", "/schedules/{name}"),
    ("PUT", "/schedules/{name}"),
    ("DELETE", "/schedules/{name}"),
    ("POST", "/schedules/{name}/pause"),
    ("POST", "/schedules/{name}/resume"),
    ("POST", "/schedules/{name}/trigger"),
];

pub fn document() -> Response {
    let mut resp = Response::new(SPEC.into());
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
