#!/usr/bin/env python3
"""A jobqueue remote worker in plain Python (standard library only).

    JOBQUEUE_URL=http://localhost:8080 JOBQUEUE_QUEUE=default python3 examples/worker.py

It long-polls for a job, keeps the job's lease alive from a heartbeat thread while `work` runs, then
reports the result (complete) or the error (fail). Replace `work` with your own code.

An instance that is down or restarting is ridden out: connection errors and 502/503/504 answers are
retried with backoff (0.5 s doubling up to 10 s) until the server answers, so a result is not lost
to a restart. Retrying is safe because the lease token binds the call to one attempt: if the first
try did land, or the lease ran out meanwhile, the retry answers 409 lease_lost and changes nothing.
"""
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

URL = os.environ.get("JOBQUEUE_URL", "http://localhost:8080").rstrip("/")
QUEUE = os.environ.get("JOBQUEUE_QUEUE", "default")
WORKER = os.environ.get("JOBQUEUE_WORKER", f"py-{socket.gethostname()}-{os.getpid()}")
LEASE = int(os.environ.get("JOBQUEUE_LEASE_SECS", "30"))


class Permanent(Exception):
    """Raise this from `work` to fail the job without further attempts."""


def work(job):
    """Your code: return the result (any JSON value), or raise to fail this attempt."""
    payload = job["payload"]
    if isinstance(payload, dict) and "sleep" in payload:
        time.sleep(payload["sleep"])
    if isinstance(payload, dict) and "fail" in payload:
        raise Permanent(payload["fail"])
    return {"echo": payload, "worker": WORKER}


# The server is down, restarting or overloaded: worth asking again.
UNREACHABLE = (OSError, http.client.HTTPException)  # refused, reset, timed out, cut off mid-answer
RETRY_STATUS = (502, 503, 504)


def call(path, body, timeout=75):
    """One POST: (status, answer). Raises one of UNREACHABLE if no answer came."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:  # 4xx/5xx carry {"error", "message"}, unless a proxy answered
        try:
            return e.code, json.load(e)
        except ValueError:
            return e.code, {"error": f"HTTP {e.code}"}


def call_until_answered(path, body):
    """`call`, retried with backoff while the server cannot be reached or answers 502/503/504."""
    delay = 0.5
    while True:
        try:
            status, answer = call(path, body)
            if status not in RETRY_STATUS:
                return status, answer
            why = f"{status} {answer.get('error')}"
        except UNREACHABLE as e:
            why = repr(e)
        print(f"{path}: {why}; retrying in {delay:g}s", flush=True)
        time.sleep(delay)
        delay = min(delay * 2, 10)


def heartbeat(job, stop, stopped):
    while not stop.wait(max(LEASE / 3, 0.5)):
        beat = {"lease_token": job["lease_token"], "lease": f"{LEASE}s"}
        try:
            status, body = call(f"/jobs/{job['id']}/heartbeat", beat, timeout=LEASE)
        except UNREACHABLE:
            continue  # try again at the next beat: the lease may well outlast a restart
        if status in RETRY_STATUS:
            continue
        if status != 200 or body["cancel_requested"]:
            stopped.set()  # lease lost (409) or cancellation requested: stop caring about this job
            return


def run(job):
    token = {"lease_token": job["lease_token"]}
    stop, stopped = threading.Event(), threading.Event()
    threading.Thread(target=heartbeat, args=(job, stop, stopped), daemon=True).start()
    try:
        result = work(job)
        path, body = "complete", {**token, "result": result}
    except Permanent as e:
        path, body = "fail", {**token, "error": str(e), "retry": False}
    except Exception as e:  # retried with the queue's backoff while attempts remain
        path, body = "fail", {**token, "error": f"{type(e).__name__}: {e}"}
    finally:
        stop.set()
    if stopped.is_set() and path == "complete":
        path, body = "release", token  # cancelled meanwhile: release ends it cancelled
    status, answer = call_until_answered(f"/jobs/{job['id']}/{path}", body)
    print(f"job {job['id']}: {path} -> {status} {answer.get('status', answer.get('error'))}", flush=True)


def main():
    claim = {"worker": WORKER, "max": 1, "lease": f"{LEASE}s", "wait": "30s"}
    path = f"/queues/{urllib.parse.quote(QUEUE, safe='')}/claim"
    print(f"worker {WORKER} polling queue {QUEUE} at {URL}", flush=True)
    while True:
        status, body = call_until_answered(path, claim)
        if status != 200:
            print(f"claim answered {status}: {body}; retrying in 1s", flush=True)
            time.sleep(1)
            continue
        for job in body["jobs"]:
            run(job)


if __name__ == "__main__":
    main()
