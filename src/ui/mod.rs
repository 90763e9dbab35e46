//! The dashboard at `/ui`: server-rendered pages (overview, jobs, one job, queues) with a little
//! plain JavaScript that refreshes them in place, draws the charts and sends the actions (cancel,
//! retry, pause, resume) to the API's own endpoints. The stylesheet and the script are embedded in
//! the binary; there is no build step.
//!
//! Pages are authorized through the API's table (`api::access::need`: read scope for every page).
//! A browser cannot attach a bearer header to a page it navigates to, so with `API_TOKENS` set the
//! dashboard asks for a token once and keeps it in a session cookie (`POST /ui/session`; see
//! `api::access` for how cookie-authenticated changes are protected). What a page offers follows
//! the token's scope: no cancel or retry without write, no pause or resume without admin.

mod html;
mod jobs;
mod overview;

use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Deserialize;
use warp::http::{header, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Buf;

use crate::api::error::ApiError;
use crate::api::{access, ApiState, Request};
use crate::job::RetryPolicy;
pub use html::Viewer;

/// What the dashboard shows about the answering instance: its id and the queues it serves, with
/// their settings (another instance may serve a queue differently).
#[derive(Debug, Clone, Default)]
pub struct InstanceInfo {
    pub id: String,
    pub queues: Vec<QueueSettings>,
}

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub name: String,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Longest one attempt may run.
    pub timeout: Duration,
    /// `builtin`, `webhook` or `command`: what the config file names (`builtin` when it names none,
    /// also for a program embedding jobqueue with handlers of its own).
    pub handler: &'static str,
}

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

/// Answers every request under `/ui`.
pub(crate) async fn route<S, B>(
    state: &ApiState,
    req: &Request,
    segments: &[&str],
    body: S,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let m = &req.method;
    let rest = &segments[1..];
    // Static files and the session need no token; every page needs read (api::access::need).
    match rest {
        ["assets", "app.css"] if m == Method::GET => return Ok(asset(CSS, "text/css; charset=utf-8")),
        ["assets", "app.js"] if m == Method::GET => return Ok(asset(JS, "text/javascript; charset=utf-8")),
        ["assets", ..] => return Err(ApiError::not_found(format!("no asset {}", req.path))),
        ["session"] if m == Method::POST => return session_start(state, req, body).await,
        ["session"] if m == Method::DELETE => return Ok(session_end()),
        ["session"] => return Err(ApiError::method_not_allowed("POST, DELETE")),
        _ => {}
    }
    let page = async {
        let scopes = access::authorize(&state.auth, m, &req.headers, access::need(m, segments))?;
        let viewer = Viewer { scopes, auth: !state.auth.is_open() };
        match rest {
            [] if m == Method::GET => overview::overview(state, &viewer).await,
            ["jobs"] if m == Method::GET => jobs::list(state, req, &viewer).await,
            ["jobs", id] if m == Method::GET => jobs::job(state, req, &viewer, crate::api::parse_id(id)?).await,
            ["queues"] if m == Method::GET => overview::queues(state, &viewer).await,
            [] | ["jobs"] | ["jobs", _] | ["queues"] => Err(ApiError::method_not_allowed("GET")),
            _ => Err(ApiError::not_found(format!("no page {}", req.path))),
        }
    };
    let resp = match crate::api::within(state, page).await {
        Ok(html) => html_response(StatusCode::OK, html),
        // No valid session: the sign-in page, at the address asked for, so that signing in reloads it.
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            let message = if access::session_token(&req.headers).is_some() { "That token is not valid." } else { "" };
            html_response(StatusCode::UNAUTHORIZED, html::login(message))
        }
        Err(e) => {
            let status = e.status;
            let page = html::error_page(status.as_u16(), e.code, &e.message);
            // Logged (a 500's cause) by the one mapping in api::error; the body is the HTML page.
            let mut resp = e.into_response(&state.log);
            *resp.body_mut() = page.into();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            secure_headers(&mut resp);
            resp
        }
    };
    Ok(resp)
}

#[derive(Deserialize)]
struct SessionBody {
    token: String,
}

/// Checks the token and puts it in the session cookie. A wrong token is a 401 like any other.
async fn session_start<S, B>(state: &ApiState, req: &Request, body: S) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let body: Bytes = crate::api::read_json_body(state, req, body).await?;
    let SessionBody { token } = crate::api::decode(crate::api::parse_json(&body)?, "")?;
    let token = token.trim();
    let scopes = match state.auth.is_open() {
        true => crate::auth::Scope::ALL.to_vec(),
        false => state
            .auth
            .check(Some(&format!("Bearer {token}")))
            .map_err(|_| ApiError::unauthorized("the token is not valid"))?,
    };
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let mut resp = crate::api::reply(StatusCode::OK, &serde_json::json!({ "scopes": scopes }));
    if !state.auth.is_open() {
        let cookie = access::session_cookie(token, &req.headers);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

fn session_end() -> Response {
    let mut resp = Response::new(Default::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if let Ok(v) = HeaderValue::from_str(&access::session_cookie_cleared()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

fn asset(text: &'static str, content_type: &'static str) -> Response {
    let mut resp = Response::new(text.into());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated on every load: a new binary's assets are picked up at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut resp = Response::new(html.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure_headers(&mut resp);
    resp
}

/// Pages run only the embedded script and talk only to this origin; nobody may frame them.
fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
