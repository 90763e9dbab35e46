//! The jobs list (the API's filters, search by id or unique key, keyset paging, cancel or retry of
//! the selected jobs) and the page of one job (payload, result, timeline, lease, actions, and a curl
//! command that re-creates it).

use std::fmt::Write;

use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::api::{ApiState, Request};
use crate::auth::Scope;
use crate::db::queues::queue_list;
use crate::db::{queries, DbError};
use crate::instances::LIVE_WITHIN;
use crate::job::{Job, JobStatus};

use super::html::{self, esc, Nav, Viewer};

/// Jobs per page of the list.
const PAGE: i64 = 25;

/// A table of jobs. `selectable` adds the check boxes the bulk actions read.
pub(super) fn job_rows(jobs: &[Job], selectable: Option<bool>) -> String {
    let select = selectable == Some(true);
    let mut out = String::from(r#"<div class="scroll"><table class="grid jobs"><thead><tr>"#);
    if select {
        out.push_str(r#"<th><input type="checkbox" id="pick-all" aria-label="Select all"></th>"#);
    }
    out.push_str("<th>Id</th><th>Queue</th><th>Status</th><th>Attempts</th><th>Created</th><th>Finished</th><th>Last error</th></tr></thead><tbody>");
    for j in jobs {
        let _ = write!(out, r#"<tr data-job-id="{}">"#, j.id);
        if select {
            let _ = write!(
                out,
                r#"<td><input type="checkbox" class="pick" value="{}" data-status="{}" aria-label="Select job"></td>"#,
                j.id,
                j.status.as_str()
            );
        }
        let id = j.id.to_string();
        let _ = write!(
            out,
            r#"<td><a href="/ui/jobs/{id}" title="{id}"><code>{}</code></a></td><td>{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td class="err">{}</td></tr>"#,
            &id[..8],
            esc(&j.queue),
            html::status_badge(j.status),
            attempts(j),
            html::time(j.created_at),
            html::time_opt(j.finished_at),
            esc(&truncate(j.error.as_deref().unwrap_or(""), 120)),
        );
    }
    if jobs.is_empty() {
        let _ = write!(out, r#"<tr><td colspan="{}" class="muted">No jobs.</td></tr>"#, if select { 8 } else { 7 });
    }
    out.push_str("</tbody></table></div>");
    out
}

fn attempts(j: &Job) -> String {
    match j.max_attempts {
        Some(max) => format!("{} / {max}", j.attempts),
        None => j.attempts.to_string(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

pub(super) async fn list(state: &ApiState, req: &Request, viewer: &Viewer) -> Result<String, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let search = req.param("q")?.map(|q| q.trim().to_string()).filter(|q| !q.is_empty());
    let filter = crate::api::jobs::list_filter(req, PAGE, true)?;
    let jobs = match &search {
        // An id finds that job; anything else is a unique key, in any queue and status.
        Some(q) => match Uuid::parse_str(q) {
            Ok(id) => queries::job_get(&*client, id).await?.into_iter().collect(),
            Err(_) => queries::job_find_by_key(&*client, q, filter.limit).await?,
        },
        None => queries::job_list(&*client, &filter).await?,
    };
    let queues = queue_list(&*client, LIVE_WITHIN).await?;
    drop(client);

    let status = filter.status.map(JobStatus::as_str).unwrap_or("");
    let queue = filter.queue.clone().unwrap_or_default();
    let mut body = String::from(r#"<h1>Jobs</h1><form class="filters" method="get" action="/ui/jobs">"#);
    body.push_str(r#"<label>Status <select name="status"><option value="">any</option>"#);
    for s in JobStatus::ALL {
        let selected = if s.as_str() == status { " selected" } else { "" };
        let _ = write!(body, r#"<option{selected}>{}</option>"#, s.as_str());
    }
    body.push_str(r#"</select></label><label>Queue <select name="queue"><option value="">any</option>"#);
    for q in &queues {
        let selected = if q.queue == queue { " selected" } else { "" };
        let _ = write!(body, r#"<option value="{0}"{selected}>{0}</option>"#, esc(&q.queue));
    }
    let _ = write!(
        body,
        r#"</select></label><label class="grow">Search <input type="search" name="q" value="{}" placeholder="job id or unique key"></label><button type="submit">Show</button><label class="toggle"><input type="checkbox" id="autorefresh"> Auto-refresh</label></form>"#,
        esc(search.as_deref().unwrap_or(""))
    );
    let write = viewer.can(Scope::Write);
    if write {
        body.push_str(
            r#"<div class="bulk"><button type="button" data-bulk="cancel">Cancel selected</button><button type="button" data-bulk="retry">Retry selected</button><span id="picked" class="muted"></span></div>"#,
        );
    }
    body.push_str(r#"<section id="jobs-live" data-live>"#);
    body.push_str(&job_rows(&jobs, Some(write)));
    // Keyset paging: "older" enters the index at the last job shown.
    body.push_str(r#"<nav class="pager">"#);
    let base = [("status", status), ("queue", queue.as_str())];
    if filter.before.is_some() {
        let _ = write!(body, r#"<a href="/ui/jobs{}">Newest</a>"#, html::query(&base));
    }
    if let (None, Some(last)) = (&search, jobs.last().filter(|_| jobs.len() as i64 == filter.limit)) {
        let id = last.id.to_string();
        let _ = write!(
            body,
            r#"<a id="older" href="/ui/jobs{}">Older →</a>"#,
            html::query(&[base[0], base[1], ("before", &id)])
        );
    }
    body.push_str("</nav></section>");
    Ok(html::frame("Jobs", Nav::Jobs, "jobs", Some(viewer), &body))
}

pub(super) async fn job(state: &ApiState, req: &Request, viewer: &Viewer, id: Uuid) -> Result<String, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let job =
        queries::job_get(&*client, id).await?.ok_or_else(|| ApiError::not_found(format!("no job with id {id}")))?;
    drop(client);
    let mut body = format!(r#"<h1>Job <code class="id">{}</code></h1>"#, job.id);
    let _ = write!(body, r#"<section id="job-live" data-live data-finished="{}">"#, job.status.is_finished());
    let _ = write!(body, r#"<p class="status-line">{}"#, html::status_badge(job.status));
    if viewer.can(Scope::Write) {
        if matches!(job.status, JobStatus::Pending | JobStatus::Processing) && job.cancel_requested_at.is_none() {
            let _ = write!(body, r#" <button type="button" data-action="cancel" data-id="{}">Cancel</button>"#, job.id);
        }
        if matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
            let _ = write!(body, r#" <button type="button" data-action="retry" data-id="{}">Retry</button>"#, job.id);
        }
    }
    body.push_str("</p>");
    body.push_str(&facts(&job));
    body.push_str("<h2>Timeline</h2>");
    body.push_str(&timeline(&job));
    let _ = write!(body, r#"<h2>Payload</h2><pre id="payload">{}</pre>"#, esc(&pretty(&job.payload)));
    if let Some(result) = &job.result {
        let _ = write!(body, r#"<h2>Result</h2><pre id="result">{}</pre>"#, esc(&pretty(result)));
    }
    body.push_str("</section>");
    let _ = write!(
        body,
        r#"<h2>Re-create it</h2><div class="copy"><pre id="curl">{}</pre><button type="button" data-copy="curl">Copy</button></div>"#,
        esc(&curl(&job, req, !state.auth.is_open()))
    );
    Ok(html::frame(&format!("Job {}", &job.id.to_string()[..8]), Nav::Jobs, "job", Some(viewer), &body))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn facts(j: &Job) -> String {
    let mut out = String::from(r#"<dl class="facts">"#);
    let mut fact = |name: &str, value: String| {
        let _ = write!(out, "<div><dt>{name}</dt><dd>{value}</dd></div>");
    };
    fact("Queue", format!(r#"<a href="/ui/jobs{}">{}</a>"#, html::query(&[("queue", &j.queue)]), esc(&j.queue)));
    fact("Priority", j.priority.to_string());
    fact("Attempts", attempts(j));
    fact("Run at", html::time(j.run_at));
    fact("Unique key", j.unique_key.as_deref().map(esc).unwrap_or_else(|| "–".into()));
    fact("Created", html::time(j.created_at));
    fact("Updated", html::time(j.updated_at));
    fact("Finished", html::time_opt(j.finished_at));
    if j.status == JobStatus::Processing {
        fact("Lease holder", format!("<code>{}</code>", esc(j.locked_by.as_deref().unwrap_or("?"))));
        fact("Lease expires", html::time_opt(j.locked_until));
    }
    if let Some(at) = j.cancel_requested_at {
        fact("Cancel requested", html::time(at));
    }
    out.push_str("</dl>");
    out
}

/// What the row records of the job's life, in order: creation, each attempt's start (`started_at`,
/// kept for failed attempts in the error history) and end, and the outcome. A running attempt shows its
/// holder and lease as "now", after everything recorded.
fn timeline(j: &Job) -> String {
    let parse = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|at| at.with_timezone(&Utc))
    };
    // (when, shown as, what)
    let mut events: Vec<(chrono::DateTime<Utc>, String, String)> =
        vec![(j.created_at, html::time(j.created_at), format!("created in queue {}", esc(&j.queue)))];
    // Attempts whose start is already shown (from the error history), so the latest is not shown twice.
    let mut started_shown = Vec::new();
    for e in j.errors.as_array().into_iter().flatten() {
        let attempt = e.get("attempt").and_then(Value::as_i64);
        let label = attempt.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        if let Some(started) = parse(e.get("started_at")) {
            events.push((started, html::time(started), format!("attempt {label} started")));
            started_shown.push(attempt);
        }
        let error = e.get("error").and_then(Value::as_str).unwrap_or("");
        if let Some(at) = parse(e.get("at")) {
            let what = format!(r#"attempt {label} failed: <span class="err">{}</span>"#, esc(error));
            events.push((at, html::time(at), what));
        }
    }
    // The latest attempt's start, unless its failure above already showed it.
    if let Some(started) = j.started_at {
        if j.attempts > 0 && !started_shown.contains(&Some(i64::from(j.attempts))) {
            events.push((started, html::time(started), format!("attempt {} started", j.attempts)));
        }
    }
    if let Some(at) = j.cancel_requested_at {
        events.push((at, html::time(at), "cancellation requested".to_string()));
    }
    match j.status {
        JobStatus::Processing => {
            let until = j.locked_until.map(html::time).unwrap_or_default();
            let holder = esc(j.locked_by.as_deref().unwrap_or("?"));
            let what = format!("attempt {} running on <code>{holder}</code>, lease until {until}", j.attempts);
            events.push((Utc::now(), r#"<span class="muted">now</span>"#.to_string(), what));
        }
        JobStatus::Pending if j.run_at > Utc::now() => {
            events.push((j.run_at, html::time(j.run_at), "due (waiting until then)".to_string()))
        }
        JobStatus::Pending => events.push((j.run_at, html::time(j.run_at), "due: waiting for a worker".to_string())),
        JobStatus::Waiting => {
            let what = "waiting for its parent jobs to finish".to_string();
            events.push((Utc::now(), r#"<span class="muted">now</span>"#.to_string(), what));
        }
        status => {
            if let Some(at) = j.finished_at {
                let what = format!("{} after {} attempt(s)", html::status_badge(status), j.attempts);
                events.push((at, html::time(at), what));
            }
        }
    }
    events.sort_by_key(|(at, _, _)| *at);
    let mut out = String::from(r#"<ol class="timeline">"#);
    for (_, when, what) in events {
        let _ = write!(out, "<li>{when} {what}</li>");
    }
    out.push_str("</ol>");
    out
}

/// A curl command that submits the same job again (payload, queue, priority, max attempts, unique
/// key), to the host the page was loaded from. With tokens on it reads the token from
/// `$JOBQUEUE_TOKEN`: a page never shows a token.
fn curl(j: &Job, req: &Request, auth: bool) -> String {
    let host = req.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost:8080");
    let scheme = match req.headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    let mut body = json!({ "payload": j.payload, "queue": j.queue });
    if j.priority != 0 {
        body["priority"] = json!(j.priority);
    }
    if let Some(max) = j.max_attempts {
        body["max_attempts"] = json!(max);
    }
    if let Some(key) = &j.unique_key {
        body["unique_key"] = json!(key);
    }
    let quoted = body.to_string().replace('\'', r"'\''");
    let auth = if auth { " -H \"Authorization: Bearer $JOBQUEUE_TOKEN\"" } else { "" };
    format!("curl -s {scheme}://{host}/jobs -H 'Content-Type: application/json'{auth} -d '{quoted}'")
}
