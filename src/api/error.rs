//! Every error the API answers, and the one place where errors become HTTP responses:
//! `{"error": "<code>", "message": "<human text>"}` with the matching status.

use serde_json::json;
use slog::{error, warn, Logger};
use tokio_postgres::error::SqlState;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::db::{DbError, ErrorClass};
use crate::job::{FieldError, Job};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The job as it is now, for conflicts (cancel or retry of a job in the wrong state).
    pub job: Option<Box<Job>>,
    /// For 405: the methods the path accepts.
    pub allow: Option<&'static str>,
    /// For 500 and 503: the cause, logged but never shown to the client.
    pub internal: Option<String>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
    /// The client broke off the request (its body never arrived whole).
    pub client_gone: bool,
    /// Answer with `Connection: close`: the rest of what the client sent cannot be trusted or read.
    pub close: bool,
    /// Send `WWW-Authenticate: Bearer` (a 401).
    pub challenge: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            job: None,
            allow: None,
            internal: None,
            retry_after: None,
            client_gone: false,
            close: false,
            challenge: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// The client stopped sending mid-request; the answer most likely reaches no one.
    pub fn client_gone(message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.client_gone = true;
        e
    }

    pub fn invalid_field(e: FieldError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", e.to_string())
    }

    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    /// 401, with the challenge that says which scheme to use.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.challenge = true;
        e
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("allowed: {allow}"));
        e.allow = Some(allow);
        e
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("request body exceeds {limit} bytes"))
            .close_connection()
    }

    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {}", humantime::format_duration(limit)),
        )
        .close_connection()
    }

    /// The client's misbehaviour this error answers, if it is one: a body that broke off or came too
    /// slowly. Such errors are reported rate-limited (see [`super::noise`]), not one line each.
    pub fn client_fault(&self) -> Option<super::noise::Misbehaviour> {
        use super::noise::Misbehaviour;
        if self.client_gone {
            Some(Misbehaviour::BrokenOff)
        } else if self.status == StatusCode::REQUEST_TIMEOUT {
            Some(Misbehaviour::SlowBody)
        } else {
            None
        }
    }

    pub fn close_connection(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type: application/json, got {got}"),
        )
    }

    pub fn conflict(message: impl Into<String>, job: Option<Job>) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "conflict", message);
        e.job = job.map(Box::new);
        e
    }

    /// A remote worker's lease call with a token that does not hold the job (any more). `job` is given
    /// when the call itself ended the job (a heartbeat after the lease of a cancelled job ran out).
    pub fn lease_lost(message: impl Into<String>, job: Option<Job>) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "lease_lost", message);
        e.job = job.map(Box::new);
        e
    }

    /// Too many requests of one kind are open; come back after `retry_after_secs`.
    pub fn busy(message: impl Into<String>, retry_after_secs: u32) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message).retry_after(retry_after_secs)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn internal(cause: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log");
        e.internal = Some(cause.into());
        e
    }

    pub fn into_response(self, log: &Logger) -> Response {
        if let Some(cause) = &self.internal {
            if self.status == StatusCode::SERVICE_UNAVAILABLE {
                warn!(log, "request failed: database unavailable"; "err" => cause);
            } else {
                error!(log, "request failed"; "err" => cause);
            }
        }
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(job) = &self.job {
            body["job"] = serde_json::to_value(job).unwrap_or_default();
        }
        let mut resp = warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        if let Some(allow) = self.allow {
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.challenge {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Database errors, by class: the client's data refused (4xx by SQLSTATE), the database unreachable or
/// too slow or a race lost (503, try again), our bug (500, detail in the log only).
impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        let unavailable = |message: &str, cause: String| {
            let mut err = ApiError::unavailable(message).retry_after(1);
            // The detail (host, driver error) is for the log, not the client.
            err.internal = Some(cause);
            err
        };
        match e.class() {
            ErrorClass::Unavailable => unavailable("database unavailable; try again", e.to_string()),
            ErrorClass::Transient => {
                unavailable("the database aborted a conflicting statement; try again", e.to_string())
            }
            ErrorClass::Fatal => unavailable("the service cannot use its database; see the server log", e.to_string()),
            ErrorClass::Bug => ApiError::internal(e.to_string()),
            ErrorClass::Rejected => {
                let detail = e.server_message().unwrap_or("rejected by the database").to_string();
                match e.code() {
                    Some(c) if *c == SqlState::UNIQUE_VIOLATION => ApiError::conflict(
                        format!("a pending or processing job already has this unique_key ({detail})"),
                        None,
                    ),
                    Some(c) if *c == SqlState::CHECK_VIOLATION => {
                        let constraint = e.constraint().unwrap_or("a check constraint");
                        ApiError::bad_request(format!("value violates {constraint}: {detail}"))
                    }
                    _ => ApiError::bad_request(format!("value cannot be stored: {detail}")),
                }
            }
        }
    }
}
