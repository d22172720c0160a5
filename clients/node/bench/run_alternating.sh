#!/usr/bin/env bash
# Issue 27's bench rows in one sitting: ROUNDS rounds (default 3), each running
# back to back cluster-client (the anchor's cc_bench.js, --skip-failover), the
# Node follower and the Python follower through the in-memory Leader
# (examples/bench_leader), then both through the registry-backed Leader
# (examples/standalone + tandem-registry serve). Alternating spreads the noise
# of a shared machine over every row. /proc/loadavg is printed before each run
# and kept in results-<date>-loadavg.txt; the JSON lines are appended to
# results-<date>-cluster-client.jsonl and results-<date>-tandem.jsonl; the
# summary (medians and per-round ratios) is printed at the end.
#
#   CC_DIR=/path/to/writable/copy/of/node-cluster-client clients/node/bench/run_alternating.sh
#   env: ROUNDS=3 DURATION=5 N=4 RUNTIME=multi PYTHON=clients/python/.venv/bin/python
# Build first: cargo build --release --example standalone --example bench_leader -p tandem
#              cargo build --release -p tandem-registry
# CC_DIR: D=$(mktemp -d) && cp -r ../shared/anchors/node-cluster-client "$D/ncc" && (cd "$D/ncc" && npm ci)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CC_DIR=${CC_DIR:?set CC_DIR to a writable copy of the node-cluster-client anchor, with npm ci done}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
N=${N:-4}
RUNTIME=${RUNTIME:-multi}
day=$(date -u +%F)
out="$here/results-$day"
since=$(date -u +%FT%T.000Z)
py=()
[ -n "${PYTHON:-}" ] && py=(--python "$PYTHON")
note() { echo "$(date -u +%T) $1 loadavg $(cat /proc/loadavg)" | tee -a "$out-loadavg.txt" >&2; }
tandem() { # lang upstream
  note "tandem $1 $2"
  timeout 240 node "$here/bench.js" --n "$N" --duration "$DURATION" --lang "$1" --upstream "$2" --runtime "$RUNTIME" \
    "${py[@]}" --out "$out-tandem.jsonl" >/dev/null
}
echo "# session from $since: N=$N, ${DURATION}s per phase, $ROUNDS rounds" >> "$out-loadavg.txt"
for r in $(seq 1 "$ROUNDS"); do
  echo "=== round $r" >&2
  note "cluster-client"
  (cd "$CC_DIR" && timeout 240 node cc_bench.js --n "$N" --duration "$DURATION" --skip-failover \
    --out "$out-cluster-client.jsonl" >/dev/null)
  tandem node memory
  tandem python memory
  tandem node registry
  tandem python registry
done
note "end"
node "$here/summarize.js" --since "$since" "$out-cluster-client.jsonl" "$out-tandem.jsonl"
