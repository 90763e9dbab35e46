//! The dashboard's pages and `GET /stats/history` through the router, without a browser: what
//! clients sent is escaped, the scope decides which controls a page offers, the session cookie is
//! set only for a valid token and cannot change anything from another site, and the history counts
//! what finished in each bucket. `tests/ui_browser.rs` drives the same pages in Chromium.

mod common;

use std::sync::Arc;

use common::TestDb;
use jobqueue::api::{routes, ApiState};
use jobqueue::auth::{Auth, Scope, TokenHash};
use serde_json::{json, Value};
use warp::Filter;

const READ: &str = "read-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

struct Answer {
    status: u16,
    headers: warp::http::HeaderMap,
    body: String,
}

async fn call(
    api: &(impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone + 'static),
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let mut req = warp::test::request().method(method).path(path).header("host", "jq.test:8080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let resp = req.reply(api).await;
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: String::from_utf8_lossy(resp.body()).to_string(),
    }
}

fn tokens() -> Auth {
    Auth::new(vec![(Scope::Read, TokenHash::of(READ)), (Scope::Admin, TokenHash::of(ADMIN))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_what_clients_sent_as_text() {
    let db = TestDb::new().await;
    let api = routes(Arc::new(common::api_state(&db.url)));
    let payload = json!({"html": "<script>document.title='pwned'</script>", "q": "\"quoted\" & 'single'"});
    let created =
        call(&api, "POST", "/jobs", &[], Some(json!({"payload": payload, "queue": "<b>q</b>", "unique_key": "<i>k"})))
            .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = serde_json::from_str::<Value>(&created.body).unwrap()["id"].as_str().unwrap().to_string();

    let page = call(&api, "GET", &format!("/ui/jobs/{id}"), &[], None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert!(page.headers["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    assert!(page.body.contains("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"), "{}", page.body);
    assert!(!page.body.contains("<script>document"), "payload rendered as markup");
    assert!(!page.body.contains("<b>q</b>") && page.body.contains("&lt;b&gt;q&lt;/b&gt;"));
    assert!(!page.body.contains("<i>k") && page.body.contains("&lt;i&gt;k"));
    // The curl command re-creates the job; the shell quoting of ' is escaped for HTML too.
    assert!(page.body.contains(r#"curl -s http://jq.test:8080/jobs"#), "{}", page.body);
    assert!(page.body.contains("&#39;\\&#39;&#39;pwned"), "single quotes closed and reopened for the shell");
    // The API is open: every control is offered.
    assert!(page.body.contains(r#"data-action="cancel""#));

    for path in ["/ui", "/ui/jobs", "/ui/jobs?q=%3Ci%3Ek", "/ui/queues"] {
        let page = call(&api, "GET", path, &[], None).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(page.body.contains("&lt;b&gt;q&lt;/b&gt;") && !page.body.contains("<b>q</b>"), "{path}");
    }
    let found = call(&api, "GET", "/ui/jobs?q=%3Ci%3Ek", &[], None).await;
    assert!(found.body.contains(&format!(r#"data-job-id="{id}""#)), "search by unique key finds the job");

    // Errors are pages too, with the API's status and code.
    let missing = call(&api, "GET", &format!("/ui/jobs/{}", uuid::Uuid::new_v4()), &[], None).await;
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("not_found") && missing.body.starts_with("<!doctype html>"));
    let bad = call(&api, "GET", "/ui/jobs?status=%3Cx%3E", &[], None).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("&lt;x&gt;") && !bad.body.contains("<x>"));
    assert_eq!(call(&api, "POST", "/ui/jobs", &[], Some(json!({}))).await.status, 405);
    let js = call(&api, "GET", "/ui/assets/app.js", &[], None).await;
    assert_eq!((js.status, js.headers["content-type"].to_str().unwrap()), (200, "text/javascript; charset=utf-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_scope_decides_what_a_page_offers() {
    let db = TestDb::new().await;
    let api = routes(Arc::new(ApiState { auth: tokens(), ..common::api_state(&db.url) }));
    let admin_header = format!("Bearer {ADMIN}");
    let created =
        call(&api, "POST", "/jobs", &[("authorization", &admin_header)], Some(json!({"payload": 1, "delay": "1h"})))
            .await;
    let id = serde_json::from_str::<Value>(&created.body).unwrap()["id"].as_str().unwrap().to_string();

    // No session: the sign-in page, as a 401. The static files need nothing.
    let page = call(&api, "GET", "/ui", &[], None).await;
    assert_eq!(page.status, 401);
    assert!(page.body.contains(r#"id="login""#));
    assert_eq!(call(&api, "GET", "/ui/assets/app.css", &[], None).await.status, 200);

    let wrong = call(&api, "POST", "/ui/session", &[], Some(json!({"token": "not-a-token-at-all"}))).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.headers.get("set-cookie").is_none());

    let session = |token: &str| {
        let api = api.clone();
        let token = token.to_string();
        async move {
            let r = call(&api, "POST", "/ui/session", &[], Some(json!({ "token": token }))).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let cookie = r.headers["set-cookie"].to_str().unwrap().to_string();
            assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
            cookie.split(';').next().unwrap().to_string()
        }
    };
    let read = session(READ).await;
    let admin = session(ADMIN).await;
    let job_page = format!("/ui/jobs/{id}");

    let as_read = call(&api, "GET", &job_page, &[("cookie", &read)], None).await;
    assert_eq!(as_read.status, 200);
    assert!(!as_read.body.contains("data-action"), "a read token gets no buttons");
    let list = call(&api, "GET", "/ui/jobs", &[("cookie", &read)], None).await;
    assert!(!list.body.contains("data-bulk") && !list.body.contains(r#"class="pick""#));
    let queues = call(&api, "GET", "/ui/queues", &[("cookie", &read)], None).await;
    assert!(!queues.body.contains("data-action"));

    let as_admin = call(&api, "GET", &job_page, &[("cookie", &admin)], None).await;
    assert!(as_admin.body.contains(r#"data-action="cancel""#));
    assert!(call(&api, "GET", "/ui/jobs", &[("cookie", &admin)], None).await.body.contains("data-bulk"));
    assert!(call(&api, "GET", "/ui/queues", &[("cookie", &admin)], None).await.body.contains(r#"data-action="pause""#));

    // The cookie authenticates the API too, but a change only from this host's own pages.
    let cancel = format!("/jobs/{id}/cancel");
    let forged = call(&api, "POST", &cancel, &[("cookie", &admin), ("origin", "https://evil.example")], None).await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    let no_origin = call(&api, "POST", &cancel, &[("cookie", &admin)], None).await;
    assert_eq!(no_origin.status, 403);
    let read_cancel = call(&api, "POST", &cancel, &[("cookie", &read), ("origin", "http://jq.test:8080")], None).await;
    assert_eq!(read_cancel.status, 403, "a read session cannot cancel");
    let own = call(&api, "POST", &cancel, &[("cookie", &admin), ("origin", "http://jq.test:8080")], None).await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(serde_json::from_str::<Value>(&own.body).unwrap()["status"], "cancelled");

    let out = call(&api, "DELETE", "/ui/session", &[], None).await;
    assert_eq!(out.status, 204);
    assert!(out.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_counts_what_finished_in_each_bucket() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Finished 5 s ago (the newest bucket), 65 s ago (bucket 6 before it), 20 minutes ago (outside).
    client
        .batch_execute(
            "INSERT INTO jobs (queue, payload, status, finished_at, errors) VALUES
               ('h', '1', 'done',      now() - interval '5 seconds', '[]'),
               ('h', '1', 'failed',    now() - interval '5 seconds', '[]'),
               ('h', '1', 'cancelled', now() - interval '65 seconds', '[]'),
               ('h', '1', 'done',      now() - interval '20 minutes', '[]'),
               ('h', '1', 'pending',   NULL, '[]')",
        )
        .await
        .unwrap();
    let api = routes(Arc::new(common::api_state(&db.url)));
    let r = call(&api, "GET", "/stats/history", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let h: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!((h["window_secs"].as_u64(), h["bucket_secs"].as_u64()), (Some(900), Some(10)));
    let q = h["queues"].as_array().unwrap().iter().find(|q| q["queue"] == "h").expect("queue h");
    let finished: Vec<i64> = serde_json::from_value(q["finished"].clone()).unwrap();
    let failed: Vec<i64> = serde_json::from_value(q["failed"].clone()).unwrap();
    assert_eq!(finished.len(), 90);
    assert_eq!(finished[89], 2, "{finished:?}");
    assert_eq!(failed[89], 1);
    assert_eq!(finished[83], 1, "{finished:?}");
    assert_eq!(finished.iter().sum::<i64>(), 3, "the job finished 20 minutes ago is outside the window");
    assert_eq!(q["wait_p50_secs"].as_array().unwrap().len(), 90);
}

/// Two real instances on one database: `a` claims a job that was due 3 s before it was inserted, and
/// `b`, which serves another queue and never saw that claim, charts its wait from the histogram `a`
/// wrote to `wait_stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_chart_covers_the_claims_of_every_instance() {
    use common::{eventually, http, Proc};
    use std::time::Duration;

    let db = TestDb::new().await;
    let with = |id: &str, queues: &str| {
        let mut env = db.env();
        env.extend([("INSTANCE_ID".to_string(), id.to_string()), ("QUEUES".to_string(), queues.to_string())]);
        env
    };
    let a = Proc::jobqueue("wait-a", &["serve"], &with("inst-a", "work:2"));
    let b = Proc::jobqueue("wait-b", &["serve"], &with("inst-b", "other:1"));
    let (_, b_addr) = (a.api_addr().await, b.api_addr().await);
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO jobs (queue, payload, run_at) VALUES ('work', '{}', now() - interval '3 seconds')")
        .await
        .unwrap();
    common::wait_count(
        &client,
        Duration::from_secs(30),
        "job done",
        "SELECT count(*) FROM jobs WHERE status = 'done'",
        1,
    )
    .await;
    let started: Option<chrono::DateTime<chrono::Utc>> =
        client.query_one("SELECT started_at FROM jobs", &[]).await.unwrap().get(0);
    assert!(started.is_some(), "the claim records when the attempt started");

    let p50 = eventually(Duration::from_secs(30), "b charts a's claim", || async {
        let r = http(b_addr, "GET", "/stats/history", None).await;
        let q = r.json()["queues"].as_array()?.iter().find(|q| q["queue"] == "work")?.clone();
        q["wait_p50_secs"].as_array()?.iter().rev().take(3).find_map(Value::as_f64)
    })
    .await;
    assert!((p50 / 3.0 - 1.0).abs() < 0.2, "p50 {p50} s, expected about 3 s");
    let writers: Vec<String> =
        client.query("SELECT DISTINCT instance FROM wait_stats", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(writers, vec!["inst-a".to_string()], "only the claiming instance has waits to write");
}

/// The job page's timeline shows each attempt's start and end in order: the failed attempt's start
/// from its entry in the error history, the last attempt's from `started_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_shows_when_each_attempt_started_and_ended() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let id: uuid::Uuid = client
        .query_one(
            "INSERT INTO jobs (payload, status, attempts, created_at, started_at, finished_at, errors) VALUES (
               '{}', 'done', 2, now() - interval '10 minutes', now() - interval '4 minutes', now() - interval '3 minutes',
               jsonb_build_array(jsonb_build_object('attempt', 1, 'started_at', now() - interval '9 minutes',
                                                    'at', now() - interval '8 minutes', 'error', 'first try broke')))
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let api = routes(Arc::new(common::api_state(&db.url)));
    let page = call(&api, "GET", &format!("/ui/jobs/{id}"), &[], None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let timeline = &page.body[page.body.find(r#"<ol class="timeline">"#).expect("a timeline")..];
    let timeline = &timeline[..timeline.find("</ol>").unwrap()];
    let order: Vec<usize> = [
        "created in queue",
        "attempt 1 started",
        "attempt 1 failed",
        "attempt 2 started",
        "done</span> after 2 attempt",
    ]
    .iter()
    .map(|what| timeline.find(what).unwrap_or_else(|| panic!("{what:?} missing from {timeline}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order: {timeline}");
    assert_eq!(timeline.matches("attempt 2 started").count(), 1);
}
