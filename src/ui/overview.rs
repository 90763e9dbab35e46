//! The overview (every queue's counts, the charts, the newest jobs) and the queues page (settings,
//! pause and resume).

use std::fmt::Write;
use std::time::Duration;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::auth::Scope;
use crate::db::queues::{queue_list, QueueInfo};
use crate::db::{queries, DbError};
use crate::instances::LIVE_WITHIN;

use super::html::{self, esc, Nav, Viewer};
use super::jobs::job_rows;

/// Jobs shown under "Newest jobs".
const NEWEST: i64 = 10;

pub(super) async fn overview(state: &ApiState, viewer: &Viewer) -> Result<String, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let queues = queue_list(&*client, LIVE_WITHIN).await?;
    let newest = queries::job_list(&*client, &queries::ListFilter { limit: NEWEST, ..Default::default() }).await?;
    drop(client);

    let mut body = String::from("<h1>Overview</h1>\n");
    body.push_str(r#"<section id="queues-live" data-live><div class="scroll"><table id="queues-table" class="grid">"#);
    body.push_str(
        "<thead><tr><th>Queue</th><th>Pending</th><th>Processing</th><th>Done</th><th>Failed</th>\
         <th>Cancelled</th><th>Oldest pending</th><th>Instances</th></tr></thead><tbody>",
    );
    for q in &queues {
        let link = |status: &str, n: i64| {
            format!(
                r#"<td class="num"><a href="/ui/jobs{}">{n}</a></td>"#,
                html::query(&[("queue", &q.queue), ("status", status)])
            )
        };
        let _ = write!(
            body,
            r#"<tr data-queue="{name}"><th scope="row"><a href="/ui/jobs{all}">{name}</a>{paused}</th>{}{}{}{}{}<td class="num">{}</td><td>{}</td></tr>"#,
            link("pending", q.pending),
            link("processing", q.processing),
            link("done", q.done),
            link("failed", q.failed),
            link("cancelled", q.cancelled),
            html::duration(Duration::from_secs_f64(q.oldest_pending_age_secs.max(0.0))),
            instances(q),
            name = esc(&q.queue),
            all = html::query(&[("queue", &q.queue)]),
            paused = if q.paused { r#" <span class="badge paused">paused</span>"# } else { "" },
        );
    }
    if queues.is_empty() {
        body.push_str(r#"<tr><td colspan="8" class="muted">No queues yet: submit a job.</td></tr>"#);
    }
    body.push_str("</tbody></table></div></section>\n");

    body.push_str(
        r#"<h2>Last 15 minutes</h2>
<p class="muted">Finished: jobs per second that ended done, failed or cancelled, on every instance.
Wait: from a job's due time to its claim, median and 95th percentile, as measured by the instance
that answers (<span id="wait-instance"></span>). Updated every 2 seconds.</p>
<div id="charts" class="charts"></div>
<h2>Newest jobs</h2>
<section id="newest-live" data-live>"#,
    );
    body.push_str(&job_rows(&newest, None));
    body.push_str("</section>\n");
    Ok(html::frame("Overview", Nav::Overview, "overview", Some(viewer), &body))
}

fn instances(q: &QueueInfo) -> String {
    if q.instances.is_empty() {
        return r#"<span class="muted">none</span>"#.to_string();
    }
    q.instances.iter().map(|i| format!("<code>{}</code>", esc(i))).collect::<Vec<_>>().join(" ")
}

pub(super) async fn queues(state: &ApiState, viewer: &Viewer) -> Result<String, ApiError> {
    let client = state.pool.get().await.map_err(DbError::from)?;
    let queues = queue_list(&*client, LIVE_WITHIN).await?;
    drop(client);
    let admin = viewer.can(Scope::Admin);
    let mut body = String::from("<h1>Queues</h1>\n");
    let _ = write!(
        body,
        r#"<p class="muted">Settings as configured on the instance that answers (<code>{}</code>); another
instance may serve a queue with other settings. Pausing holds every instance's claims.</p>"#,
        esc(&state.instance.id)
    );
    body.push_str(
        r#"<section id="queues-live" data-live><div class="scroll"><table id="queue-settings" class="grid">"#,
    );
    body.push_str(
        "<thead><tr><th>Queue</th><th>State</th><th>Concurrency</th><th>Handler</th><th>Max attempts</th>\
         <th>Backoff</th><th>Timeout</th><th>Pending</th><th>Processing</th><th>Instances</th>",
    );
    if admin {
        body.push_str("<th></th>");
    }
    body.push_str("</tr></thead><tbody>");
    for q in &queues {
        let state_badge = match q.paused {
            true => r#"<span class="badge paused">paused</span>"#,
            false => r#"<span class="badge active">active</span>"#,
        };
        let settings = match state.instance.queues.iter().find(|s| s.name == q.queue) {
            Some(s) => format!(
                r#"<td class="num">{}</td><td>{}</td><td class="num">{}</td><td>{} doubling, at most {}, ±{:.0}%</td><td>{}</td>"#,
                s.concurrency,
                s.handler,
                s.retry.max_attempts,
                html::duration(s.retry.backoff),
                html::duration(s.retry.backoff_max),
                s.retry.jitter * 100.0,
                html::duration(s.timeout),
            ),
            None => r#"<td colspan="5" class="muted">not served by this instance</td>"#.to_string(),
        };
        let _ = write!(
            body,
            r#"<tr data-queue="{name}"><th scope="row"><a href="/ui/jobs{all}">{name}</a></th><td>{state_badge}</td>{settings}<td class="num">{}</td><td class="num">{}</td><td>{}</td>"#,
            q.pending,
            q.processing,
            instances(q),
            name = esc(&q.queue),
            all = html::query(&[("queue", &q.queue)]),
        );
        if admin {
            let (action, label) = if q.paused { ("resume", "Resume") } else { ("pause", "Pause") };
            let _ = write!(
                body,
                r#"<td><button type="button" data-action="{action}" data-queue="{}">{label}</button></td>"#,
                esc(&q.queue)
            );
        }
        body.push_str("</tr>");
    }
    if queues.is_empty() {
        body.push_str(r#"<tr><td colspan="11" class="muted">No queues yet.</td></tr>"#);
    }
    body.push_str("</tbody></table></div></section>\n");
    Ok(html::frame("Queues", Nav::Queues, "queues", Some(viewer), &body))
}
