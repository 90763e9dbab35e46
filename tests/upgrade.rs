//! Upgrading a database that an older release left behind: every job survives the V4 storage
//! migration (the move to a table partitioned into active and finished jobs) and still runs.

mod common;

use std::time::Duration;

use common::{count, drop_schema, wait_count, Proc, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_at_v3_upgrades_with_every_job_intact_and_its_jobs_still_run() {
    let db = TestDb::new().await;
    let mut c = db.client().await;
    drop_schema(&c).await;
    let log = jobqueue::logging::discard();
    let applied = jobqueue::db::migrate::run_until(&mut c, Some(3), &log).await.unwrap();
    assert_eq!(applied.versions.len(), 3, "{applied:?}");
    assert_eq!(count(&c, "SELECT count(*) FROM pg_class WHERE relname = 'jobs_active'").await, 0, "really V3");

    // Every status an old database can hold, written as V3 left them: pending (one with a unique
    // key, one scheduled in the future), processing under a lease that a dead instance held, and
    // done, failed and cancelled jobs with their results and error history.
    c.batch_execute(
        "INSERT INTO jobs (payload, unique_key) VALUES ('{\"n\": 1}', 'k1');
         INSERT INTO jobs (payload) SELECT jsonb_build_object('n', i) FROM generate_series(2, 50) AS i;
         INSERT INTO jobs (payload, run_at) VALUES ('{\"n\": \"later\"}', now() + interval '1 day');
         INSERT INTO jobs (payload, status, attempts, locked_by, locked_until)
              VALUES ('{\"n\": \"held\"}', 'processing', 1, 'dead-instance', now() - interval '1 minute');
         INSERT INTO jobs (payload, status, result, attempts, finished_at)
              VALUES ('{\"n\": \"done\"}', 'done', '{\"ok\": 18446744073709551617}', 1, now());
         INSERT INTO jobs (payload, status, error, errors, attempts, finished_at)
              VALUES ('{\"n\": \"failed\"}', 'failed', 'boom',
                      '[{\"attempt\": 1, \"at\": \"2025-01-01T00:00:00Z\", \"error\": \"boom\"}]', 1, now());
         INSERT INTO jobs (payload, status, finished_at) VALUES ('{\"n\": \"cancelled\"}', 'cancelled', now());",
    )
    .await
    .unwrap();
    let before: Vec<(uuid::Uuid, String, String)> = c
        .query("SELECT id, status, payload::text || coalesce(result::text, '') || errors::text FROM jobs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(before.len(), 55);

    // The upgrade itself, as an operator runs it.
    let mut p = Proc::jobqueue("migrate", &["migrate"], &db.env());
    assert_eq!(p.wait(Duration::from_secs(60)).await, Some(0), "{}", p.stderr());

    // Every job is there, by the same id, unchanged, in the partition its status belongs to.
    for (id, status, content) in &before {
        let row = c
            .query_one(
                "SELECT status, payload::text || coalesce(result::text, '') || errors::text, tableoid::regclass::text
                 FROM jobs WHERE id = $1",
                &[id],
            )
            .await
            .unwrap_or_else(|e| panic!("job {id} ({status}) lost in the upgrade: {e}"));
        assert_eq!((&row.get::<_, String>(0), &row.get::<_, String>(1)), (status, content), "job {id}");
        let partition: String = row.get(2);
        let expected =
            if matches!(status.as_str(), "pending" | "processing") { "jobs_active" } else { "jobs_finished" };
        assert_eq!(partition, expected, "job {id} ({status})");
    }
    // The unique key still holds against a second live job, and new jobs get time-ordered ids.
    let dup = c.execute("INSERT INTO jobs (payload, unique_key) VALUES ('{}', 'k1')", &[]).await.unwrap_err();
    assert_eq!(dup.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION), "{dup}");
    let new_version: i32 = c
        .query_one("WITH i AS (INSERT INTO jobs (payload) VALUES ('{\"n\": \"new\"}') RETURNING id) SELECT (get_byte(uuid_send(id), 6) >> 4)::int FROM i", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(new_version, 7, "new jobs get UUIDv7 ids");

    // And they run: the pending ones, and the processing one once its dead holder's lease is
    // rescued. (The scheduled one stays pending.)
    let _serve = Proc::jobqueue("serve", &["serve"], &db.env());
    wait_count(
        &c,
        Duration::from_secs(30),
        "every runnable upgraded job done",
        "SELECT count(*) FROM jobs WHERE status = 'done' AND (payload->>'n' ~ '^[0-9]+$' OR payload->>'n' IN ('held', 'new', 'done'))",
        53,
    )
    .await;
    assert_eq!(count(&c, "SELECT count(*) FROM jobs WHERE status = 'pending'").await, 1, "the scheduled job waits");
    assert_eq!(count(&c, "SELECT count(*) FROM jobs_active WHERE status <> 'pending'").await, 0);
}
