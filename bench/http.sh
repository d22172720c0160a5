#!/usr/bin/env bash
# HTTP requests/s of examples/http_config in each sharing mode, beside one plain axum process
# (`http_config --plain`: the same routes, no cluster) and Node's cluster (the anchor in
# anchors/node-http), all with the same load generator:
#
#   wrk -t1 -c32 -d${HTTP_BENCH_SECS}s http://ADDR/config/app.greeting            (keep-alive)
#   wrk -t1 -c32 -d${HTTP_BENCH_SECS}s -H 'Connection: close' http://ADDR/...      (one connection per request)
#
# Each server is started on 127.0.0.1:0 (Node: a free port), warmed up, measured, then stopped
# with SIGTERM, in HTTP_BENCH_ROUNDS rounds that alternate the servers' order (A B C, C B A, ...)
# so that a machine whose load changes weighs on every server alike. Each run also counts the
# CPU time (user + sys, from /proc) of every process of the server (its session: the master, the
# agent, the workers), so requests per CPU-second can be compared where wall-clock req/s is
# noisy. Prints a table of the medians over the rounds, with the median of the per-round ratios
# to plain, and the issue's targets on those ratios (reuseport and shared >= 0.9x plain,
# round-robin >= 0.5x, every mode ahead of Node's cluster).
#
# Usage: bench/http.sh [--json FILE]
# Env:   HTTP_BENCH_SECS     measured seconds per run (default 10)
#        HTTP_BENCH_WARMUP   warm-up seconds before each run (default 2)
#        HTTP_BENCH_WORKERS  workers per cluster, tandem and Node (default 2)
#        HTTP_BENCH_ROUNDS   rounds, each server once per round (default 5)
#        NODE_ANCHOR         the Node anchor directory (default ../shared/anchors/node-http
#                            beside the checkout); skipped when node or the directory is absent
# Needs: wrk (not installed by this script), cargo; node for the Node row.
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

JSON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --json) [ $# -ge 2 ] || { echo "--json needs a FILE" >&2; exit 2; }; JSON=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

SECS=${HTTP_BENCH_SECS:-10}
WARMUP=${HTTP_BENCH_WARMUP:-2}
WORKERS=${HTTP_BENCH_WORKERS:-2}
ROUNDS=${HTTP_BENCH_ROUNDS:-5}
TICK=$(getconf CLK_TCK)
CONNS=32
ROUTE=/config/app.greeting
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE_ANCHOR=${NODE_ANCHOR:-$ROOT/../shared/anchors/node-http}

if ! command -v wrk >/dev/null 2>&1; then
  echo "wrk is missing; install it with: apt-get install wrk" >&2
  exit 1
fi

TMP=$(mktemp -d -t tandem-http-bench.XXXXXX)
PID=""        # the server running now, if any (its own process group: started with setsid)
cleanup() {
  if [ -n "$PID" ]; then stop_server || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$ROOT"
echo "== cargo build --release --example http_config" >&2
cargo build --release --example http_config >&2
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/http_config
[ -x "$BIN" ] || { echo "not found after the build: $BIN" >&2; exit 1; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then REV="$REV+dirty"; fi
CORES=$(nproc)
WRK_VERSION=$(wrk -v 2>&1 | head -1 | awk '{print $2}' || true)

# The process state from /proc: gone, or Z once it exited (our child until we reap it).
exited() { local s; s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo gone); [ "$s" = gone ] || [ "$s" = Z ]; }

# start_server NAME CMD...: runs CMD in its own session, waits for "listening on ADDR" (and,
# for a tandem cluster, "cluster ready"), sets PID and ADDR.
start_server() {
  local name=$1; shift
  LOG=$TMP/$name.log
  # Emptied here, not by the child's redirection: the loop below must not read an earlier
  # round's "listening on" before the child opens the file.
  : >"$LOG"
  setsid "$@" >>"$LOG" 2>&1 &
  PID=$!
  # The example prints "listening on ADDR"; a cluster's readiness is the master's
  # event log line (`... tandem_cluster::events: cluster ready: master=...`).
  local want="^listening on "
  case "$name" in reuseport|shared|round-robin) want="cluster ready: " ;; esac
  for _ in $(seq 1 300); do
    grep -qs -- "$want" "$LOG" && break
    if exited "$PID"; then
      echo "$name exited before it was ready:" >&2; cat "$LOG" >&2; wait "$PID" || true; PID=""; return 1
    fi
    sleep 0.1
  done
  grep -q -- "$want" "$LOG" || { echo "$name: no \"$want\" line within 30 s:" >&2; cat "$LOG" >&2; return 1; }
  ADDR=$(sed -n 's/^listening on //p' "$LOG" | head -1)
  # One request must answer 200 before the load starts.
  curl -fsS -o /dev/null --max-time 5 "http://$ADDR$ROUTE" || { echo "$name: GET $ROUTE failed" >&2; cat "$LOG" >&2; return 1; }
}

# SIGTERM to the server, wait up to 10 s, then SIGKILL; then anything left in its process group.
stop_server() {
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 100); do exited "$PID" && break; sleep 0.1; done
  if ! exited "$PID"; then echo "pid $PID did not stop within 10 s of SIGTERM; SIGKILL" >&2; kill -KILL "$PID" 2>/dev/null || true; fi
  wait "$PID" 2>/dev/null || true
  if kill -0 -- "-$PID" 2>/dev/null; then sleep 1; kill -KILL -- "-$PID" 2>/dev/null || true; fi
  PID=""
}

# The CPU time, in clock ticks, of every process in session $1 (the server and its children).
session_ticks() {
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | sed 's/^.*) //' | awk -v s="$1" '$4 == s { t += $12 + $13 } END { print t + 0 }'
}

# run_wrk NAME KIND: KIND is ka (keep-alive) or close. Warm-up, then the measured run; sets
# RPS, LAT (mean latency), REQS, NON2XX (wrk's "Non-2xx or 3xx responses") and SOCKERR (the sum
# of connect/read/write/timeout socket errors) and CPU (the server's CPU-seconds in the run).
run_wrk() {
  local name=$1 kind=$2 hdr=()
  [ "$kind" = close ] && hdr=(-H 'Connection: close')
  wrk -t1 -c"$CONNS" -d"${WARMUP}s" "${hdr[@]}" "http://$ADDR$ROUTE" >/dev/null 2>&1 || true
  local out=$TMP/$name.$kind.wrk t0 t1
  t0=$(session_ticks "$PID")
  wrk -t1 -c"$CONNS" -d"${SECS}s" "${hdr[@]}" "http://$ADDR$ROUTE" >"$out" 2>&1 || { cat "$out" >&2; return 1; }
  t1=$(session_ticks "$PID")
  CPU=$(awk -v a="$t0" -v b="$t1" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }')
  RPS=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  LAT=$(awk '$1 == "Latency" {print $2; exit}' "$out")
  REQS=$(awk '/requests in/ {print $1; exit}' "$out")
  NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
  NON2XX=${NON2XX:-0}
  SOCKERR=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$out")
  SOCKERR=${SOCKERR:-0}
  [ -n "$RPS" ] || { echo "$name $kind: no Requests/sec in the wrk output:" >&2; cat "$out" >&2; return 1; }
  printf '   %-12s %-10s %10.0f req/s  %6s CPU-s  latency %-9s non-2xx %s  socket errors %s\n' \
    "$name" "$kind" "$RPS" "$CPU" "$LAT" "$NON2XX" "$SOCKERR" >&2
}

declare -A R             # R[name.kind.field.round]; after the rounds R[name.kind.field] (medians)
ROWS=(plain reuseport shared round-robin)
measure() {              # measure ROUND NAME CMD...
  local round=$1 name=$2
  echo "== round $round/$ROUNDS, $name: ${*:3}" >&2
  start_server "${@:2}"
  echo "   listening on $ADDR" >&2
  for kind in ka close; do
    run_wrk "$name" "$kind"
    R[$name.$kind.rps.$round]=$RPS; R[$name.$kind.lat.$round]=$LAT; R[$name.$kind.reqs.$round]=$REQS
    R[$name.$kind.non2xx.$round]=$NON2XX; R[$name.$kind.sockerr.$round]=$SOCKERR; R[$name.$kind.cpu.$round]=$CPU
  done
  stop_server
}

NODE_VERSION=""
if command -v node >/dev/null 2>&1 && [ -f "$NODE_ANCHOR/cluster.js" ]; then
  NODE_VERSION=$(node --version)
  ROWS+=(node-cluster)
else
  echo "== node-cluster: skipped (node or $NODE_ANCHOR/cluster.js absent)" >&2
fi
measure_server() {       # measure_server ROUND NAME
  case "$2" in
    plain) measure "$1" plain "$BIN" --plain ;;
    node-cluster)
      PORT=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
      PORT=$PORT WORKERS=$WORKERS measure "$1" node-cluster node "$NODE_ANCHOR/cluster.js" ;;
    *) measure "$1" "$2" "$BIN" --workers "$WORKERS" --mode "$2" ;;
  esac
}
for round in $(seq 1 "$ROUNDS"); do
  order=("${ROWS[@]}")
  if [ $((round % 2)) = 0 ]; then   # every other round backwards
    order=(); for ((i = ${#ROWS[@]} - 1; i >= 0; i--)); do order+=("${ROWS[$i]}"); done
  fi
  for n in "${order[@]}"; do measure_server "$round" "$n"; done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- medians over the rounds ---------------------------------------------------------------
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for n in "${ROWS[@]}"; do
  for kind in ka close; do
    rps=(); eff=(); ratio=(); eratio=(); lat=(); reqs=0; non2xx=0; sockerr=0
    for round in $(seq 1 "$ROUNDS"); do
      r=${R[$n.$kind.rps.$round]} c=${R[$n.$kind.cpu.$round]}
      e=$(awk -v r="$r" -v c="$c" -v s="$SECS" 'BEGIN { printf "%.0f", (c > 0 ? r * s / c : 0) }')
      pe=$(awk -v r="${R[plain.$kind.rps.$round]}" -v c="${R[plain.$kind.cpu.$round]}" -v s="$SECS" 'BEGIN { printf "%.0f", (c > 0 ? r * s / c : 0) }')
      rps+=("$r"); eff+=("$e"); lat+=("${R[$n.$kind.lat.$round]}")
      ratio+=("$(awk -v a="$r" -v b="${R[plain.$kind.rps.$round]}" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }')")
      eratio+=("$(awk -v a="$e" -v b="$pe" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }')")
      reqs=$((reqs + ${R[$n.$kind.reqs.$round]})); non2xx=$((non2xx + ${R[$n.$kind.non2xx.$round]}))
      sockerr=$((sockerr + ${R[$n.$kind.sockerr.$round]}))
    done
    R[$n.$kind.rps]=$(median "${rps[@]}"); R[$n.$kind.eff]=$(median "${eff[@]}")
    R[$n.$kind.ratio]=$(median "${ratio[@]}"); R[$n.$kind.eratio]=$(median "${eratio[@]}")
    R[$n.$kind.ratios]="${ratio[*]}"; R[$n.$kind.lat]="${lat[*]}"; R[$n.$kind.reqs]=$reqs
    R[$n.$kind.non2xx]=$non2xx; R[$n.$kind.sockerr]=$sockerr
  done
done

# ---- the table ---------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
k() { awk -v a="$1" 'BEGIN { printf "%.1fk", a / 1000 }'; }
min_ratio() { case "$1" in reuseport|shared) echo 0.9 ;; round-robin) echo 0.5 ;; *) echo "" ;; esac; }
have_node() { [ -n "${R[node-cluster.ka.rps]:-}" ]; }

echo
echo "http_config, $WORKERS workers, wrk -t1 -c$CONNS -d${SECS}s http://ADDR$ROUTE (warm-up ${WARMUP}s), $ROUNDS rounds in alternating order, medians; $DATE, $CORES cores, load average at start $LOAD_START, at end $LOAD_END; rev $REV"
echo
echo "| | keep-alive req/s | × plain | req per CPU-s | × plain | new connection per request (\`-H 'Connection: close'\`) req/s | × plain | req per CPU-s | × plain | errors (non-2xx + socket) keep-alive / close |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for n in "${ROWS[@]}"; do
  case "$n" in
    plain) label="plain axum, 1 process, multi-thread runtime on every core (\`--plain\`)" ;;
    node-cluster) label="Node \`cluster\`, $WORKERS workers ($NODE_VERSION)" ;;
    *) label="\`$n\`, $WORKERS workers" ;;
  esac
  eka=$(( ${R[$n.ka.non2xx]} + ${R[$n.ka.sockerr]} )); ecl=$(( ${R[$n.close.non2xx]} + ${R[$n.close.sockerr]} ))
  f2() { awk -v a="$1" 'BEGIN { printf "%.2f", a }'; }
  echo "| $label | $(k "${R[$n.ka.rps]}") | $(f2 "${R[$n.ka.ratio]}")× | $(k "${R[$n.ka.eff]}") | $(f2 "${R[$n.ka.eratio]}")× | $(k "${R[$n.close.rps]}") | $(f2 "${R[$n.close.ratio]}")× | $(k "${R[$n.close.eff]}") | $(f2 "${R[$n.close.eratio]}")× | $eka / $ecl |"
done
echo
echo "× plain: the median of the per-round ratios (req/s of the server / req/s of plain in the same round). Per-round req/s ratios:"
for n in "${ROWS[@]}"; do [ "$n" = plain ] || printf '  %-12s keep-alive %s; close %s\n' "$n" "${R[$n.ka.ratios]}" "${R[$n.close.ratios]}"; done

# Targets: a mode meets one when the ratio holds AND its run had no error.
echo
echo "Targets (met only when the run also had 0 errors):"
MET=0; MISSED=0
TARGETS_JSON=""
check() {             # check MODE KIND WHAT GOT OP NEED: OP is ">=" or ">"
  local mode=$1 kind=$2 what=$3 got=$4 op=$5 need=$6 ok
  local errs=$(( ${R[$mode.$kind.non2xx]} + ${R[$mode.$kind.sockerr]} ))
  ok=$(awk -v g="$got" -v n="$need" -v op="$op" 'BEGIN { print ((op == ">" ? g > n : g >= n) ? "met" : "missed") }')
  [ "$errs" -gt 0 ] && ok=missed
  if [ "$ok" = met ]; then MET=$((MET + 1)); else MISSED=$((MISSED + 1)); fi
  printf '  %-12s %-10s %-26s %5s× (target %s %s×, errors %s): %s\n' "$mode" "$kind" "$what" "$got" "$op" "$need" "$errs" "$ok"
  TARGETS_JSON+="${TARGETS_JSON:+,}{\"mode\":\"$mode\",\"connection\":\"$kind\",\"what\":\"$what\",\"ratio\":$got,\"target\":\"$op $need\",\"errors\":$errs,\"met\":$([ "$ok" = met ] && echo true || echo false)}"
}
for kind in ka close; do
  for mode in reuseport shared round-robin; do
    check "$mode" "$kind" "vs plain" "$(awk -v a="${R[$mode.$kind.ratio]}" 'BEGIN { printf "%.2f", a }')" ">=" "$(min_ratio "$mode")"
    if have_node; then   # "ahead of Node's cluster": strictly more req/s
      check "$mode" "$kind" "vs Node cluster" "$(awk -v a="${R[$mode.$kind.rps]}" -v b="${R[node-cluster.$kind.rps]}" 'BEGIN { printf "%.3f", a / b }')" ">" 1
    fi
  done
done
have_node || echo "  (no Node row: the \"ahead of Node's cluster\" targets were not checked)"
echo "  $MET met, $MISSED missed (ka = keep-alive, the issue's command; close = the same targets with -H 'Connection: close')"

# ---- JSON --------------------------------------------------------------------------------
if [ -n "$JSON" ]; then
  {
    printf '{"date":"%s","rev":"%s","cores":%s,"workers":%s,"connections":%s,"seconds":%s,"warmup_seconds":%s,"rounds":%s,' \
      "$DATE" "$REV" "$CORES" "$WORKERS" "$CONNS" "$SECS" "$WARMUP" "$ROUNDS"
    printf '"loadavg_start":"%s","loadavg_end":"%s","wrk":"%s","node":"%s","route":"%s","runs":[' \
      "$LOAD_START" "$LOAD_END" "$WRK_VERSION" "$NODE_VERSION" "$ROUTE"
    sep=""
    for n in "${ROWS[@]}"; do
      for kind in ka close; do
        printf '%s{"server":"%s","connection":"%s","requests_per_sec":%s,"ratio_to_plain":%s,"requests_per_cpu_sec":%s,"cpu_ratio_to_plain":%s,"requests":%s,"latency_mean_per_round":"%s","non2xx":%s,"socket_errors":%s}' \
          "$sep" "$n" "$([ "$kind" = ka ] && echo keep-alive || echo close)" "${R[$n.$kind.rps]}" "${R[$n.$kind.ratio]}" \
          "${R[$n.$kind.eff]}" "${R[$n.$kind.eratio]}" "${R[$n.$kind.reqs]}" \
          "${R[$n.$kind.lat]}" "${R[$n.$kind.non2xx]}" "${R[$n.$kind.sockerr]}"
        sep=","
      done
    done
    printf '],"targets":[%s]}\n' "$TARGETS_JSON"
  } >"$JSON"
  echo "wrote $JSON" >&2
fi
