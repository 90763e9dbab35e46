//! Every error the API answers, and the one place where errors become HTTP responses:
//! `{"error": "<code>", "message": "<human text>"}` with the matching status.

use serde_json::json;
use slog::{error, warn, Logger};
use tokio_postgres::error::SqlState;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::db::DbError;
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
    /// For 500: the cause, logged but never shown to the client.
    pub internal: Option<String>,
    /// For 503 when the client should come back: seconds for the `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), job: None, allow: None, internal: None, retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn invalid_field(e: FieldError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", e.to_string())
    }

    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
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
    pub fn busy(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message);
        e.retry_after = Some(retry_after_secs);
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
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
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Database errors, classified by SQLSTATE. Errors caused by the client's data are 4xx; an unreachable
/// database is 503; anything else is a 500 whose detail goes to the log only.
impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            // The detail (host, driver error) is for the log, not the client.
            let mut err = ApiError::unavailable("database unavailable; try again");
            err.internal = Some(e.to_string());
            return err;
        }
        let detail = e.server_message().unwrap_or("rejected by the database").to_string();
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                ApiError::conflict(format!("a pending or processing job already has this unique_key ({detail})"), None)
            }
            Some(c) if *c == SqlState::CHECK_VIOLATION => {
                let constraint = e.constraint().unwrap_or("a check constraint");
                ApiError::bad_request(format!("value violates {constraint}: {detail}"))
            }
            Some(c)
                if *c == SqlState::UNTRANSLATABLE_CHARACTER
                    || *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                    || *c == SqlState::INVALID_TEXT_REPRESENTATION
                    || *c == SqlState::NUMERIC_VALUE_OUT_OF_RANGE
                    || *c == SqlState::DATETIME_FIELD_OVERFLOW
                    || *c == SqlState::STRING_DATA_RIGHT_TRUNCATION
                    || *c == SqlState::NOT_NULL_VIOLATION =>
            {
                ApiError::bad_request(format!("value cannot be stored: {detail}"))
            }
            _ => ApiError::internal(e.to_string()),
        }
    }
}
