//! The `webhook` handler: POSTs each job to a URL, signed so that the receiver can check where it came
//! from and when.
//!
//! Request: `{"id", "queue", "attempt", "payload"}` as JSON, with `Jobqueue-Job-Id` and
//! `Jobqueue-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` (Stripe's
//! shape). The answer decides the outcome: 2xx is done (its body the result); 408, 429, 5xx and
//! transport errors are retried, honouring `Retry-After`; anything else fails the job at once, since
//! sending the same request again cannot change the answer. The per-queue timeout is the executor's:
//! when it fires, the request future is dropped and the attempt counts as a retryable error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

use crate::config::Secret;
use crate::worker::handler::{Handler, HandlerError, HandlerFuture, HandlerResult, JobContext};

/// Largest response body read; a 2xx answer with a longer one fails the job (its result could not be
/// stored whole), and an error answer is cut to [`ERROR_BODY_MAX`] anyway.
pub const RESPONSE_MAX: usize = 1 << 20;
/// How much of an error answer's body goes into the job's error.
pub const ERROR_BODY_MAX: usize = 500;

pub struct WebhookHandler {
    /// Shared by every webhook queue, so connections to one receiver are pooled across them; each
    /// queue's concurrency bounds its requests in flight.
    client: Client,
    url: Url,
    secret: Secret,
}

impl WebhookHandler {
    pub fn new(client: Client, url: Url, secret: Secret) -> WebhookHandler {
        WebhookHandler { client, url, secret }
    }
}

#[derive(Serialize)]
struct Delivery<'a> {
    id: Uuid,
    queue: &'a str,
    attempt: i32,
    payload: &'a Value,
}

impl Handler for WebhookHandler {
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        let (client, url, secret) = (self.client.clone(), self.url.clone(), self.secret.clone());
        Box::pin(async move {
            let job = &ctx.job;
            let delivery = Delivery { id: job.id, queue: &job.queue, attempt: job.attempts, payload: &job.payload };
            let body = serde_json::to_vec(&delivery).map_err(|e| HandlerError::fail(format!("cannot encode: {e}")))?;
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let request = client
                .post(url)
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .header("Jobqueue-Job-Id", job.id.to_string())
                .header("Jobqueue-Signature", format!("t={t},v1={}", signature(secret.expose(), t, &body)))
                .body(body);
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()));
            let (text, complete) = read_bounded(response).await.map_err(transport_error)?;
            outcome(status, retry_after, &text, complete)
        })
    }
}

/// Hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Connection refused, reset, TLS failure, a body cut short: the receiver may well answer next time.
fn transport_error(e: reqwest::Error) -> HandlerError {
    // The URL may carry credentials in its query; the job's error and the logs should not.
    let e = e.without_url();
    let mut message = format!("webhook request failed: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    HandlerError::retry(message)
}

/// The body, at most [`RESPONSE_MAX`] bytes of it; `false` if there was more.
async fn read_bounded(mut response: reqwest::Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > RESPONSE_MAX {
            body.extend_from_slice(&chunk[..RESPONSE_MAX - body.len()]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// What an answer means for the job.
fn outcome(status: StatusCode, retry_after: Option<Duration>, body: &[u8], complete: bool) -> HandlerResult {
    if status.is_success() {
        if !complete {
            return Err(HandlerError::fail(format!(
                "webhook answered {status} with a body over {RESPONSE_MAX} bytes, too large for the job's result"
            )));
        }
        return Ok(result_of(body));
    }
    let mut message = format!("webhook answered {status}");
    let excerpt = excerpt(body, ERROR_BODY_MAX);
    if !excerpt.is_empty() {
        message.push_str(": ");
        message.push_str(&excerpt);
    }
    let retryable =
        status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    match (retryable, retry_after) {
        (true, Some(after)) => Err(HandlerError::retry_after(message, after)),
        (true, None) => Err(HandlerError::retry(message)),
        (false, _) if status.is_redirection() => {
            Err(HandlerError::fail(format!("{message} (redirects are not followed; configure the final URL)")))
        }
        (false, _) => Err(HandlerError::fail(message)),
    }
}

/// The job's result: the body as JSON if it is JSON, else as text; `null` when empty.
fn result_of(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// The start of `body` as text, at most `max` characters, on one line.
fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().count() > max {
        out.push_str("...");
    }
    out
}

/// `Retry-After` as seconds or as an HTTP date; a date in the past means now.
fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let value = value.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(at.timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_decide_the_outcome() {
        let ok = outcome(StatusCode::OK, None, br#"{"sent": true}"#, true);
        assert_eq!(ok, Ok(json!({"sent": true})));
        assert_eq!(outcome(StatusCode::NO_CONTENT, None, b"", true), Ok(Value::Null));
        assert_eq!(outcome(StatusCode::OK, None, b"queued\n", true), Ok(json!("queued\n")));
        assert!(matches!(outcome(StatusCode::OK, None, b"{", false), Err(HandlerError::Fail { .. })));

        let after = Some(Duration::from_secs(2));
        assert_eq!(
            outcome(StatusCode::TOO_MANY_REQUESTS, after, b"slow down", true),
            Err(HandlerError::retry_after("webhook answered 429 Too Many Requests: slow down", Duration::from_secs(2)))
        );
        assert_eq!(
            outcome(StatusCode::BAD_GATEWAY, None, b"", true),
            Err(HandlerError::retry("webhook answered 502 Bad Gateway"))
        );
        assert!(matches!(outcome(StatusCode::REQUEST_TIMEOUT, None, b"", true), Err(HandlerError::Retry { .. })));
        assert_eq!(
            outcome(StatusCode::UNPROCESSABLE_ENTITY, after, b"no such user", true),
            Err(HandlerError::fail("webhook answered 422 Unprocessable Entity: no such user"))
        );
        assert!(matches!(outcome(StatusCode::MOVED_PERMANENTLY, None, b"", true), Err(HandlerError::Fail { .. })));
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "x".repeat(10_000);
        let Err(HandlerError::Fail { message }) = outcome(StatusCode::BAD_REQUEST, None, long.as_bytes(), true) else {
            panic!("a 400 fails")
        };
        assert!(message.len() < ERROR_BODY_MAX + 50, "{}", message.len());
        assert!(message.ends_with("..."));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_470); // 2015-10-21T07:27:50Z
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(parse_retry_after(&h("2"), now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(&h("Wed, 21 Oct 2015 07:28:00 GMT"), now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after(&h("Wed, 21 Oct 2015 07:00:00 GMT"), now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&h("soon"), now), None);
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec
        assert_eq!(
            signature(b"whsec", 1_700_000_000, br#"{"a":1}"#),
            "8ad37ba156048ae0e0a5533c75cdf26fee88b07f93cb57ee4c80adb053012032"
        );
    }
}
