//! Who may call what: the scope each route needs, the bearer-token check, CORS, and the rule that
//! state-changing requests are JSON.
//!
//! One table ([`need`]) says what every route requires; a route it does not list requires `admin`, so
//! a route added without thought is closed, not open.

use warp::http::{header, HeaderMap, HeaderValue, Method};
use warp::reply::Response;

use super::error::ApiError;
use crate::auth::{Auth, Denied, Scope};

/// What a request must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: liveness and readiness probes, the dashboard's static files, CORS preflights.
    Public,
    /// Any valid token (`GET /whoami`).
    Authenticated,
    Scope(Scope),
}

/// The table of routes and what each needs.
pub fn need(method: &Method, segments: &[&str]) -> Need {
    let m = method;
    match segments {
        ["healthz"] | ["readyz"] => Need::Public,
        _ if m == Method::OPTIONS => Need::Public,
        ["whoami"] => Need::Authenticated,
        ["stats"]
        | ["jobs"]
        | ["jobs", _]
        | ["queues"]
        | ["metrics"]
        | ["openapi.json"]
        | ["schedules"]
        | ["schedules", _]
            if m == Method::GET =>
        {
            Need::Scope(Scope::Read)
        }
        // Running a schedule now creates one job, as POST /jobs does; changing schedules (PUT,
        // DELETE, pause, resume) is administration, like pausing a queue, and falls to the default.
        ["jobs"] | ["jobs", "batch"] | ["jobs", _, "cancel" | "retry"] | ["schedules", _, "trigger"]
            if m == Method::POST =>
        {
            Need::Scope(Scope::Write)
        }
        ["queues", _, "claim"] | ["jobs", _, "heartbeat" | "complete" | "fail" | "snooze" | "release"]
            if m == Method::POST =>
        {
            Need::Scope(Scope::Worker)
        }
        _ => Need::Scope(Scope::Admin),
    }
}

/// Checks the request's token against what the route needs. With no token configured, everything is
/// allowed. Returns the token's scopes (all of them when the API is open).
pub fn authorize(auth: &Auth, headers: &HeaderMap, needed: Need) -> Result<Vec<Scope>, ApiError> {
    if auth.is_open() {
        return Ok(Scope::ALL.to_vec());
    }
    if needed == Need::Public {
        return Ok(Vec::new());
    }
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let scopes = auth.check(header).map_err(|denied| match denied {
        Denied::Missing => ApiError::unauthorized("this endpoint needs Authorization: Bearer <token>"),
        Denied::Invalid => ApiError::unauthorized("the token is not valid"),
    })?;
    match needed {
        Need::Scope(s) if !scopes.iter().any(|have| have.grants(s)) => {
            Err(ApiError::forbidden(format!("this endpoint needs a token with the {} scope", s.as_str())))
        }
        _ => Ok(scopes),
    }
}

/// State-changing requests must be JSON (or carry no content type): a web page can make a browser
/// send a form (`application/x-www-form-urlencoded`, `multipart/form-data`, `text/plain`) to any site
/// without asking, but not JSON. So another site cannot cancel or create jobs through a visitor's
/// browser, whatever the API's authentication.
pub fn check_content_type(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if *method != Method::POST && *method != Method::PUT {
        return Ok(());
    }
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(ct) => {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let mime = ct.split(';').next().unwrap_or("").trim();
            if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
                Ok(())
            } else {
                Err(ApiError::unsupported_media_type(if mime.is_empty() { "nothing" } else { mime }))
            }
        }
    }
}

/// The request's `Origin` if CORS allows it.
pub fn allowed_origin<'a>(origins: &[String], headers: &'a HeaderMap) -> Option<&'a str> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    origins.iter().any(|o| o == origin).then_some(origin)
}

/// The answer to a CORS preflight from an allowed origin.
pub fn preflight(origin: &str) -> Response {
    let mut resp = Response::new(Default::default());
    *resp.status_mut() = warp::http::StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    add_cors(h, origin);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, PUT, DELETE"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, idempotency-key"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    resp
}

pub fn add_cors(headers: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_what_the_table_says_and_unknown_ones_need_admin() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(need(&get, &["healthz"]), Need::Public);
        assert_eq!(need(&get, &["jobs", "x"]), Need::Scope(Scope::Read));
        assert_eq!(need(&post, &["jobs", "x", "cancel"]), Need::Scope(Scope::Write));
        assert_eq!(need(&post, &["queues", "q", "claim"]), Need::Scope(Scope::Worker));
        assert_eq!(need(&post, &["queues", "q", "pause"]), Need::Scope(Scope::Admin));
        assert_eq!(need(&get, &["schedules", "s"]), Need::Scope(Scope::Read));
        assert_eq!(need(&post, &["schedules", "s", "trigger"]), Need::Scope(Scope::Write));
        assert_eq!(need(&Method::PUT, &["schedules", "s"]), Need::Scope(Scope::Admin));
        assert_eq!(need(&post, &["schedules", "s", "pause"]), Need::Scope(Scope::Admin));
        assert_eq!(need(&Method::DELETE, &["jobs", "x"]), Need::Scope(Scope::Admin));
        assert_eq!(need(&get, &["something", "new"]), Need::Scope(Scope::Admin));
    }
}
