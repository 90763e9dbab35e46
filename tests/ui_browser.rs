//! The dashboard in a real browser: headless Chromium, driven over WebDriver (chromedriver) with
//! fantoccini, against the real `jobqueue serve` process with API tokens and a config file whose
//! queues run real commands. Every wait is a condition checked in the browser, never a sleep.
//!
//! Screenshots of each page go to `target/ui-screenshots/`. Without Chromium and chromedriver
//! (`scripts/test.sh` installs Debian's `chromium` and `chromium-driver`) the test says so loudly and
//! passes, since nothing was tested.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, http_with, Proc, TestDb};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-the-browser-test";
const READ: &str = "read-token-for-the-browser-test";
/// How long any one condition may take; generous, for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

fn program(env: &str, default: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_string()));
    path.is_file().then_some(path)
}

/// chromedriver on a free port, killed when dropped.
async fn chromedriver(path: &Path) -> (Proc, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::env::temp_dir().join(format!("jq-chromedriver-{}.log", uuid::Uuid::new_v4().simple()));
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Proc { child, name: "chromedriver".into(), log };
    let url = format!("http://127.0.0.1:{port}");
    eventually(WAIT, "chromedriver accepting connections", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await;
    (driver, url)
}

async fn browser(driver: &str, chromium: &Path, extra: &[&str]) -> Client {
    let mut args =
        vec!["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"];
    args.extend_from_slice(extra);
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium, "args": args },
    });
    let Value::Object(caps) = caps else { unreachable!() };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(caps).connect(driver).await.expect("a WebDriver session")
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("waiting for {css}: {e}"))
}

/// Waits until `script` (a function body returning a value) returns `true` in the page.
async fn wait_true(c: &Client, what: &str, script: &str) {
    eventually(WAIT, what, || async {
        (c.execute(script, vec![]).await.ok() == Some(Value::Bool(true))).then_some(())
    })
    .await;
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.unwrap().len()
}

async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/ui")).await.unwrap();
    wait_for(c, "#login").await.find(Locator::Css("#token")).await.unwrap().send_keys(token).await.unwrap();
    c.find(Locator::Css("#login button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_for(c, "#queues-table").await;
}

/// Submits a job over HTTP as any client would; returns its id.
async fn submit(addr: std::net::SocketAddr, body: Value) -> String {
    let auth = format!("Bearer {ADMIN}");
    let r = http_with(addr, "POST", "/jobs", Some(&body.to_string()), &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn job(addr: std::net::SocketAddr, id: &str, wait: &str) -> Value {
    let auth = format!("Bearer {ADMIN}");
    http_with(addr, "GET", &format!("/jobs/{id}?wait={wait}"), None, &[("Authorization", &auth)]).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let (Some(chromium), Some(driver_bin)) =
        (program("CHROMIUM", "/usr/bin/chromium"), program("CHROMEDRIVER", "/usr/bin/chromedriver"))
    else {
        eprintln!(
            "\n!!!!!!!! SKIPPED: the dashboard's browser test needs Chromium and chromedriver \
             (apt-get install chromium chromium-driver, or set CHROMIUM and CHROMEDRIVER); \
             the dashboard was NOT tested in a browser !!!!!!!!\n"
        );
        return;
    };
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("jq-ui-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("flaky-ran-once");
    // slow: runs until cancelled. flaky: its first run fails, every later one succeeds.
    let config = format!(
        r#"
[queues.default]
concurrency = 4

[queues.slow]
concurrency = 2
handler = "command"
command = ["sleep", "120"]

[queues.flaky]
concurrency = 1
handler = "command"
command = ["sh", "-c", "test -e \"$0\" || {{ touch \"$0\"; echo 'first attempt fails' >&2; exit 3; }}", "{}"]
"#,
        marker.display()
    );
    let config_path = dir.join("jobqueue.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut env = db.env();
    env.push(("API_TOKENS".into(), format!("admin:{ADMIN},read:{READ}")));
    env.push(("JOBQUEUE_CONFIG".into(), config_path.display().to_string()));
    env.push(("INSTANCE_ID".into(), "ui-test-instance".into()));
    let server = Proc::jobqueue("ui-server", &["serve"], &env);
    let addr = server.api_addr().await;
    let base = format!("http://{addr}");
    let (_driver, driver_url) = chromedriver(&driver_bin).await;
    let c = browser(&driver_url, &chromium, &[]).await;

    // Signing in: the page asks for a token.
    c.goto(&format!("{base}/ui")).await.unwrap();
    wait_for(&c, "#login").await;
    shot(&c, "sign-in").await;
    sign_in(&c, &base, ADMIN).await;
    wait_true(&c, "the scope shown", "return document.getElementById('whoami').textContent === 'scope: admin'").await;

    // A job submitted by an HTTP client appears on the overview without a reload.
    c.execute("window.notReloaded = true; return null", vec![]).await.unwrap();
    let slow = submit(addr, json!({"payload": {"step": "cancel me"}, "queue": "slow"})).await;
    wait_for(&c, &format!("#newest-live tr[data-job-id='{slow}']")).await;
    assert_eq!(c.execute("return window.notReloaded === true", vec![]).await.unwrap(), Value::Bool(true));
    // Work for the charts: both series of the default queue get points.
    for i in 0..30 {
        submit(addr, json!({"payload": {"n": i}})).await;
    }
    wait_for(&c, "#charts .chart-card[data-queue='default'] [data-kind='wait'] path.s1").await;
    wait_true(
        &c,
        "30 done jobs in the counts",
        "return document.querySelector(\"#queues-table tr[data-queue='default'] td:nth-of-type(3)\").textContent === '30'",
    )
    .await;
    shot(&c, "overview").await;

    // Open it (newer jobs have pushed it off the overview: through the list of its queue), see its
    // lease, cancel it: the page shows the change on its own.
    c.find(Locator::Css("#queues-table tr[data-queue='slow'] th a")).await.unwrap().click().await.unwrap();
    wait_for(&c, &format!("#jobs-live tr[data-job-id='{slow}'] a")).await.click().await.unwrap();
    wait_for(&c, "#job-live .status-line [data-status='processing']").await;
    assert!(c.source().await.unwrap().contains("ui-test-instance"), "the lease holder is shown");
    shot(&c, "job").await;
    c.find(Locator::Css("button[data-action='cancel']")).await.unwrap().click().await.unwrap();
    wait_for(&c, "#job-live .status-line [data-status='cancelled']").await;
    assert_eq!(job(addr, &slow, "0s").await["status"], "cancelled");

    // Retry a failed job: it fails once, then runs and is done.
    let flaky = submit(addr, json!({"payload": {"step": "retry me"}, "queue": "flaky"})).await;
    assert_eq!(job(addr, &flaky, "30s").await["status"], "failed");
    c.goto(&format!("{base}/ui/jobs/{flaky}")).await.unwrap();
    wait_for(&c, "#job-live .status-line [data-status='failed']").await;
    let timeline = wait_for(&c, "ol.timeline").await.text().await.unwrap();
    assert!(timeline.contains("attempt 1 failed") && timeline.contains("first attempt fails"), "{timeline}");
    shot(&c, "job-failed").await;
    c.find(Locator::Css("button[data-action='retry']")).await.unwrap().click().await.unwrap();
    wait_for(&c, "#job-live .status-line [data-status='done']").await;
    assert_eq!(job(addr, &flaky, "0s").await["status"], "done");

    // The jobs list: select two pending jobs and cancel both.
    let mut later = Vec::new();
    for n in 0..2 {
        later.push(submit(addr, json!({"payload": n, "delay": "1h"})).await);
    }
    c.goto(&format!("{base}/ui/jobs?status=pending")).await.unwrap();
    for id in &later {
        wait_for(&c, &format!("tr[data-job-id='{id}'] input.pick")).await.click().await.unwrap();
    }
    wait_true(&c, "two selected", "return document.getElementById('picked').textContent === '2 selected'").await;
    c.find(Locator::Css("button[data-bulk='cancel']")).await.unwrap().click().await.unwrap();
    eventually(WAIT, "cancelled jobs gone from the pending list", || async {
        (count(&c, "#jobs-live tr[data-job-id]").await == 0).then_some(())
    })
    .await;
    for id in &later {
        assert_eq!(job(addr, id, "0s").await["status"], "cancelled");
    }
    c.goto(&format!("{base}/ui/jobs")).await.unwrap();
    wait_for(&c, "#jobs-live tr[data-job-id]").await;
    shot(&c, "jobs").await;

    // A payload holding markup is shown as text and runs nothing.
    let hostile = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";
    let x = submit(addr, json!({"payload": {"html": hostile}, "delay": "1h"})).await;
    c.goto(&format!("{base}/ui/jobs/{x}")).await.unwrap();
    let payload = wait_for(&c, "#payload").await;
    let shown = payload.text().await.unwrap();
    assert!(shown.contains(&json!(hostile).to_string()), "the payload is shown as written: {shown}");
    assert_eq!(count(&c, "#payload *").await, 0, "no element was made from the payload");
    assert_ne!(c.title().await.unwrap(), "pwned");

    // Queues: settings, and pausing.
    c.goto(&format!("{base}/ui/queues")).await.unwrap();
    let row = wait_for(&c, "#queue-settings tr[data-queue='flaky']").await.text().await.unwrap();
    assert!(row.contains("command"), "{row}");
    c.find(Locator::Css("button[data-action='pause'][data-queue='default']")).await.unwrap().click().await.unwrap();
    wait_for(&c, "#queue-settings tr[data-queue='default'] .badge.paused").await;
    shot(&c, "queues").await;
    let auth = format!("Bearer {ADMIN}");
    let queues = http_with(addr, "GET", "/queues", None, &[("Authorization", &auth)]).await.json();
    let default = queues["queues"].as_array().unwrap().iter().find(|q| q["queue"] == "default").unwrap().clone();
    assert_eq!(default["paused"], true);

    // A phone's width.
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&format!("{base}/ui")).await.unwrap();
    wait_for(&c, "#charts .chart-card").await;
    shot(&c, "overview-phone").await;
    c.set_window_size(1280, 1000).await.unwrap();

    // A read token: the same pages, no controls.
    c.goto(&format!("{base}/ui")).await.unwrap();
    wait_for(&c, "#logout").await.click().await.unwrap();
    sign_in(&c, &base, READ).await;
    wait_true(&c, "the read scope shown", "return document.getElementById('whoami').textContent === 'scope: read'")
        .await;
    for path in [format!("/ui/jobs/{x}"), format!("/ui/jobs/{flaky}"), "/ui/jobs".into(), "/ui/queues".into()] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        wait_for(&c, "main h1").await;
        assert_eq!(count(&c, "button[data-action], button[data-bulk], input.pick").await, 0, "controls on {path}");
    }
    shot(&c, "job-read-only").await;
    c.close().await.unwrap();

    // Dark mode follows the system's preference.
    let dark = browser(&driver_url, &chromium, &["--force-dark-mode"]).await;
    sign_in(&dark, &base, READ).await;
    wait_true(&dark, "dark colour scheme", "return matchMedia('(prefers-color-scheme: dark)').matches").await;
    wait_for(&dark, "#charts .chart-card").await;
    shot(&dark, "overview-dark").await;
    dark.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
