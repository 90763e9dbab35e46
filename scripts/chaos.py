#!/usr/bin/env python3
"""Load generator and invariant checker of scripts/chaos.sh (standard library and psql only).

  chaos.py load --urls U1,U2,U3 --duration SECS --out accepted.tsv [--seed N]
  chaos.py check --accepted accepted.tsv --exec-log exec.log --faults "..." [--unexpected-exits N]

psql reads the private cluster from PGHOST/PGPORT/PGUSER/PGDATABASE, set by chaos.sh.
"""

import argparse
import json
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
        body = {"payload": {"n": self.rng.randrange(10**9)}, "queue": queue}
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
        queue = self.rng.choice(["fast", "fast", "fast", "slow", "flaky", "flaky"])
        body = self.job(queue)
        status, job = self.request("POST", "/jobs", body)
        self.count(f"POST /jobs {status}")
        if status == 201:
            self.accept(job["id"], "api", bool(body["payload"].get("future")))

    def api_batch(self):
        items = [self.job(self.rng.choice(["fast", "flaky"])) for _ in range(self.rng.randrange(1, 11))]
        status, jobs = self.request("POST", "/jobs/batch", items)
        self.count(f"POST /jobs/batch {status}")
        if status == 201:
            for item, job in zip(items, jobs):
                self.accept(job["id"], "batch", bool(item["payload"].get("future")))

    def psql_insert(self):
        n = self.rng.randrange(1, 6)
        rows = []
        for _ in range(n):
            queue = self.rng.choice(["default", "fast", "flaky"])
            key = f"'k{self.rng.randrange(KEY_POOL)}'" if self.rng.random() < 0.3 else "NULL"
            rows.append(f"('{{\"n\": {self.rng.randrange(10**9)}}}', '{queue}', {key})")
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
     "WHERE kind = 'exit' AND new_status = 'done' AND queue IN ('slow', 'flaky') "
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
]


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
    execs, overlaps = handler_overlaps(args.exec_log)
    print(f"chaos: statuses {' '.join(f'{s}={n}' for s, n in stats)}; accepted={accepted} claims={claims} "
          f"back-to-pending={rescued} released={released} command-executions={execs} "
          f"overlapping-executions={overlaps} (allowed) unexpected-exits={args.unexpected_exits}",
          file=sys.stderr)
    violations = 0
    for name, sql in INVARIANTS:
        rows = psql(sql)
        if rows:
            violations += len(rows)
            print(f"chaos: VIOLATED: {name}: {len(rows)} rows, e.g.", file=sys.stderr)
            for row in rows[:5]:
                print("    " + " | ".join(row), file=sys.stderr)
    total = sum(int(x.split("=")[1]) for x in args.faults.split())
    print(f"chaos: jobs={jobs} faults={total} ({args.faults}) invariants={len(INVARIANTS)} violations={violations}")
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
    args = p.parse_args()
    if args.cmd == "load":
        Load(args.urls.split(","), time.monotonic() + args.duration, args.out, random.Random(args.seed)).run()
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
