//! Who may call what: the scope each route needs, the bearer-token check (or the dashboard's session
//! cookie), CORS, and the rule that state-changing requests are JSON.
//!
//! One table ([`need`]) says what every route requires; a route it does not list requires `admin`, so
//! a route added without thought is closed, not open.
//!
//! The dashboard's session cookie carries the same token as the header would. A browser attaches a
//! cookie by itself, so a request authenticated by the cookie alone that changes something must prove
//! it comes from the dashboard's own pages: its `Origin` must be this host (or the browser says
//! `Sec-Fetch-Site: same-origin`). Together with `SameSite=Strict` (the browser does not send the
//! cookie from other sites at all) and the JSON-only rule, another site cannot forge such a request.

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
        // The dashboard's static files, and signing in and out (which check the token themselves).
        ["ui", "assets", ..] | ["ui", "session"] => Need::Public,
        ["stats"]
        | ["stats", "history"]
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
        ["ui", ..] if m == Method::GET => Need::Scope(Scope::Read),
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

/// The dashboard's session cookie: the API token, percent-encoded.
pub const SESSION_COOKIE: &str = "jobqueue_session";

/// Checks the request's token (the `Authorization` header, else the session cookie) against what the
/// route needs. With no token configured, everything is allowed. Returns the token's scopes (all of
/// them when the API is open).
pub fn authorize(auth: &Auth, method: &Method, headers: &HeaderMap, needed: Need) -> Result<Vec<Scope>, ApiError> {
    if auth.is_open() {
        return Ok(Scope::ALL.to_vec());
    }
    if needed == Need::Public {
        return Ok(Vec::new());
    }
    let mut header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    if header.is_none() {
        if let Some(token) = session_token(headers) {
            if !is_safe(method) && !same_origin(headers) {
                return Err(ApiError::forbidden(
                    "a request authenticated by the session cookie must come from this host's own pages",
                ));
            }
            header = Some(format!("Bearer {token}"));
        }
    }
    let scopes = auth.check(header.as_deref()).map_err(|denied| match denied {
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

fn is_safe(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS
}

/// The token in the session cookie, if the request has one.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .and_then(|(_, value)| percent_decode(value))
        .filter(|t| !t.is_empty())
}

/// Whether the browser says the request comes from a page of this same origin: `Sec-Fetch-Site:
/// same-origin`, or an `Origin` whose host and port are the `Host` the request was sent to. Browsers
/// send `Origin` with every POST; a request with neither is not trusted.
fn same_origin(headers: &HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if get("sec-fetch-site") == Some("same-origin") {
        return true;
    }
    match (get("origin"), get("host")) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
            !origin_host.is_empty() && origin_host.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

/// A `Set-Cookie` value holding `token` for the dashboard: not readable by scripts (`HttpOnly`), not
/// sent by the browser on requests from other sites (`SameSite=Strict`), for the whole API (`Path=/`),
/// ending with the browser session; `Secure` when a proxy says the client used HTTPS.
pub fn session_cookie(token: &str, headers: &HeaderMap) -> String {
    let secure = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) == Some("https");
    format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
        percent_encode(token),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn session_cookie_cleared() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Tokens may hold characters a cookie value cannot (`;`, `"`, `\`, non-ASCII): everything but
/// unreserved characters is percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let raw = s.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
        assert_eq!(need(&get, &["stats", "history"]), Need::Scope(Scope::Read));
        assert_eq!(need(&get, &["ui", "jobs", "x"]), Need::Scope(Scope::Read));
        assert_eq!(need(&get, &["ui", "assets", "app.js"]), Need::Public);
        assert_eq!(need(&post, &["ui", "session"]), Need::Public);
        assert_eq!(need(&post, &["ui", "jobs"]), Need::Scope(Scope::Admin));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(warp::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_session_cookie_authenticates_reads_and_same_origin_writes_only() {
        let token = "wwwwwwwwwwwwwwww;\"é";
        let auth = Auth::new(vec![(Scope::Write, crate::auth::TokenHash::of(token))]);
        let cookie = session_cookie(token, &HeaderMap::new());
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains("Secure"));
        let value = cookie.split(';').next().unwrap().to_string();
        let read = need(&Method::GET, &["jobs"]);
        let write = need(&Method::POST, &["jobs", "x", "cancel"]);
        let with_cookie = headers(&[("cookie", &format!("other=1; {value}")), ("host", "q.example:8080")]);
        assert_eq!(authorize(&auth, &Method::GET, &with_cookie, read).unwrap(), vec![Scope::Write]);
        // A POST with the cookie alone, from nowhere or from another site, is refused.
        let e = authorize(&auth, &Method::POST, &with_cookie, write).unwrap_err();
        assert_eq!(e.status, 403);
        let mut cross = with_cookie.clone();
        cross.insert("origin", HeaderValue::from_static("https://evil.example"));
        assert_eq!(authorize(&auth, &Method::POST, &cross, write).unwrap_err().status, 403);
        let mut same = with_cookie.clone();
        same.insert("origin", HeaderValue::from_static("http://q.example:8080"));
        assert!(authorize(&auth, &Method::POST, &same, write).is_ok());
        let fetch = headers(&[("cookie", &value), ("sec-fetch-site", "same-origin")]);
        assert!(authorize(&auth, &Method::POST, &fetch, write).is_ok());
        // A wrong token in the cookie is a 401 like a wrong header.
        let bad = headers(&[("cookie", "jobqueue_session=nope-nope-nope-nope")]);
        assert_eq!(authorize(&auth, &Method::GET, &bad, read).unwrap_err().status, 401);
        let secure = session_cookie(token, &headers(&[("x-forwarded-proto", "https")]));
        assert!(secure.ends_with("; Secure"));
    }
}
