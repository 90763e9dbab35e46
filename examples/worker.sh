#!/usr/bin/env bash
# A jobqueue remote worker in bash, with curl and jq.
#
#   JOBQUEUE_URL=http://localhost:8080 JOBQUEUE_QUEUE=default examples/worker.sh
#
# Long-polls for a job, heartbeats from a background loop while `work` runs, then completes the job
# with work's stdout (JSON) or fails it with work's stderr. Replace `work` with your own command.
set -uo pipefail
URL=${JOBQUEUE_URL:-http://localhost:8080}
QUEUE=${JOBQUEUE_QUEUE:-default}
WORKER=${JOBQUEUE_WORKER:-sh-$(hostname)-$$}
LEASE=${JOBQUEUE_LEASE_SECS:-30}

post() { curl -sS --max-time 75 -X POST -H 'Content-Type: application/json' --data-binary @- "$URL$1"; }

# Your code: the payload (JSON) on stdin, the result (JSON) on stdout; exit non-zero to fail.
work() {
  local payload; payload=$(cat)
  if jq -e 'type == "object" and has("fail")' <<<"$payload" >/dev/null; then
    jq -r .fail <<<"$payload" >&2
    return 1
  fi
  jq -c --arg w "$WORKER" '{echo: ., worker: $w}' <<<"$payload"
}

errors=$(mktemp); trap 'rm -f "$errors"; [ -z "${heartbeat:-}" ] || kill "$heartbeat" 2>/dev/null' EXIT
claim=$(jq -nc --arg w "$WORKER" --arg l "${LEASE}s" '{worker: $w, max: 1, lease: $l, wait: "30s"}')
echo "worker $WORKER polling queue $QUEUE at $URL"
while true; do
  job=$(post "/queues/$QUEUE/claim" <<<"$claim" | jq -c '.jobs[0] // empty') || { sleep 1; continue; }
  [ -n "$job" ] || continue
  id=$(jq -r .id <<<"$job"); token=$(jq -r .lease_token <<<"$job")
  beat=$(jq -nc --arg t "$token" --arg l "${LEASE}s" '{lease_token: $t, lease: $l}')
  ( while sleep $(( LEASE > 3 ? LEASE / 3 : 1 )); do post "/jobs/$id/heartbeat" <<<"$beat" >/dev/null; done ) &
  heartbeat=$!
  if result=$(jq -c .payload <<<"$job" | work 2>"$errors"); then
    body=$(jq -nc --arg t "$token" --argjson r "${result:-null}" '{lease_token: $t, result: $r}'); call=complete
  else
    body=$(jq -nc --arg t "$token" --arg e "$(tail -c 2000 "$errors")" '{lease_token: $t, error: $e}'); call=fail
  fi
  kill "$heartbeat" 2>/dev/null; wait "$heartbeat" 2>/dev/null
  echo "job $id: $call -> $(post "/jobs/$id/$call" <<<"$body" | jq -r '.status // .error')"
done
