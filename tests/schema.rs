//! The schema as a psql user meets it: defaults, constraints, the updated_at and NOTIFY triggers, and
//! migrations run by real `jobqueue migrate` processes.

mod common;

use std::time::Duration;

use common::{connect, count, drop_schema, Proc, TestDb};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

/// A LISTEN connection whose notifications arrive on the returned channel.
async fn listener(url: &str) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut s = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = s.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    client.batch_execute("LISTEN jobqueue").await.unwrap();
    (client, rx)
}

/// Notifications that arrived after a statement on the same connection round-tripped: NOTIFY is
/// delivered at commit, before the commit's answer, so a following query guarantees they are in.
async fn drain(
    client: &tokio_postgres::Client,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) -> Vec<String> {
    client.batch_execute("SELECT 1").await.unwrap();
    // The sender's connection and the listener's are different sessions: give the listener's socket a
    // moment to be read after the round trip above.
    let mut got = Vec::new();
    while let Ok(Some((_, payload))) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        got.push(payload);
    }
    got
}

/// How many migrations the binary embeds: one file each in `db/migrations`.
fn migration_files() -> i64 {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/db/migrations")).unwrap().count() as i64
}

#[tokio::test]
async fn a_psql_insert_with_only_a_payload_is_a_complete_pending_job() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let row =
        c.query_one(r#"INSERT INTO jobs (payload) VALUES ('{"to": "a@example.com"}') RETURNING *"#, &[]).await.unwrap();
    let job = jobqueue::db::queries::job_from_row(&row).unwrap();
    assert_eq!(job.queue, "default");
    assert_eq!(job.status, jobqueue::JobStatus::Pending);
    assert_eq!(job.payload["to"], "a@example.com");
    assert_eq!((job.attempts, job.priority), (0, 0));
    assert_eq!(job.errors, serde_json::json!([]));
    assert!(job.run_at <= chrono::Utc::now() + chrono::Duration::seconds(1));
    assert_eq!(job.created_at, job.updated_at);
    assert!(job.locked_by.is_none() && job.finished_at.is_none() && job.result.is_none());

    // updated_at follows every UPDATE, whoever runs it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let row = c.query_one("UPDATE jobs SET priority = 3 RETURNING updated_at > created_at", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
}

/// The default id (`jobqueue_uuidv7()`, one SQL expression since V11) is a UUIDv7 whose time is the
/// clock of the insert, to the sub-millisecond, in insertion order within one statement.
#[tokio::test]
async fn default_ids_are_uuidv7_carrying_the_insert_clock_in_order() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let clock = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";
    let before: i64 = c.query_one(clock, &[]).await.unwrap().get(0);
    // Per id: version, variant, and its time in microseconds since the epoch (the 48-bit
    // millisecond plus the 12-bit fraction of it).
    let rows = c
        .query(
            "WITH ins AS (INSERT INTO jobs (payload) SELECT jsonb_build_object('n', i)
                          FROM generate_series(1, 2000) i RETURNING id, (payload->>'n')::int AS n)
             SELECT get_byte(uuid_send(id), 6) >> 4, get_byte(uuid_send(id), 8) >> 6,
                    ('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint * 1000
                      + (('x' || substr(replace(id::text, '-', ''), 14, 3))::bit(12)::int * 1000) / 4096
             FROM ins ORDER BY n",
            &[],
        )
        .await
        .unwrap();
    let after: i64 = c.query_one(clock, &[]).await.unwrap().get(0);
    assert_eq!(rows.len(), 2000);
    let mut last = i64::MIN;
    for row in &rows {
        let (version, variant, us): (i32, i32, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((version, variant), (7, 2), "a UUIDv7 of RFC 9562's variant");
        // The fraction keeps 1/4096 ms: an id's time is at most 1 us below the clock it read.
        assert!(before - 1 <= us && us <= after, "id time {us} outside the insert's clock [{before}, {after}]");
        assert!(us >= last, "ids follow insertion order: {us} after {last}");
        last = us;
    }
    let distinct: i64 = c.query_one("SELECT count(DISTINCT id) FROM jobs", &[]).await.unwrap().get(0);
    assert_eq!(distinct, 2000);
}

#[tokio::test]
async fn named_checks_guard_every_range() {
    let db = TestDb::new().await;
    let c = db.client().await;
    for (sql, constraint) in [
        ("INSERT INTO jobs (payload, status) VALUES ('1', 'todo')", "jobs_status_valid"),
        ("INSERT INTO jobs (payload, priority) VALUES ('1', 5000)", "jobs_priority_range"),
        ("INSERT INTO jobs (payload, max_attempts) VALUES ('1', 0)", "jobs_max_attempts_range"),
        ("INSERT INTO jobs (payload, attempts) VALUES ('1', -1)", "jobs_attempts_range"),
        ("INSERT INTO jobs (payload, queue) VALUES ('1', '')", "jobs_queue_valid"),
        ("INSERT INTO jobs (payload, status) VALUES ('1', 'processing')", "jobs_processing_is_locked"),
        ("INSERT INTO jobs (payload, errors) VALUES ('1', '{}')", "jobs_errors_is_array"),
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        let db_err = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
        assert_eq!(db_err.constraint(), Some(constraint), "{sql}");
    }
    let e = c.batch_execute("INSERT INTO jobs (queue) VALUES ('q')").await.unwrap_err();
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION));
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 0);
}

#[tokio::test]
async fn one_notification_per_statement_and_queue() {
    let db = TestDb::new().await;
    let (lc, mut rx) = listener(&db.url).await;
    let c = db.client().await;

    c.batch_execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, 1000) AS i").await.unwrap();
    assert_eq!(drain(&lc, &mut rx).await, vec!["default"], "1000 rows, one notification");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 1000);

    c.batch_execute("BEGIN; INSERT INTO jobs (payload) VALUES ('1'), ('2'); ROLLBACK;").await.unwrap();
    assert!(drain(&lc, &mut rx).await.is_empty(), "a rolled-back insert notifies nobody");

    c.batch_execute("INSERT INTO jobs (payload) SELECT '1' WHERE false").await.unwrap();
    assert!(drain(&lc, &mut rx).await.is_empty(), "a zero-row insert notifies nobody");

    c.batch_execute("INSERT INTO jobs (payload, queue) VALUES ('1', 'a'), ('2', 'b'), ('3', 'a'), ('4', 'b')")
        .await
        .unwrap();
    let mut got = drain(&lc, &mut rx).await;
    got.sort();
    assert_eq!(got, vec!["a", "b"], "one per distinct queue");

    // Several statements in one transaction: Postgres folds identical notifications.
    c.batch_execute("BEGIN; INSERT INTO jobs (payload) VALUES ('1'); INSERT INTO jobs (payload) VALUES ('2'); COMMIT;")
        .await
        .unwrap();
    assert_eq!(drain(&lc, &mut rx).await, vec!["default"]);

    // Rows inserted already finished are not work: no wake-up.
    c.batch_execute("INSERT INTO jobs (payload, queue, status, finished_at) VALUES ('1', 'f', 'done', now())")
        .await
        .unwrap();
    assert!(drain(&lc, &mut rx).await.is_empty());

    // Naming the partition, as the service's own inserts do.
    c.batch_execute("INSERT INTO jobs_active (payload, queue) VALUES ('1', 'direct'), ('2', 'direct')").await.unwrap();
    assert_eq!(drain(&lc, &mut rx).await, vec!["direct"]);

    // A finished job that a hand-written UPDATE makes pending again moves back into jobs_active,
    // which is an insert there: it wakes the workers like a new job (V13; before, it waited for a
    // poll).
    c.batch_execute("UPDATE jobs SET status = 'pending', finished_at = NULL WHERE queue = 'f'").await.unwrap();
    assert_eq!(drain(&lc, &mut rx).await, vec!["f"]);
}

#[tokio::test]
async fn copy_into_jobs_works_and_notifies_once() {
    let db = TestDb::new().await;
    let (lc, mut rx) = listener(&db.url).await;
    let c = db.client().await;
    let sink = c.copy_in("COPY jobs (payload, queue) FROM STDIN").await.unwrap();
    let data: String = (0..100).map(|i| format!("{{\"n\": {i}}}\tcopied\n")).collect();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 100);
    assert_eq!(drain(&lc, &mut rx).await, vec!["copied"]);
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE queue = 'copied' AND status = 'pending'").await, 100);
}

#[tokio::test]
async fn concurrent_migrate_processes_both_succeed_and_a_third_changes_nothing() {
    // An empty database (not cloned from the template) so that the migrations really run.
    let db = TestDb::new().await;
    let c = db.client().await;
    drop_schema(&c).await;
    let env = db.env();
    let mut a = Proc::jobqueue("migrate-a", &["migrate"], &env);
    let mut b = Proc::jobqueue("migrate-b", &["migrate"], &env);
    assert_eq!(a.wait(Duration::from_secs(60)).await, Some(0), "{}", a.stderr());
    assert_eq!(b.wait(Duration::from_secs(60)).await, Some(0), "{}", b.stderr());
    let applied = count(&c, "SELECT count(*) FROM jobqueue_migrations").await;
    assert_eq!(applied, migration_files());

    let before: String = c
        .query_one("SELECT string_agg(applied_on, ',' ORDER BY version) FROM jobqueue_migrations", &[])
        .await
        .unwrap()
        .get(0);
    let mut third = Proc::jobqueue("migrate-c", &["migrate"], &env);
    assert_eq!(third.wait(Duration::from_secs(60)).await, Some(0));
    let after: String = c
        .query_one("SELECT string_agg(applied_on, ',' ORDER BY version) FROM jobqueue_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after, "nothing re-applied");
    assert_eq!(count(&c, "SELECT count(*) FROM jobqueue_migrations").await, migration_files());
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // As if V1's file had changed since it was applied: the recorded checksum no longer matches.
    c.batch_execute("UPDATE jobqueue_migrations SET checksum = '1' WHERE version = 1").await.unwrap();
    let mut p = Proc::jobqueue("migrate", &["migrate"], &db.env());
    assert_eq!(p.wait(Duration::from_secs(60)).await, Some(1));
    let err = p.stderr();
    assert!(err.contains("V1__jobs") && err.contains("edited after it was applied"), "{err}");
}

#[tokio::test]
async fn serve_and_migrate_create_a_missing_database() {
    let db = TestDb::new().await;
    let name = format!("{}_fresh", db.name);
    let url = db.url.replace(&db.name, &name);
    let mut env = db.env();
    env.retain(|(k, _)| k != "DATABASE_URL");
    env.push(("DATABASE_URL".into(), url.clone()));
    let mut p = Proc::jobqueue("migrate", &["migrate"], &env);
    assert_eq!(p.wait(Duration::from_secs(60)).await, Some(0), "{}", p.stderr());
    let c = connect(&url).await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs").await, 0);
    drop(c);
    let admin = connect(&db.url).await;
    admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await.unwrap();
}

/// An error that waiting cannot fix stops start-up at once, instead of being retried for 30 seconds like
/// a database that is still starting. Here: `verify-full` against a server whose certificate no root
/// vouches for (a default self-signed one), or that offers no TLS at all; either way, fatal.
#[tokio::test]
async fn a_connection_that_cannot_work_fails_at_once_without_retrying() {
    let db = TestDb::new().await;
    let mut env = db.env();
    env.retain(|(k, _)| k != "DATABASE_URL");
    env.push(("DATABASE_URL".into(), format!("{}?sslmode=verify-full", db.url)));
    let mut p = Proc::jobqueue("migrate-tls", &["migrate"], &env);
    assert_eq!(p.wait(Duration::from_secs(60)).await, Some(1), "{}", p.stderr());
    let err = p.stderr();
    assert!(!err.contains("retrying"), "a configuration error was retried: {err}");
    assert!(err.contains("jobqueue: cannot connect to the database"), "{err}");
}

#[tokio::test]
async fn bad_configuration_exits_2_with_one_line_naming_the_variable() {
    for (var, value, expect) in [
        ("PORT", "http", "PORT"),
        ("WORKERS", "0", "WORKERS"),
        ("POLL_INTERVAL", "fast", "POLL_INTERVAL"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT"),
        ("DATABASE_URL", "mysql:/nope", "DATABASE_URL"),
        ("QUEUES", "a:b", "QUEUES"),
        ("MAX_BODY_BYTES", "lots", "MAX_BODY_BYTES"),
    ] {
        let mut p = Proc::jobqueue("bad-config", &["migrate"], &[(var.to_string(), value.to_string())]);
        assert_eq!(p.wait(Duration::from_secs(20)).await, Some(2), "{var}={value}");
        let err = p.stderr();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(expect) && !err.contains("panicked"), "{err}");
    }
}

/// The migrated schema, described from the catalogs in a stable text form: tables and columns,
/// constraints, indexes, triggers, functions, views and storage options.
const SCHEMA_DESCRIPTION: &str = "
SELECT string_agg(line, E'\\n' ORDER BY kind, line) FROM (
    SELECT 1 AS kind, format('column %s.%s %s%s%s', c.table_name, c.column_name, c.data_type,
           CASE WHEN c.is_nullable = 'NO' THEN ' not null' ELSE '' END,
           coalesce(' default ' || c.column_default, '')) AS line
    FROM information_schema.columns c WHERE c.table_schema = 'public' AND c.table_name <> 'jobqueue_migrations'
      AND c.table_name NOT IN (SELECT relname FROM pg_class WHERE relispartition)
    UNION ALL
    SELECT 2, format('constraint %s %s', conname, pg_get_constraintdef(oid))
    FROM pg_constraint WHERE conrelid IN ('jobs'::regclass, 'jobs_active'::regclass, 'jobs_finished'::regclass,
                                        'queues'::regclass, 'instances'::regclass)
      AND NOT (conrelid <> 'jobs'::regclass AND conislocal = false)
    UNION ALL
    SELECT 3, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'jobqueue_migrations'
    UNION ALL
    SELECT 4, pg_get_triggerdef(oid) FROM pg_trigger
    WHERE tgrelid IN ('jobs'::regclass, 'jobs_active'::regclass, 'jobs_finished'::regclass) AND NOT tgisinternal
      AND tgparentid = 0
    UNION ALL
    SELECT 5, pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public'
    UNION ALL
    SELECT 6, 'view jobqueue_stats ' || pg_get_viewdef('jobqueue_stats'::regclass, true)
    UNION ALL
    SELECT 7, 'storage ' || relname || ' ' || array_to_string(reloptions, ', ') FROM pg_class
    WHERE oid IN ('jobs_active'::regclass, 'jobs_finished'::regclass)
) t";

/// Like graphile-worker's schema dump: a reviewed copy of the migrated schema lives in
/// `db/schema.snapshot`, and a migration that changes the schema must update it
/// (`UPDATE_SCHEMA_SNAPSHOT=1 cargo test --test schema`), so the change shows up in review.
#[tokio::test]
async fn the_migrated_schema_matches_the_reviewed_snapshot() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let actual: String = c.query_one(SCHEMA_DESCRIPTION, &[]).await.unwrap().get(0);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/db/schema.snapshot");
    if std::env::var("UPDATE_SCHEMA_SNAPSHOT").is_ok() {
        std::fs::write(path, format!("{actual}\n")).unwrap();
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        expected.trim_end() == actual.trim_end(),
        "the schema drifted from db/schema.snapshot; review the difference, then run \
         UPDATE_SCHEMA_SNAPSHOT=1 cargo test --test schema\n--- actual ---\n{actual}"
    );
}

#[tokio::test]
async fn a_schema_applied_by_hand_is_taken_over_with_baseline() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // Start from nothing, then do what a DBA would: run each file with psql, in order.
    drop_schema(&c).await;
    let mut p = Proc::jobqueue("baseline-empty", &["migrate", "--baseline"], &db.env());
    assert_eq!(p.wait(Duration::from_secs(30)).await, Some(1), "refused without a jobs table");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/db/migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    // In version order, as README's loop has them (`sort -V`): by name, V10 would come before V2.
    let version = |p: &std::path::PathBuf| -> u32 {
        let name = p.file_name().unwrap().to_str().unwrap();
        name[1..name.find("__").unwrap()].parse().unwrap()
    };
    files.sort_by_key(version);
    for f in &files {
        c.batch_execute(&format!("BEGIN; {} COMMIT;", std::fs::read_to_string(f).unwrap())).await.unwrap();
    }
    let mut p = Proc::jobqueue("baseline", &["migrate", "--baseline"], &db.env());
    assert_eq!(p.wait(Duration::from_secs(30)).await, Some(0), "{}", p.stderr());
    assert_eq!(count(&c, "SELECT count(*) FROM jobqueue_migrations").await, files.len() as i64);
    // The service now sees an up-to-date schema: plain migrate changes nothing and succeeds.
    let mut p = Proc::jobqueue("migrate", &["migrate"], &db.env());
    assert_eq!(p.wait(Duration::from_secs(30)).await, Some(0), "{}", p.stderr());
    assert!(p.stderr().contains("\"applied_now\":0"), "{}", p.stderr());
}
