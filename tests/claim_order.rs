//! The order in which jobs run: claims after a cursor while a backlog is worked through, urgent jobs
//! overtaking it, the local queue of jobs claimed ahead, and the upkeep of the claim index after a
//! burst.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, wait_count, TestDb};
use jobqueue::{HandlerError, JobContext};
use serde_json::Value;
use tokio::sync::Semaphore;

/// Inserts a backlog of `backlog` jobs, starts an instance with two slots whose handler records each
/// payload and takes at least 1 ms, and once 50 have run executes `insert`, which adds one job whose
/// payload is the string `marker`. Returns when that job ran: its place in the recorded order, and how
/// many jobs had run before the insert.
async fn place_behind_backlog(backlog: i32, insert: &str, marker: &str, within: Duration) -> (usize, usize) {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.execute("INSERT INTO jobs (payload) SELECT to_jsonb(i) FROM generate_series(1, $1) AS i", &[&backlog])
        .await
        .unwrap();
    let order: Arc<Mutex<Vec<Value>>> = Arc::default();
    let handler = {
        let order = order.clone();
        move |ctx: JobContext| {
            order.lock().unwrap().push(ctx.job.payload.clone());
            async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<_, HandlerError>(Value::Null)
            }
        }
    };
    let svc = common::start_with(db.config(2), handler).await;
    common::eventually(Duration::from_secs(10), "the drain under way", || {
        let n = order.lock().unwrap().len();
        async move { (n >= 50).then_some(()) }
    })
    .await;
    let before = order.lock().unwrap().len();
    c.batch_execute(insert).await.unwrap();
    let at = common::eventually(within, &format!("the {marker} job ran"), || {
        let pos = order.lock().unwrap().iter().position(|p| p == marker);
        async move { pos }
    })
    .await;
    svc.stop().await.expect("stops cleanly");
    (at, before)
}

/// While a backlog is worked through, claims continue after where the last one ended (so they do
/// not walk the dead index entries of every job claimed before); a more urgent job inserted
/// meanwhile must still run next, not after the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_job_inserted_behind_a_backlog_runs_next() {
    let insert = "INSERT INTO jobs (payload, priority) VALUES ('\"urgent\"', -1000)";
    let (at, before) = place_behind_backlog(2000, insert, "urgent", Duration::from_secs(10)).await;
    // Behind it only what started while its wake-up and its claim were on their way: a few
    // milliseconds, at two jobs a millisecond (12 once on a loaded machine). Found by the claim from
    // the head, which comes at least every second, it could run up to 2,000 jobs later.
    assert!(at < before + 100, "the urgent job ran as job {at}, {} jobs after its insert", at - before);
}

/// A wake-up during a backlog claims only what is more urgent than the cursor; a job of the same
/// priority that sorts before the cursor (here: inserted with an old `run_at`) is found by the claim
/// from the head that comes at least every second, so it still runs long before the backlog ends
/// (two slots of at least 1 ms each: the backlog takes at least 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sorting_before_the_cursor_runs_before_the_backlog_ends() {
    let insert = "INSERT INTO jobs (payload, run_at) VALUES ('\"old\"', now() - interval '1 hour')";
    let (at, before) = place_behind_backlog(6000, insert, "old", Duration::from_secs(30)).await;
    // Found within about a second, when at most about 2,000 backlog jobs can have run.
    assert!(at < before + 4000, "the old job ran as job {at}, {} jobs after its insert", at - before);
}

/// After a burst has drained, the claim index and heap of `jobs_active` are full of dead versions
/// that every claim from the head walks until a vacuum; autovacuum may take up to a minute to come
/// round, so an instance vacuums the partition itself once dead versions outnumber live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_burst_is_vacuumed_without_waiting_for_autovacuum() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let vacuumed = "SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'jobs_active' AND last_vacuum IS NOT NULL";
    assert_eq!(count(&c, vacuumed).await, 0, "a fresh database has never been vacuumed by hand");
    let svc = common::start_with(db.config(100), common::noop()).await;
    c.batch_execute("INSERT INTO jobs (payload) SELECT '{}' FROM generate_series(1, 30000)").await.unwrap();
    wait_count(&c, Duration::from_secs(120), "burst done", "SELECT count(*) FROM jobs WHERE status = 'done'", 30000)
        .await;
    wait_count(&c, Duration::from_secs(30), "jobs_active vacuumed by an instance", vacuumed, 1).await;
    // A vacuum may have run mid-burst, once dead versions outnumbered the live; another follows the
    // drain's end, which leaves fewer dead versions than the threshold.
    common::eventually(Duration::from_secs(30), "the drained burst's dead versions removed", || async {
        let dead = count(&c, "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'jobs_active'").await;
        (dead < 10_000).then_some(())
    })
    .await;
    svc.stop().await.expect("stops cleanly");
}

/// An instance serving queue `queue` with two slots, whose handler records each payload as it starts
/// and holds jobs whose payload starts with "block" until the gate lets them through.
struct Gated {
    svc: jobqueue::Service,
    queue: &'static str,
    order: Arc<Mutex<Vec<Value>>>,
    gate: Arc<Semaphore>,
}

impl Gated {
    /// Its own queue, so that its claim count in the process-wide metrics is its own.
    async fn start(db: &TestDb, queue: &'static str) -> Gated {
        let order: Arc<Mutex<Vec<Value>>> = Arc::default();
        let gate = Arc::new(Semaphore::new(0));
        let handler = {
            let (order, gate) = (order.clone(), gate.clone());
            move |ctx: JobContext| {
                order.lock().unwrap().push(ctx.job.payload.clone());
                let blocks = ctx.job.payload.as_str().is_some_and(|p| p.starts_with("block"));
                let gate = gate.clone();
                async move {
                    if blocks {
                        gate.acquire().await.expect("the gate stays open").forget();
                    }
                    Ok::<_, HandlerError>(Value::Null)
                }
            }
        };
        let config = jobqueue::Config { queues: vec![], ..db.config(2) };
        let svc = jobqueue::Builder::new(config)
            .queue(jobqueue::QueueConfig::new(queue, 2))
            .handler(queue, handler)
            .start()
            .await
            .expect("service starts");
        Gated { svc, queue, order, gate }
    }

    /// How many jobs the producer has taken in (the wait of each is recorded as it is held).
    fn held(&self) -> u64 {
        let text = jobqueue::metrics::handle().expect("the service's recorder").render();
        let prefix = format!(r#"jobqueue_job_wait_seconds_count{{queue="{}"}}"#, self.queue);
        let line = text.lines().find(|l| l.starts_with(&prefix));
        line.and_then(|l| l.rsplit(' ').next()).map_or(0, |n| n.parse::<u64>().expect("a count"))
    }

    fn started(&self) -> Vec<Value> {
        self.order.lock().unwrap().clone()
    }

    async fn until(&self, what: &str, done: impl Fn(&Gated) -> bool) {
        common::eventually(Duration::from_secs(10), what, || {
            let ok = done(self);
            async move { ok.then_some(()) }
        })
        .await;
    }

    /// Inserts a job more urgent than the others and waits until the producer holds it (`held` jobs in
    /// all), while only the two blockers run; then lets one blocker end and checks that the urgent job
    /// takes its slot.
    async fn urgent_takes_the_next_slot(&self, c: &tokio_postgres::Client, held: u64, what: &str) {
        let insert =
            format!(r#"INSERT INTO jobs (queue, payload, priority) VALUES ('{}', '"urgent"', -5)"#, self.queue);
        c.batch_execute(&insert).await.unwrap();
        self.until(what, |g| g.held() == held).await;
        assert_eq!(self.started().len(), 2, "only the blockers have started");
        assert_eq!(self.next_start().await, "urgent", "the urgent job takes the first free slot");
    }

    /// Lets one blocked job end, and waits for the next job to start: one slot at a time, since two
    /// executors started together may call their handlers in either order.
    async fn next_start(&self) -> Value {
        let n = self.started().len();
        self.gate.add_permits(1);
        self.until("the next job started", |g| g.started().len() > n).await;
        self.started()[n].clone()
    }
}

/// Jobs claimed ahead of a free slot start most urgent first across claims, not in claim order, and
/// the producer claims while they wait: an urgent job that a later claim brings starts at the next
/// free slot, before a job claimed earlier. (Before the local queue, the producer waited for a slot
/// for each job it had claimed, in order, and claimed nothing meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_claim_of_an_urgent_job_starts_it_before_jobs_claimed_ahead() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let g = Gated::start(&db, "order").await;
    // Two slots and room for four: both blockers run and `ahead` waits for a slot, with room left.
    c.batch_execute(r#"INSERT INTO jobs (queue, payload) VALUES ('order', '"block1"'), ('order', '"block2"'), ('order', '"ahead"')"#)
        .await
        .unwrap();
    g.until("the blockers running and one job claimed ahead", |g| g.held() == 3 && g.started().len() == 2).await;
    g.urgent_takes_the_next_slot(&c, 4, "the urgent job claimed while the others wait").await;
    // The urgent job ends at once, and its slot goes to the job claimed ahead.
    g.until("the job claimed ahead started", |g| g.started().len() == 4).await;
    assert_eq!(g.started()[3], "ahead");
    g.gate.add_permits(1);
    wait_count(&c, Duration::from_secs(10), "all done", "SELECT count(*) FROM jobs WHERE status = 'done'", 4).await;
    g.svc.stop().await.expect("stops cleanly");
}

/// With the room full (every slot busy, as many jobs claimed ahead) during a backlog, a wake-up is
/// answered at once from a small reserve of places for urgent jobs, rather than after a job ends: when
/// long jobs end together, the freed slots took the jobs claimed ahead before a claim that waited for
/// room came back, and the urgent job waited a whole round more (100 ms behind 50 ms jobs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_job_is_claimed_at_once_when_the_room_is_full() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let g = Gated::start(&db, "reserve").await;
    // Room for four: the first claim takes four of the six (a backlog), two run and two wait.
    c.batch_execute(
        r#"INSERT INTO jobs (queue, payload) SELECT 'reserve', to_jsonb('block' || i) FROM generate_series(1, 6) AS i"#,
    )
    .await
    .unwrap();
    g.until("the room full", |g| g.held() == 4 && g.started().len() == 2).await;
    g.urgent_takes_the_next_slot(&c, 5, "the urgent job claimed though no job has ended").await;
    g.gate.add_permits(10);
    wait_count(&c, Duration::from_secs(10), "all done", "SELECT count(*) FROM jobs WHERE status = 'done'", 7).await;
    g.svc.stop().await.expect("stops cleanly");
}

/// How many jobs a queue claims ahead follows its handlers' recent times: four times its slots while
/// they are quick (claims are then large batches), as many as its slots once they take longer than the
/// horizon, so that jobs held here while other instances may have free slots wait about one handler's
/// time at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_handlers_get_four_times_their_slots_claimed_ahead_and_slow_ones_as_many() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let gate = gate.clone();
        move |ctx: JobContext| {
            let gate = gate.clone();
            let (block, ms) = (ctx.job.payload["block"] == true, ctx.job.payload["ms"].as_u64().unwrap_or(0));
            async move {
                if block {
                    gate.acquire().await.expect("the gate stays open").forget();
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, HandlerError>(Value::Null)
            }
        }
    };
    let config = jobqueue::Config { queues: vec![], ..db.config(2) };
    let svc = jobqueue::Builder::new(config)
        .queue(jobqueue::QueueConfig::new("ahead", 2))
        .handler("ahead", handler)
        .start()
        .await
        .expect("service starts");
    let insert = |n: i32, payload: &'static str| {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO jobs (queue, payload) SELECT 'ahead', $2::text::jsonb FROM generate_series(1, $1)",
                &[&n, &payload],
            )
            .await
            .unwrap();
        }
    };
    let (processing, done) =
        ("SELECT count(*) FROM jobs WHERE status = 'processing'", "SELECT count(*) FROM jobs WHERE status = 'done'");
    let held_still = |expected: i64, what: &'static str| {
        let c = &c;
        async move {
            wait_count(c, Duration::from_secs(10), what, processing, expected).await;
            // Nothing ends while the gate is shut: a bound that held for a moment holds.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(count(c, processing).await, expected, "{what}, still");
        }
    };

    insert(40, r#"{"ms": 0}"#).await;
    wait_count(&c, Duration::from_secs(10), "quick jobs done", done, 40).await;
    insert(30, r#"{"block": true}"#).await;
    held_still(10, "quick handlers: 2 running, 8 claimed ahead").await;

    gate.add_permits(30);
    wait_count(&c, Duration::from_secs(10), "the blocked jobs done", done, 70).await;
    insert(40, r#"{"ms": 30}"#).await;
    wait_count(&c, Duration::from_secs(20), "30 ms jobs done", done, 110).await;
    insert(30, r#"{"block": true}"#).await;
    held_still(4, "slow handlers: 2 running, 2 claimed ahead").await;

    gate.add_permits(30);
    svc.stop().await.expect("stops cleanly");
}
