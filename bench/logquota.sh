#!/usr/bin/env bash
# The log quota target of issue 28: one worker writes RATE lines/s (100 bytes
# each) for SECS seconds to stdout, captured by the master into a log
# directory with a QUOTA-byte quota. Reported:
#   - the log files' total, sampled every 100 ms: its maximum, and how many
#     samples were over the quota (must be 0);
#   - the lines the child wrote (its own count) against RATE x SECS, and the
#     longest single write(2) it saw (a child the master blocked shows it);
#   - the master's CPU over the run, from /proc/PID/stat (utime + stime), in
#     % of one core;
#   - the lines dropped (tandem_log_lines_dropped_total) and the files deleted;
#   - the load average (other builds share the machine).
#
# Needs python3 (the sampler) and curl (the metrics).
# Usage: [MASTER_NICE=N] [TANDEM=target/release/tandem] bench/logquota.sh [RATE] [SECS] [QUOTA] [FILE_SIZE]
# Defaults: 10000 lines/s, 60 s, 5 MiB, 1 MiB. Builds the example in release.
set -euo pipefail

RATE=${1:-10000}
SECS=${2:-60}
QUOTA=${3:-$((5 * 1024 * 1024))}
FILE_SIZE=${4:-$((1024 * 1024))}

cd "$(dirname "$0")/.."
CARGO_INCREMENTAL=0 cargo build --release -q -p tandem-cluster --example log_flood
BIN=target/release/examples/log_flood

WORK=$(mktemp -d)
chmod 700 "$WORK"
mkdir "$WORK/xdg" "$WORK/report"
chmod 700 "$WORK/xdg"
MASTER=
cleanup() {
    if [ -n "$MASTER" ] && kill -0 "$MASTER" 2>/dev/null; then
        kill -TERM "$MASTER" 2>/dev/null || true
        wait "$MASTER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

XDG_RUNTIME_DIR="$WORK/xdg" RUST_LOG=warn "$BIN" --name logquota --rate "$RATE" --secs "$SECS" \
    --line-bytes 100 --log-dir "$WORK/logs" --log-quota "$QUOTA" --log-file-size "$FILE_SIZE" \
    --metrics 127.0.0.1:0 --report "$WORK/report" >"$WORK/out" 2>"$WORK/err" &
MASTER=$!

until grep -q '^ready$' "$WORK/out" 2>/dev/null; do
    kill -0 "$MASTER" || { cat "$WORK/err"; exit 1; }
    sleep 0.05
done
METRICS=$(sed -n 's/^metrics on //p' "$WORK/out")
TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$MASTER/stat"; }
# Time the master's loop thread (its main thread) waited for a CPU, in ns:
# on a machine shared with other work it is the master's delay in reading.
run_wait() { awk '{ print $2 }' "/proc/$MASTER/schedstat"; }
if [ -n "${MASTER_NICE:-}" ]; then renice -n "$MASTER_NICE" -p "$MASTER" >/dev/null; fi
# With TANDEM=path/to/tandem: `tandem logs --follow` runs all along, its
# output counted, and its CPU is reported too (PM2's `pm2 logs` uses 30 %).
FOLLOWER=
if [ -n "${TANDEM:-}" ]; then
    XDG_RUNTIME_DIR="$WORK/xdg" "$TANDEM" logs logquota --follow --lines 0 >"$WORK/follow.out" 2>"$WORK/follow.err" &
    FOLLOWER=$!
fi
START_TICKS=$(cpu_ticks)
START_WAIT=$(run_wait)
START_NS=$(date +%s%N)

DIR="$WORK/logs/logquota"
# The sampler: one process (no fork per sample), every 100 ms on the clock,
# until the child's report appears.
read -r SAMPLES OVER MAX < <(python3 - "$DIR" "$QUOTA" "$WORK/report/worker-1.json" <<'PY'
import os, sys, time
d, quota, done = sys.argv[1], int(sys.argv[2]), sys.argv[3]
samples = over = peak = 0
next_at = time.monotonic()
while not os.path.exists(done):
    total = 0
    try:
        with os.scandir(d) as entries:
            for e in entries:
                try:
                    total += e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass  # deleted between the listing and the stat
    except FileNotFoundError:
        pass
    samples += 1
    over += total > quota
    peak = max(peak, total)
    next_at += 0.1
    time.sleep(max(0.0, next_at - time.monotonic()))
print(samples, over, peak)
PY
)

END_TICKS=$(cpu_ticks)
END_WAIT=$(run_wait)
if [ -n "$FOLLOWER" ]; then
    FOLLOW_TICKS=$(awk '{ print $14 + $15 }' "/proc/$FOLLOWER/stat")
    kill "$FOLLOWER"
fi
END_NS=$(date +%s%N)
SCRAPE=$(curl -s "http://$METRICS/metrics" || true)
dropped=$(printf '%s\n' "$SCRAPE" | awk '/^tandem_log_lines_dropped_total/ { s += $NF } END { print s + 0 }')
deleted=$(printf '%s\n' "$SCRAPE" | awk '/^tandem_log_files_deleted_total/ { print $NF }')
written=$(printf '%s\n' "$SCRAPE" | awk '/^tandem_log_bytes_written_total/ { print $NF }')

WALL=$(awk -v a="$START_NS" -v b="$END_NS" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
CPU=$(awk -v t=$((END_TICKS - START_TICKS)) -v hz="$TCK" -v w="$WALL" 'BEGIN { printf "%.2f", 100 * t / hz / w }')

echo "rate ${RATE} lines/s for ${SECS} s, quota ${QUOTA} bytes, files of ${FILE_SIZE} bytes"
echo "log files total: max ${MAX} bytes over ${SAMPLES} samples (every 100 ms); samples over the quota: ${OVER}"
echo "child: $(cat "$WORK/report/worker-1.json" | tr -d '\n') (asked: $((RATE * SECS)) lines)"
echo "master CPU: ${CPU} % of one core over ${WALL} s ($((END_TICKS - START_TICKS)) ticks at ${TCK}/s)"
echo "master's loop thread waited for a CPU: $(awk -v a="$START_WAIT" -v b="$END_WAIT" 'BEGIN { printf "%.2f", (b - a) / 1e9 }') s in all${MASTER_NICE:+ (reniced to $MASTER_NICE)}"
if [ -n "$FOLLOWER" ]; then
    echo "tandem logs --follow: $(awk -v t="$FOLLOW_TICKS" -v hz="$TCK" -v w="$WALL" 'BEGIN { printf "%.2f", 100 * t / hz / w }') % of one core ($FOLLOW_TICKS ticks, from its start); it printed $(awk 'match($0, / line [0-9]+ /) { x = substr($0, RSTART + 6, RLENGTH - 7) + 0; n++; if (n == 1) f = x; l = x } END { printf "%d lines, numbers %d to %d: %s", n, f, l, (l - f + 1 == n ? "none missed in between" : (l - f + 1 - n) " missed") }' "$WORK/follow.out")"
fi
echo "lines dropped: ${dropped}; files deleted: ${deleted}; bytes written: ${written}"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
