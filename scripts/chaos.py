#!/usr/bin/env python3
"""Load generator and invariant checker of scripts/chaos.sh (standard library and psql only).

  chaos.py load --urls U1,U2,U3 --duration SECS --out accepted.tsv [--seed N]
  chaos.py remote --exec-log exec.log       (a remote worker; JOBQUEUE_* as examples/worker.py reads them)
  chaos.py check --accepted accepted.tsv --exec-log exec.log --faults "..." [--unexpected-exits N]
                 [--worker-exits N]

psql reads the private cluster from PGHOST/PGPORT/PGUSER/PGDATABASE, set by chaos.sh.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

# Unique keys are drawn from a small pool so that duplicates really happen (200 from POST /jobs, 409
# from a batch, ON CONFLICT from psql) while the first holder is still pending or processing.
KEY_POOL = 30
# The queues whose `done` results name the job, attempt and holder that wrote them: the commands, the
# drill handler (panicky) and the remote workers.
FENCED_QUEUES = "('slow', 'flaky', 'panicky', 'remote')"


def payload(rng, queue):
    """A job's payload. The drill handler of `panicky` panics on the first `panic_attempts` attempts;
    the queue allows 3, so 3 means the job fails after three panics."""
    p = {"n": rng.randrange(10**9)}
    if queue == "panicky":
        p["panic_attempts"] = rng.choice([0, 1, 1, 2, 3])
    return p


def psql(sql, stdin=None):
    out = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-t", "-A", "-F", "\t", "-c", sql],
        input=stdin, capture_output=True, text=True, timeout=30,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return [line.split("\t") for line in out.stdout.splitlines() if line]


class Load:
    def __init__(self, urls, deadline, out, rng):
        self.urls, self.deadline, self.rng = urls, deadline, rng
        self.out = open(out, "a", buffering=1)
        self.lock = threading.Lock()
        self.recent = []  # ids to cancel or retry later
        self.counts = {}

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def accept(self, job_id, source, future=False):
        with self.lock:
            self.out.write(f"{job_id}\t{source}\t{'t' if future else 'f'}\n")
            self.recent.append(job_id)
            if len(self.recent) > 500:
                del self.recent[:250]
        self.count("accepted")

    def request(self, method, path, body=None):
        """Sends to a random instance; on a connection error tries the others. None if all failed."""
        urls = self.urls[:]
        self.rng.shuffle(urls)
        for url in urls:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=3) as r:
                    return r.status, json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                return e.code, None
            except (OSError, ValueError):
                self.count("http_errors")
                continue
        return None, None

    def job(self, queue):
        body = {"payload": payload(self.rng, queue), "queue": queue}
        r = self.rng.random()
        if r < 0.3:
            body["unique_key"] = f"k{self.rng.randrange(KEY_POOL)}"
        elif r < 0.35:
            body["delay"] = "1d"  # deliberately in the future: must still be pending at the end
            body["payload"]["future"] = True
        return body

    def loop(self, interval, step):
        while time.monotonic() < self.deadline:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - keep loading; counted and shown at the end
                self.count(f"error {type(e).__name__}")
            time.sleep(interval * (0.5 + self.rng.random()))

    def api_single(self):
        queue = self.rng.choice(["fast", "fast", "fast", "slow", "flaky", "flaky", "panicky", "remote"])
        body = self.job(queue)
        status, job = self.request("POST", "/jobs", body)
        self.count(f"POST /jobs {status}")
        if status == 201:
            self.accept(job["id"], "api", bool(body["payload"].get("future")))

    def api_batch(self):
        items = [self.job(self.rng.choice(["fast", "fast", "flaky", "flaky", "panicky", "remote"]))
                 for _ in range(self.rng.randrange(1, 11))]
        status, jobs = self.request("POST", "/jobs/batch", items)
        self.count(f"POST /jobs/batch {status}")
        if status == 201:
            for item, job in zip(items, jobs):
                self.accept(job["id"], "batch", bool(item["payload"].get("future")))

    def psql_insert(self):
        n = self.rng.randrange(1, 6)
        rows = []
        for _ in range(n):
            queue = self.rng.choice(["default", "fast", "flaky", "panicky", "remote"])
            key = f"'k{self.rng.randrange(KEY_POOL)}'" if self.rng.random() < 0.3 else "NULL"
            rows.append(f"('{json.dumps(payload(self.rng, queue))}', '{queue}', {key})")
        ids = psql("INSERT INTO jobs (payload, queue, unique_key) VALUES " + ", ".join(rows)
                   + " ON CONFLICT DO NOTHING RETURNING id")
        self.count("psql inserts")
        for (job_id,) in ids:
            self.accept(job_id, "psql")

    def cancel_retry(self):
        with self.lock:
            job_id = self.rng.choice(self.recent) if self.recent else None
        if job_id and self.rng.random() < 0.6:
            status, _ = self.request("POST", f"/jobs/{job_id}/cancel")
            self.count(f"cancel {status}")
        status, jobs = self.request("GET", f"/jobs?status={self.rng.choice(['failed', 'cancelled'])}&limit=20")
        if status == 200 and jobs:
            status, _ = self.request("POST", f"/jobs/{self.rng.choice(jobs)['id']}/retry")
            self.count(f"retry {status}")

    def run(self):
        plan = [(0.05, self.api_single), (0.05, self.api_single), (0.5, self.api_batch),
                (0.5, self.psql_insert), (0.3, self.cancel_retry)]
        threads = [threading.Thread(target=self.loop, args=p, daemon=True) for p in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0, self.deadline - time.monotonic()) + 40)
        print("load:", json.dumps(self.counts, sort_keys=True))


# Each invariant is a query that returns the offending rows (at most 5 shown); none = it holds.
INVARIANTS = [
    ("every accepted job exists",
     "SELECT a.id FROM chaos_accepted a LEFT JOIN jobs j ON j.id = a.id WHERE j.id IS NULL"),
    ("every accepted job reaches a final state",
     "SELECT a.id, j.status FROM chaos_accepted a JOIN jobs j USING (id) "
     "WHERE j.status NOT IN ('done', 'failed', 'cancelled') AND j.run_at < now() + interval '1 hour'"),
    ("every job, accepted or not, is final (bar the ones still scheduled a day ahead)",
     "SELECT id, status FROM jobs WHERE status IN ('pending', 'processing') "
     "AND run_at < now() + interval '1 hour'"),
    ("no row stays processing",
     "SELECT id FROM jobs WHERE status = 'processing'"),
    ("jobs scheduled a day ahead were never claimed (unless retried through the API, which runs them now)",
     "SELECT e.job_id FROM chaos_events e JOIN jobs j ON j.id = e.job_id "
     "WHERE e.kind = 'claim' AND coalesce((j.payload->>'future')::boolean, false) AND NOT EXISTS "
     "(SELECT 1 FROM chaos_events r WHERE r.job_id = e.job_id AND r.kind = 'retry' AND r.seq < e.seq)"),
    ("no job is processing for two holders or attempts at once (no takeover of a processing row)",
     "SELECT job_id, old_locked_by, new_locked_by, old_attempts, new_attempts FROM chaos_events "
     "WHERE kind = 'takeover'"),
    ("claims and exits alternate: every exit ends the attempt that was claimed, by the same holder",
     "SELECT job_id, seq, kind, prev_kind FROM ("
     " SELECT *, lag(kind) OVER w AS prev_kind, lag(new_attempts) OVER w AS prev_attempts,"
     "        lag(new_locked_by) OVER w AS prev_holder"
     " FROM chaos_events WHERE kind IN ('claim', 'exit') WINDOW w AS (PARTITION BY job_id ORDER BY seq)) s "
     "WHERE (kind = 'claim' AND prev_kind = 'claim') OR (kind = 'exit' AND prev_kind IS DISTINCT FROM 'claim') "
     "OR (kind = 'exit' AND (old_attempts IS DISTINCT FROM prev_attempts OR old_locked_by IS DISTINCT FROM prev_holder))"),
    ("no attempt is completed twice (a done job never changes status again)",
     "SELECT job_id, count(*) FILTER (WHERE new_status = 'done'), count(*) FILTER (WHERE old_status = 'done') "
     "FROM chaos_events GROUP BY job_id "
     "HAVING count(*) FILTER (WHERE new_status = 'done') > 1 OR count(*) FILTER (WHERE old_status = 'done') > 0"),
    ("a done result was written by the attempt and instance that held the row (fenced completion)",
     "SELECT job_id, old_attempts, old_locked_by, result FROM chaos_events "
     f"WHERE kind = 'exit' AND new_status = 'done' AND queue IN {FENCED_QUEUES} "
     "AND (result->>'job' IS DISTINCT FROM job_id::text OR (result->>'attempt')::int IS DISTINCT FROM old_attempts "
     "     OR result->>'instance' IS DISTINCT FROM old_locked_by)"),
    ("a claim counts one attempt; an exit keeps it or gives back one (snooze, release)",
     "SELECT job_id, kind, old_attempts, new_attempts FROM chaos_events "
     "WHERE (kind = 'claim' AND new_attempts <> old_attempts + 1) "
     "OR (kind = 'exit' AND new_attempts NOT IN (old_attempts, old_attempts - 1))"),
    ("attempts never exceed max_attempts",
     "SELECT job_id, new_attempts, max_attempts FROM chaos_events "
     "WHERE kind = 'claim' AND new_attempts > max_attempts "
     "UNION ALL SELECT id, attempts, max_attempts FROM jobs WHERE attempts > max_attempts"),
    ("unique keys never doubled: no two live (pending or processing) jobs of one queue and key overlap",
     "WITH starts AS (SELECT job_id, queue, unique_key, seq, at FROM chaos_events "
     "                WHERE unique_key IS NOT NULL AND kind IN ('insert', 'retry')),"
     " spans AS (SELECT s.job_id, s.queue, s.unique_key, s.at AS from_at,"
     "   coalesce((SELECT min(e.at) FROM chaos_events e WHERE e.job_id = s.job_id AND e.seq > s.seq"
     "    AND e.new_status IN ('done', 'failed', 'cancelled')), 'infinity') AS to_at FROM starts s),"
     # Sorted by start, a span overlaps an earlier one exactly when it starts before the latest end so far.
     " ordered AS (SELECT *, max(to_at) OVER (PARTITION BY queue, unique_key ORDER BY from_at, job_id"
     "   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS busy_until FROM spans) "
     "SELECT job_id, queue, unique_key, from_at, busy_until FROM ordered WHERE from_at < busy_until"),
    ("no job was deleted",
     "SELECT job_id FROM chaos_events WHERE kind = 'delete'"),
    ("a handler panic ends its attempt as a retryable error: a panicking job fails only with its attempts "
     "used up",
     "SELECT id, attempts, max_attempts, error FROM jobs WHERE queue = 'panicky' AND status = 'failed' "
     "AND attempts < max_attempts"),
    ("the queue served only remotely was claimed only by remote workers",
     "SELECT job_id, new_locked_by FROM chaos_events WHERE queue = 'remote' AND kind = 'claim' "
     "AND new_locked_by NOT LIKE 'remote-%'"),
]


def remote(args):
    """A remote worker: examples/worker.py as a user runs it, with `work` replaced (as its docstring
    invites) by one that records each execution in the exec log and answers, like the command
    handlers, with its job, attempt and worker name, so that the checker can tell whose result was
    written. 10% of executions outlast the 2 s lease (heartbeats must hold it), 10% fail and are
    retried, 5% fail for good."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import worker  # noqa: E402 - the example, found only once its directory is on the path

    rng = random.Random()
    log = os.open(args.exec_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(what, job):
        # One short write per line: O_APPEND keeps lines of concurrent writers whole.
        os.write(log, f"{what} {job['id']} {job['attempts']} {worker.WORKER} {time.time():.6f}\n".encode())

    def work(job):
        record("start", job)
        r = rng.random()
        time.sleep(rng.uniform(2.2, 3.5) if r < 0.1 else rng.uniform(0, 0.1))
        record("end", job)
        if r >= 0.95:
            raise worker.Permanent("permanent failure")
        if r >= 0.85:
            raise RuntimeError("try again later")
        return {"job": job["id"], "attempt": job["attempts"], "instance": worker.WORKER}

    worker.work = work
    worker.main()


def handler_overlaps(path):
    """Executions of one job that really ran at the same time on two holders: allowed (at-least-once,
    after a lease was lost), shown for information."""
    spans = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) != 5:
                    continue
                what, job, attempt, inst, at = parts
                span = spans.setdefault((job, attempt, inst), [None, None])
                span[0 if what == "start" else 1] = float(at)
    except FileNotFoundError:
        return 0, 0
    by_job = {}
    for (job, _, _), (a, b) in spans.items():
        by_job.setdefault(job, []).append((a or 0.0, b or float("inf")))
    overlaps = 0
    for runs in by_job.values():
        runs.sort()
        for (a1, b1), (a2, _) in zip(runs, runs[1:]):
            if a2 < b1:
                overlaps += 1
    return len(spans), overlaps


def check(args):
    with open(args.accepted) as f:
        psql("\\copy chaos_accepted (id, source, future) FROM STDIN", stdin=f.read())
    (jobs,), = psql("SELECT count(*) FROM jobs")
    (accepted,), = psql("SELECT count(*) FROM chaos_accepted")
    stats = psql("SELECT status, count(*) FROM jobs GROUP BY 1 ORDER BY 1")
    (claims, rescued, released), = psql(
        "SELECT count(*) FILTER (WHERE kind = 'claim'),"
        " count(*) FILTER (WHERE kind = 'exit' AND new_status = 'pending' AND new_attempts = old_attempts),"
        " count(*) FILTER (WHERE kind = 'exit' AND new_attempts = old_attempts - 1) FROM chaos_events")
    (remote_jobs, remote_claims, panicky_jobs, panics), = psql(
        "SELECT (SELECT count(*) FROM jobs WHERE queue = 'remote'),"
        " (SELECT count(*) FROM chaos_events WHERE queue = 'remote' AND kind = 'claim'),"
        " (SELECT count(*) FROM jobs WHERE queue = 'panicky'),"
        # A panicky job has at most 3 errors, well within the 20 that `errors` keeps: this count is exact.
        " (SELECT count(*) FROM jobs, jsonb_array_elements(errors) e"
        "  WHERE queue = 'panicky' AND e->>'error' LIKE 'handler panicked%')")
    execs, overlaps = handler_overlaps(args.exec_log)
    print(f"chaos: statuses {' '.join(f'{s}={n}' for s, n in stats)}; accepted={accepted} claims={claims} "
          f"back-to-pending={rescued} released={released} executions-logged={execs} "
          f"overlapping-executions={overlaps} (allowed) remote-claims={remote_claims} "
          f"unexpected-exits={args.unexpected_exits} worker-exits={args.worker_exits}",
          file=sys.stderr)
    violations = 0
    for name, sql in INVARIANTS:
        rows = psql(sql)
        if rows:
            violations += len(rows)
            print(f"chaos: VIOLATED: {name}: {len(rows)} rows, e.g.", file=sys.stderr)
            for row in rows[:5]:
                print("    " + " | ".join(row), file=sys.stderr)
    # Not from the database: the processes themselves. A handler panic or an instance restart must not
    # end a process; only the faults do.
    exits = args.unexpected_exits + args.worker_exits
    if exits:
        violations += exits
        print(f"chaos: VIOLATED: no instance or remote worker exited by itself: {args.unexpected_exits} "
              f"instances, {args.worker_exits} workers", file=sys.stderr)
    if int(panics) == 0 or int(remote_claims) == 0:
        violations += 1
        print(f"chaos: VIOLATED: the mix ran: panics={panics} remote-claims={remote_claims}", file=sys.stderr)
    total = sum(int(x.split("=")[1]) for x in args.faults.split())
    print(f"chaos: jobs={jobs} (remote={remote_jobs} panicking-handler={panicky_jobs} panics={panics}) "
          f"faults={total} ({args.faults}) invariants={len(INVARIANTS) + 2} violations={violations}")
    return 1 if violations else 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--urls", required=True)
    lp.add_argument("--duration", type=float, required=True)
    lp.add_argument("--out", required=True)
    lp.add_argument("--seed", type=int, default=0)
    cp = sub.add_parser("check")
    cp.add_argument("--accepted", required=True)
    cp.add_argument("--exec-log", required=True)
    cp.add_argument("--faults", required=True)
    cp.add_argument("--unexpected-exits", type=int, default=0)
    cp.add_argument("--worker-exits", type=int, default=0)
    rp = sub.add_parser("remote")
    rp.add_argument("--exec-log", required=True)
    args = p.parse_args()
    if args.cmd == "load":
        Load(args.urls.split(","), time.monotonic() + args.duration, args.out, random.Random(args.seed)).run()
        return 0
    if args.cmd == "remote":
        return remote(args)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
