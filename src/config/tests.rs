//! Unit tests of the three layers together. The binary's exit code for a bad file is tested in
//! `tests/config.rs`.

use std::path::Path;
use std::time::Duration;

use super::file::{self, FileConfig};
use super::*;

fn name_of(e: ConfigError) -> &'static str {
    match e {
        ConfigError::Value { name, .. } => name,
        ConfigError::File { message, .. } => panic!("a file error: {message}"),
    }
}

#[test]
fn durations_accept_the_documented_forms() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("0"), Some(Duration::ZERO));
    assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
    assert_eq!(parse_duration("soon"), None);
    assert_eq!(parse_duration("30"), None);
}

#[test]
fn bad_values_name_the_variable() {
    let s = Settings { port: Some("http".into()), ..Default::default() };
    let e = s.resolve().unwrap_err();
    assert!(e.to_string().starts_with("invalid PORT=\"http\": expected a whole number"), "{e}");
    assert_eq!(name_of(e), "PORT");

    let s = Settings { workers: Some("0".into()), ..Default::default() };
    assert_eq!(name_of(s.resolve().unwrap_err()), "WORKERS");
    let s = Settings { poll_interval: Some("fast".into()), ..Default::default() };
    assert_eq!(name_of(s.resolve().unwrap_err()), "POLL_INTERVAL");
    let s = Settings { log_format: Some("xml".into()), ..Default::default() };
    assert_eq!(name_of(s.resolve().unwrap_err()), "LOG_FORMAT");
}

#[test]
fn queues_parse_with_options() {
    let q = parse_queues("default:8, email:2:max_attempts=3:backoff=5s,reports", &RetryPolicy::default()).unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q[1].name, "email");
    assert_eq!(q[1].concurrency, 2);
    assert_eq!(q[1].retry.max_attempts, 3);
    assert_eq!(q[1].retry.backoff, Duration::from_secs(5));
    assert_eq!(q[2].concurrency, 1);
    assert!(parse_queues("a:1,a:2", &RetryPolicy::default()).is_err());
    assert!(parse_queues("a:x", &RetryPolicy::default()).is_err());
    assert!(parse_queues("a:1:colour=red", &RetryPolicy::default()).is_err());
    assert!(parse_queues("a:1:jitter=2", &RetryPolicy::default()).is_err());
}

#[test]
fn workers_is_shorthand_for_the_default_queue() {
    let s = Settings { workers: Some("3".into()), ..Default::default() };
    let c = s.resolve().unwrap();
    assert_eq!(c.queues.len(), 1);
    assert_eq!(c.queues[0].name, "default");
    assert_eq!(c.queues[0].concurrency, 3);
    assert_eq!(c.handler("default"), &HandlerSpec::Builtin);
}

#[test]
fn zero_retention_disables_deletion() {
    let s = Settings { retention_done: Some("0".into()), ..Default::default() };
    assert_eq!(s.resolve().unwrap().retention.done, None);
}

fn parse(text: &str) -> Result<FileConfig, String> {
    file::parse(Path::new("test.toml"), text).map_err(|e| e.to_string())
}

#[test]
fn the_example_file_parses() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/jobqueue.toml"));
    let f = file::load(path).unwrap();
    let names: Vec<_> = f.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["default", "email", "thumbnails"]);
    let email = &f.queues[1];
    assert_eq!((email.concurrency, email.max_attempts), (Some(32), Some(5)));
    assert_eq!((email.timeout, email.backoff), (Some(Duration::from_secs(30)), Some(Duration::from_secs(2))));
    assert!(matches!(&email.handler, HandlerSpec::Webhook { url, .. } if url == "https://mailer.internal/jobs"));
    let thumbnails = &f.queues[2];
    assert_eq!(thumbnails.timeout, Some(Duration::from_secs(300)));
    assert_eq!(
        thumbnails.handler,
        HandlerSpec::Command { argv: vec!["./bin/resize".into(), "--quality".into(), "80".into()] }
    );
    assert_eq!(f.queues[0].handler, HandlerSpec::Builtin);
    assert_eq!(f.settings, [("job_timeout", "5m".to_string())]);

    // README shows the same file, after its two lines of comment.
    let text = std::fs::read_to_string(path).unwrap();
    let body = text.split_once("\n\n").unwrap().1;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains(&format!("```toml\n{body}```")), "README's config file example differs from {path:?}");
}

#[test]
fn bad_files_name_the_queue_and_key() {
    let cases = [
        ("[queues.a]\ncolour = 1", "[queues.a] unknown key \"colour\""),
        ("colour = 1", "unknown key \"colour\""),
        (
            "[queues.a]\nconcurrency = \"8\"",
            "[queues.a] concurrency: expected a whole number from 1 to 10000, got the string \"8\"",
        ),
        ("[queues.a]\nconcurrency = 0", "[queues.a] concurrency:"),
        ("[queues.a]\ntimeout = \"soon\"", "[queues.a] timeout: expected a duration"),
        ("[queues.a]\nhandler = \"lambda\"", "[queues.a] handler: expected"),
        ("[queues.a]\nhandler = \"webhook\"\nsecret = \"s\"", "[queues.a] url: required"),
        (
            "[queues.a]\nhandler = \"webhook\"\nurl = \"ftp://x/\"\nsecret = \"s\"",
            "[queues.a] url: expected an http or https URL",
        ),
        ("[queues.a]\nhandler = \"webhook\"\nurl = \"not a url\"\nsecret = \"s\"", "[queues.a] url:"),
        ("[queues.a]\nhandler = \"webhook\"\nurl = \"http://h/\"", "[queues.a] secret: required"),
        (
            "[queues.a]\nhandler = \"webhook\"\nurl = \"http://h/\"\nsecret_env = \"JQ_TEST_SURELY_UNSET\"",
            "[queues.a] secret_env: the environment variable JQ_TEST_SURELY_UNSET is not set",
        ),
        ("[queues.a]\nurl = \"http://h/\"", "[queues.a] url: applies only to handler = \"webhook\""),
        ("[queues.a]\nhandler = \"command\"\ncommand = \"./x\"", "[queues.a] command: expected an array of strings"),
        ("[queues.a]\nhandler = \"command\"\ncommand = []", "[queues.a] command: expected a program"),
        ("[queues.a]\nhandler = \"command\"", "[queues.a] command: required"),
        ("port = true", "port: expected a string or a number"),
        ("queues = \"a:1\"", "queues: expected [queues.NAME] tables"),
        ("[queues.a\n", "TOML parse error"),
    ];
    for (text, want) in cases {
        let e = parse(text).unwrap_err();
        assert!(e.starts_with("config file test.toml: "), "{e}");
        assert!(e.contains(want), "for {text:?}: {e:?} does not contain {want:?}");
    }
}

fn with_file(settings: Settings, text: &str) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir().join(format!("jq-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jobqueue.toml");
    std::fs::write(&path, text).unwrap();
    let result = Settings { config: Some(path), ..settings }.resolve();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn the_environment_overrides_the_file() {
    let text = "port = 9000\njob_timeout = \"1m\"\nmax_attempts = 4\n[queues.a]\nconcurrency = 2\nbackoff = \"100ms\"\n[queues.b]\ntimeout = \"5s\"";
    let c = with_file(Settings { port: Some("9100".into()), ..Default::default() }, text).unwrap();
    assert_eq!((c.port, c.job_timeout), (9100, Duration::from_secs(60)));
    let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "the file's queues replace the default one");
    assert_eq!((c.queues[0].concurrency, c.queues[0].retry.max_attempts), (2, 4));
    assert_eq!(c.queues[0].retry.backoff, Duration::from_millis(100));
    assert_eq!(
        (c.queues[1].concurrency, c.queues[1].timeout),
        (super::DEFAULT_CONCURRENCY, Some(Duration::from_secs(5)))
    );

    // QUEUES decides what is served, over the file's settings of the queues it names.
    let text = "[queues.a]\nconcurrency = 2\nhandler = \"command\"\ncommand = [\"true\"]\ntimeout = \"5s\"\n[queues.b]";
    let c = with_file(Settings { queues: Some("a:6:max_attempts=2,c".into()), ..Default::default() }, text).unwrap();
    let served: Vec<_> = c.queues.iter().map(|q| (q.name.as_str(), q.concurrency)).collect();
    assert_eq!(served, [("a", 6), ("c", 1)]);
    assert_eq!((c.queues[0].retry.max_attempts, c.queues[0].timeout), (2, Some(Duration::from_secs(5))));
    assert_eq!(c.handler("a").kind(), "command");
    assert_eq!(c.handler("c").kind(), "builtin");
}

#[test]
fn a_bad_top_level_value_in_the_file_is_reported_as_the_files() {
    let e = with_file(Settings::default(), "poll_interval = \"fast\"").unwrap_err().to_string();
    assert!(e.contains("jobqueue.toml: poll_interval: expected a duration"), "{e}");
    // The same key from the environment is the environment's error, and overrides the file.
    let s = Settings { poll_interval: Some("slow".into()), ..Default::default() };
    let e = with_file(s, "poll_interval = \"1s\"").unwrap_err().to_string();
    assert!(e.starts_with("invalid POLL_INTERVAL=\"slow\""), "{e}");
    let e = with_file(Settings::default(), "[queues.a]\nx = 1").unwrap_err();
    assert!(e.to_string().contains("[queues.a] unknown key \"x\""), "{e}");
}

#[test]
fn secrets_never_print() {
    std::env::set_var("JQ_TEST_HOOK_SECRET", "hunter2-from-env");
    let text = "[queues.a]\nhandler = \"webhook\"\nurl = \"https://h/x\"\nsecret_env = \"JQ_TEST_HOOK_SECRET\"\n\
                [queues.b]\nhandler = \"webhook\"\nurl = \"https://h/y\"\nsecret = \"hunter2-inline\"";
    let c = with_file(Settings::default(), text).unwrap();
    let HandlerSpec::Webhook { secret, .. } = c.handler("a") else { panic!("a webhook") };
    assert_eq!(secret.expose(), b"hunter2-from-env");
    let printed = format!("{c:?}");
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[test]
fn runtime_threads_default_to_half_the_cores_and_can_be_set() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let c = Settings::default().resolve().unwrap();
    assert_eq!(c.runtime_threads, (cores / 2).max(1));
    let c = Settings { runtime_threads: Some("3".into()), ..Default::default() }.resolve().unwrap();
    assert_eq!(c.runtime_threads, 3);
    for bad in ["0", "many", "5000"] {
        let s = Settings { runtime_threads: Some(bad.into()), ..Default::default() };
        assert_eq!(name_of(s.resolve().unwrap_err()), "RUNTIME_THREADS", "{bad}");
    }
}
