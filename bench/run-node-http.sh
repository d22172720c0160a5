#!/usr/bin/env bash
# `tandem run` with 2 Node.js workers serving HTTP on one port, against Node's own `cluster`
# module with 2 workers (the anchor in ../shared/anchors/node-http), the same worker code
# (clients/node/examples/config-http.js is the anchor's app.js taking its port from fd 3),
# the same load, in alternating rounds:
#
#   wrk -t1 -c32 -d${SECS}s http://ADDR/config/app.greeting        (keep-alive)
#
# Prints each round's req/s and the ratio of the medians (target: tandem run >= 0.9x Node's),
# then `tandem reload` under the same keep-alive load (target: 0 failed requests).
# Usage: bench/run-node-http.sh
# Env:   SECS (measured seconds per run, default 10), ROUNDS (default 3), WORKERS (default 2),
#        NODE_ANCHOR (default ../shared/anchors/node-http beside the checkout)
# Needs: wrk, node, cargo (it builds the release `tandem`).
set -euo pipefail
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE_ANCHOR=${NODE_ANCHOR:-$ROOT/../shared/anchors/node-http}
for tool in wrk node cargo; do
  command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done
[ -f "$NODE_ANCHOR/cluster.js" ] || { echo "no Node anchor at $NODE_ANCHOR" >&2; exit 1; }
(cd "$ROOT" && cargo build --release --bin tandem >&2)
TANDEM=${CARGO_TARGET_DIR:-$ROOT/target}/release/tandem
TMP=$(mktemp -d -t tandem-run-bench.XXXXXX)
export XDG_RUNTIME_DIR=$TMP/xdg
mkdir -m 700 "$XDG_RUNTIME_DIR"
PID=""
cleanup() { [ -z "$PID" ] || { kill -TERM "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; }; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 1 300); do grep -q "$2" "$1" && return 0; sleep 0.1; done; echo "no '$2' in $1:" >&2; cat "$1" >&2; exit 1; }
measure() {  # URL -> req/s
  wrk -t1 -c32 -d2s "$1" >/dev/null 2>&1   # warm-up
  wrk -t1 -c32 -d"${SECS}s" "$1" | awk '/Requests\/sec/ {print $2}'
}

declare -a T N
for round in $(seq 1 "$ROUNDS"); do
  PORT=$(free_port)
  "$TANDEM" run --name bench-run --workers "$WORKERS" --listen "127.0.0.1:$PORT" \
    -- node "$ROOT/clients/node/examples/config-http.js" >"$TMP/tandem.log" 2>&1 &
  PID=$!
  wait_for "$TMP/tandem.log" "^ready: "
  T[$round]=$(measure "http://127.0.0.1:$PORT/config/app.greeting")
  kill -TERM "$PID"; wait "$PID" || true; PID=""

  PORT=$(free_port)
  (cd "$NODE_ANCHOR" && PORT=$PORT WORKERS=$WORKERS exec node cluster.js) >"$TMP/node.log" 2>&1 &
  PID=$!
  wait_for "$TMP/node.log" "listening on"
  N[$round]=$(measure "http://127.0.0.1:$PORT/config/app.greeting")
  kill -TERM "$PID"; wait "$PID" || true; PID=""
  echo "round $round: tandem run ${T[$round]} req/s, node cluster ${N[$round]} req/s (load $(cut -d' ' -f1 /proc/loadavg))"
done
# Reload under keep-alive load: `tandem reload` 3 s into a wrk run; wrk prints "Socket errors"
# and "Non-2xx" lines only when there are some.
PORT=$(free_port)
"$TANDEM" run --name bench-run --workers "$WORKERS" --listen "127.0.0.1:$PORT" \
  -- node "$ROOT/clients/node/examples/config-http.js" >"$TMP/tandem.log" 2>&1 &
PID=$!
wait_for "$TMP/tandem.log" "^ready: "
wrk -t1 -c32 -d"${SECS}s" "http://127.0.0.1:$PORT/config/app.greeting" >"$TMP/reload.wrk" 2>&1 &
LOAD=$!
sleep 3
START=$(date +%s%N)
"$TANDEM" reload bench-run >"$TMP/reload.out" 2>&1 || { echo "reload failed:" >&2; cat "$TMP/reload.out" >&2; }
TOOK=$((($(date +%s%N) - START) / 1000000))
wait "$LOAD" || true
kill -TERM "$PID"; wait "$PID" || true; PID=""
ERRORS=$(grep -E "Socket errors|Non-2xx" "$TMP/reload.wrk" | tr -s ' ' | paste -sd ';' - || true)
echo "reload under load: took ${TOOK} ms; $(grep 'requests in' "$TMP/reload.wrk" | awk '{print $1}') requests; errors: ${ERRORS:-none}"
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
TM=$(median "${T[@]}"); NM=$(median "${N[@]}")
echo "median: tandem run $TM req/s, node cluster $NM req/s, ratio $(awk -v t="$TM" -v n="$NM" 'BEGIN {printf "%.2f", t/n}')x (target >= 0.9x)"
