//! Authentication and authorisation of the API: bearer tokens with scopes, the JSON-only rule for
//! state-changing requests, CORS only where configured, and tokens never shown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{count, Proc, TestDb};
use jobqueue::api::{routes, ApiState};
use jobqueue::auth::{Auth, Scope, TokenHash};
use serde_json::Value;
use warp::Filter;

const READ: &str = "read-token-0123456789";
const WRITE: &str = "write-token-0123456789";
const WORKER: &str = "worker-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn api(
    db: &TestDb,
    auth: Auth,
    cors: &[&str],
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    routes(Arc::new(ApiState {
        auth,
        cors_origins: cors.iter().map(|s| s.to_string()).collect(),
        ..common::api_state(&db.url)
    }))
}

fn tokens() -> Auth {
    Auth::new(vec![
        (Scope::Read, TokenHash::of(READ)),
        (Scope::Write, TokenHash::of(WRITE)),
        (Scope::Worker, TokenHash::of(WORKER)),
        (Scope::Admin, TokenHash::of(ADMIN)),
    ])
}

struct Reply {
    status: u16,
    body: Value,
    headers: warp::http::HeaderMap,
}

async fn call<F>(api: &F, method: &str, path: &str, token: Option<&str>, headers: &[(&str, &str)], body: &str) -> Reply
where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let mut req = warp::test::request().method(method).path(path).body(body);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.reply(api).await;
    let body = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
    Reply { status: resp.status().as_u16(), headers: resp.headers().clone(), body }
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

#[tokio::test]
async fn each_scope_reaches_exactly_its_endpoints() {
    let db = TestDb::new().await;
    let api = api(&db, tokens(), &[]);
    let job = r#"{"payload": 1}"#;

    // Probes stay open for orchestrators.
    assert_eq!(call(&api, "GET", "/healthz", None, &[], "").await.status, 200);
    assert_eq!(call(&api, "GET", "/readyz", None, &[], "").await.status, 200);

    // No token, or a wrong one: 401 with the challenge, as the usual JSON error.
    for token in [None, Some("not-a-valid-token-at-all")] {
        let r = call(&api, "GET", "/jobs", token, &[], "").await;
        assert_eq!((r.status, r.body["error"].as_str()), (401, Some("unauthorized")), "{:?}", r.body);
        assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer");
        let r = call(&api, "POST", "/jobs", token, JSON, job).await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(count(&db.client().await, "SELECT count(*) FROM jobs").await, 0, "nothing was created");

    // read: GET only.
    assert_eq!(call(&api, "GET", "/jobs", Some(READ), &[], "").await.status, 200);
    assert_eq!(call(&api, "GET", "/stats", Some(READ), &[], "").await.status, 200);
    let r = call(&api, "POST", "/jobs", Some(READ), JSON, job).await;
    assert_eq!((r.status, r.body["error"].as_str()), (403, Some("forbidden")), "{:?}", r.body);
    // write: creates, cancels, retries, and reads what it created.
    let r = call(&api, "POST", "/jobs", Some(WRITE), JSON, job).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(call(&api, "GET", &format!("/jobs/{id}"), Some(WRITE), &[], "").await.status, 200);
    assert_eq!(call(&api, "POST", &format!("/jobs/{id}/cancel"), Some(WRITE), JSON, "").await.status, 200);
    assert_eq!(call(&api, "POST", &format!("/jobs/{id}/cancel"), Some(READ), JSON, "").await.status, 403);
    // worker: the lease protocol only, not the rest of the API.
    assert_eq!(call(&api, "GET", "/jobs", Some(WORKER), &[], "").await.status, 403);
    assert_eq!(call(&api, "POST", "/jobs", Some(WORKER), JSON, job).await.status, 403);
    // admin: everything; an unlisted route needs admin.
    assert_eq!(call(&api, "POST", "/jobs", Some(ADMIN), JSON, job).await.status, 201);
    assert_eq!(call(&api, "GET", "/jobs", Some(ADMIN), &[], "").await.status, 200);
    assert_eq!(call(&api, "GET", "/no/such/route", Some(WRITE), &[], "").await.status, 403);
    assert_eq!(call(&api, "GET", "/no/such/route", Some(ADMIN), &[], "").await.status, 404);

    // whoami tells a client (the dashboard) what its token may do.
    let r = call(&api, "GET", "/whoami", Some(READ), &[], "").await;
    assert_eq!(r.body, serde_json::json!({"auth": true, "scopes": ["read"]}));
    assert_eq!(call(&api, "GET", "/whoami", None, &[], "").await.status, 401);
    let open = api_open(&db);
    let r = call(&open, "GET", "/whoami", None, &[], "").await;
    assert_eq!(r.body, serde_json::json!({"auth": false, "scopes": ["read", "write", "worker", "admin"]}));
}

fn api_open(db: &TestDb) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    api(db, Auth::default(), &[])
}

/// A web page can make a browser post a form to any site; it cannot make it post JSON without the
/// site's consent (CORS). So a form-encoded (or text/plain) POST changes nothing, even on an open API.
#[tokio::test]
async fn a_form_post_from_another_site_cannot_change_anything() {
    let db = TestDb::new().await;
    let api = api_open(&db);
    let r = call(&api, "POST", "/jobs", None, JSON, r#"{"payload": 1}"#).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    for ct in ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"] {
        let r = call(&api, "POST", &format!("/jobs/{id}/cancel"), None, &[("content-type", ct)], "a=1").await;
        assert_eq!((r.status, r.body["error"].as_str()), (415, Some("unsupported_media_type")), "{ct}");
        let r = call(&api, "POST", "/jobs", None, &[("content-type", ct)], r#"payload=1"#).await;
        assert_eq!(r.status, 415, "{ct}");
    }
    let status: String = db.client().await.query_one("SELECT status FROM jobs", &[]).await.unwrap().get(0);
    assert_eq!(status, "pending", "the job was not cancelled");
    assert_eq!(count(&db.client().await, "SELECT count(*) FROM jobs").await, 1);
}

#[tokio::test]
async fn cors_headers_only_for_configured_origins() {
    let db = TestDb::new().await;
    let origin = [("origin", "https://ops.example.com")];
    // Not configured: no CORS headers at all, and no preflight answer.
    let closed = api_open(&db);
    let r = call(&closed, "GET", "/jobs", None, &origin, "").await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
    assert_eq!(call(&closed, "OPTIONS", "/jobs", None, &origin, "").await.status, 405);

    let api = api(&db, tokens(), &["https://ops.example.com"]);
    let r = call(&api, "OPTIONS", "/jobs/x/cancel", None, &origin, "").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.headers.get("access-control-allow-origin").unwrap(), "https://ops.example.com");
    assert!(r.headers.get("access-control-allow-headers").unwrap().to_str().unwrap().contains("authorization"));
    let r = call(&api, "GET", "/jobs", Some(READ), &origin, "").await;
    assert_eq!(r.headers.get("access-control-allow-origin").unwrap(), "https://ops.example.com");
    let evil = [("origin", "https://evil.example")];
    assert!(call(&api, "GET", "/jobs", Some(READ), &evil, "")
        .await
        .headers
        .get("access-control-allow-origin")
        .is_none());
    assert_eq!(call(&api, "OPTIONS", "/jobs", None, &evil, "").await.status, 405);
}

/// Tokens come from API_TOKENS (hashed as read) or from the config file as SHA-256 hashes; a bad
/// value is refused at start-up without being printed, and an open API says so once at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_environment_and_the_file_and_never_shown() {
    let db = TestDb::new().await;
    let secret = "sup3r-secret-value-nobody-should-see";
    let mut env = db.env();
    env.push(("API_TOKENS".into(), format!("superuser:{secret}")));
    let mut p = Proc::jobqueue("bad-tokens", &["migrate"], &env);
    assert_eq!(p.wait(Duration::from_secs(30)).await, Some(2));
    let err = p.stderr();
    assert!(err.contains("API_TOKENS") && !err.contains(secret), "{err}");

    let dir = std::env::temp_dir().join(format!("jq-auth-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jobqueue.toml");
    // sha256 of "file-admin-token-0123456789"
    let hash = sha256_hex("file-admin-token-0123456789");
    std::fs::write(&file, format!("[auth]\ntokens = [{{ scope = \"admin\", sha256 = \"{hash}\" }}]\n")).unwrap();
    let mut env = db.env();
    env.push(("API_TOKENS".into(), format!("read:{READ}")));
    env.push(("JOBQUEUE_CONFIG".into(), file.display().to_string()));
    let p = Proc::jobqueue("tokens", &["serve"], &env);
    let addr = p.api_addr().await;
    let r = common::http(addr, "GET", "/jobs", None).await;
    assert_eq!(r.status, 401);
    let with = |token: &str| format!("Bearer {token}");
    let r = http_with(addr, "GET", "/whoami", &with(READ)).await;
    assert!(r.contains("\"scopes\":[\"read\"]"), "{r}");
    let r = http_with(addr, "GET", "/whoami", &with("file-admin-token-0123456789")).await;
    assert!(r.contains("\"scopes\":[\"admin\"]"), "{r}");
    assert!(!p.stderr().contains(READ), "a token reached the log");
    assert!(!p.stderr().contains("API is open"), "tokens are configured");

    // A token written into the file in the clear is refused, with the way to do it right.
    std::fs::write(&file, "[auth]\ntokens = [{ scope = \"admin\", token = \"plain-token-0123456789\" }]\n").unwrap();
    let mut env = db.env();
    env.push(("JOBQUEUE_CONFIG".into(), file.display().to_string()));
    let mut p = Proc::jobqueue("plain-in-file", &["migrate"], &env);
    assert_eq!(p.wait(Duration::from_secs(30)).await, Some(2));
    assert!(p.stderr().contains("SHA-256"), "{}", p.stderr());
    assert!(!p.stderr().contains("plain-token-0123456789"), "{}", p.stderr());

    // Open: one warning line at start-up.
    let open = Proc::jobqueue("open", &["serve"], &db.env());
    open.api_addr().await;
    let warnings = open.stderr().lines().filter(|l| l.contains("API is open")).count();
    assert_eq!(warnings, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

fn sha256_hex(s: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// A GET with an Authorization header; the raw response text.
async fn http_with(addr: std::net::SocketAddr, method: &str, path: &str, authorization: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {authorization}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
