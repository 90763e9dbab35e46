//! HTML building blocks of the dashboard: escaping, the page frame, and the small pieces every page
//! uses (status badges, times, durations).
//!
//! Every value that comes from a job, a queue name or a request goes through [`esc`]: payloads,
//! results, errors and unique keys are whatever a client sent, and a payload holding `<script>` must
//! show as text. The Content-Security-Policy of every page (no inline script) is the second line of
//! defence, not the first.

use std::fmt::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::auth::Scope;
use crate::job::JobStatus;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query string from pairs (values URL-encoded), with a leading `?` unless empty.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let pairs: Vec<_> = pairs.iter().filter(|(_, v)| !v.is_empty()).collect();
    match serde_urlencoded::to_string(pairs) {
        Ok(q) if !q.is_empty() => format!("?{q}"),
        _ => String::new(),
    }
}

/// Who is looking: what the page may offer.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub scopes: Vec<Scope>,
    /// Tokens are configured (so there is a session to end).
    pub auth: bool,
}

impl Viewer {
    pub fn can(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.grants(needed))
    }
}

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Jobs,
    Queues,
    None,
}

/// The page frame: head, navigation, the viewer's scope and `body`. `page` names the page for the
/// script (`data-page`), which decides what to refresh.
pub fn frame(title: &str, nav: Nav, page: &str, viewer: Option<&Viewer>, body: &str) -> String {
    let mut links = String::new();
    if viewer.is_some() {
        for (target, href, label) in
            [(Nav::Overview, "/ui", "Overview"), (Nav::Jobs, "/ui/jobs", "Jobs"), (Nav::Queues, "/ui/queues", "Queues")]
        {
            let current = if target == nav { r#" aria-current="page""# } else { "" };
            let _ = write!(links, r#"<a href="{href}"{current}>{label}</a>"#);
        }
    }
    let who = match viewer {
        Some(v) if v.auth => {
            r#"<span id="whoami" class="muted"></span> <button type="button" id="logout" class="link">Sign out</button>"#
        }
        Some(_) => r#"<span id="whoami" class="muted"></span>"#,
        None => "",
    };
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title} · jobqueue</title>
<link rel="stylesheet" href="/ui/assets/app.css">
<script src="/ui/assets/app.js" defer></script>
</head>
<body data-page="{page}">
<header class="top">
<a class="brand" href="/ui">jobqueue</a>
<nav>{links}</nav>
<div class="who">{who}</div>
</header>
<div id="flash" role="status" aria-live="polite"></div>
<main>
{body}
</main>
</body>
</html>
"#,
        title = esc(title),
    )
}

/// A job status as a coloured badge.
pub fn status_badge(status: JobStatus) -> String {
    format!(r#"<span class="badge st-{0}" data-status="{0}">{0}</span>"#, status.as_str())
}

/// A time in UTC to the second, with the exact value in `datetime` for the script and tooltips.
pub fn time(t: DateTime<Utc>) -> String {
    format!(
        r#"<time datetime="{}">{}</time>"#,
        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        t.format("%Y-%m-%d %H:%M:%S")
    )
}

pub fn time_opt(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| r#"<span class="muted">–</span>"#.to_string())
}

/// A duration as a person reads it: `350 ms`, `4.2 s`, `3 m 10 s`, `2 h 5 m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{} ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} m {} s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{} h {} m", d.as_secs() / 3600, d.as_secs() % 3600 / 60)
    }
}

/// The sign-in page, shown instead of any page while the browser has no valid session.
pub fn login(message: &str) -> String {
    let body = format!(
        r#"<section class="login">
<h1>Sign in</h1>
<p>This jobqueue requires an API token. What you can see and do follows the token's scope.</p>
<form id="login">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
<p id="login-error" class="error">{}</p>
</form>
</section>"#,
        esc(message)
    );
    frame("Sign in", Nav::None, "login", None, &body)
}

/// An error page: the same code and message as the API's JSON error.
pub fn error_page(status: u16, code: &str, message: &str) -> String {
    let body = format!(
        r#"<section class="error-page"><h1>{status}</h1><p><code>{}</code>: {}</p><p><a href="/ui">Back to the overview</a></p></section>"#,
        esc(code),
        esc(message)
    );
    let viewer = Viewer { scopes: Vec::new(), auth: false };
    frame(&format!("Error {status}"), Nav::None, "error", Some(&viewer), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        let page = error_page(404, "not_found", "<img src=x onerror=alert(1)>");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;") && !page.contains("<img"));
        assert_eq!(query(&[("status", "failed"), ("queue", "a&b c"), ("q", "")]), "?status=failed&queue=a%26b+c");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(Duration::from_millis(350)), "350 ms");
        assert_eq!(duration(Duration::from_millis(4200)), "4.2 s");
        assert_eq!(duration(Duration::from_secs(190)), "3 m 10 s");
        assert_eq!(duration(Duration::from_secs(7500)), "2 h 5 m");
    }
}
