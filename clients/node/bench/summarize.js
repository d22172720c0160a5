'use strict';
// The summary of run_alternating.sh: for each row (cluster-client; the Node
// and Python followers through the in-memory and the registry-backed Leader)
// the median (min-max) over the rounds of calls/s at concurrency 1 and 64 and
// p50 at concurrency 1, and the ratio to cluster-client computed per round
// (each run against the cluster-client run that opened its round), median (min-max).
//
//   node summarize.js [--since ISO-TIME] FILE.jsonl...

const fs = require('node:fs');

const args = process.argv.slice(2);
let since = '';
const files = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--since') since = args[++i];
  else files.push(args[i]);
}
const runs = files.flatMap((f) => fs.readFileSync(f, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)))
  .filter((r) => r.at >= since && (r.bench === 'cluster-client' || r.upstream))
  .sort((a, b) => (a.at < b.at ? -1 : 1));

const rowOf = (r) => (r.bench === 'cluster-client' ? 'cluster-client 3.7.0' : `${r.bench}, ${r.upstream === 'memory' ? 'in-memory Leader' : 'Leader + registry (1 more hop)'}`);
const rows = new Map();
let cc = null;
for (const r of runs) {
  if (r.bench === 'cluster-client') cc = r;
  const row = rowOf(r);
  if (!rows.has(row)) rows.set(row, []);
  rows.get(row).push({ r, cc });
}

function median(xs) {
  const s = xs.filter((x) => x != null).sort((a, b) => a - b);
  if (!s.length) return null;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
const fmt = (x, d = 0) => (x == null ? '-' : x >= 10000 ? `${(x / 1000).toFixed(1)}k` : x.toFixed(d));
function cell(xs, d = 0) {
  const v = xs.filter((x) => x != null);
  if (!v.length) return '-';
  return `${fmt(median(v), d)} (${fmt(Math.min(...v), d)}-${fmt(Math.max(...v), d)})`;
}

console.log('| follower | runs | calls/s, C=64 | ratio to cluster-client | p50 us, C=1 | ratio to cluster-client | calls/s, C=1 | load avg (1 min) at start |');
console.log('|---|---|---|---|---|---|---|---|');
for (const [row, list] of rows) {
  const get = (f) => list.map(({ r }) => f(r));
  const ratio = (f) => list.map(({ r, cc: c }) => (c && f(c) ? f(r) / f(c) : null));
  const c64 = (r) => r.invoke_c64 && r.invoke_c64.calls_per_s;
  const p50 = (r) => r.invoke_c1 && r.invoke_c1.p50_us;
  const c1 = (r) => r.invoke_c1 && r.invoke_c1.calls_per_s;
  const isCc = row.startsWith('cluster-client');
  console.log(`| ${row} | ${list.length} | ${cell(get(c64))} | ${isCc ? '1' : `${cell(ratio(c64), 2)}x`} | ${cell(get(p50), 1)} | ${isCc ? '1' : `${cell(ratio(p50), 2)}x`} | ${cell(get(c1))} | ${cell(get((r) => r.loadavg_start), 2)} |`);
}
