'use strict';
// The Node follower through the real tandem Leader, measured the way
// ../shared/anchors/node-cluster-client/cc_bench.js measures cluster-client:
// N follower processes, each keeping C calls in flight for D seconds; total
// calls/s across followers (count / slowest follower's elapsed time), and
// p50/p99 of the pooled per-call latencies.
//
//   node bench/bench.js [--n 4] [--duration 5] [--target DIR] [--out FILE]
//
// DIR holds `examples/standalone` and `tandem-registry` (default: the
// repository's target/release if both are there, else target/debug; build
// them with `cargo build --release --example standalone -p tandem && cargo build --release -p tandem-registry`).
// The leader is one standalone process in front of the bundled registry
// server; every call is a `config` Get that the leader forwards to the
// registry over TCP and answers (one more hop than cluster-client's
// benchmark, whose upstream is in the leader's memory).
// Every child is killed by PID when the run ends, and on SIGINT/SIGTERM.

const { fork, spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

const N = parseInt(arg('n', '4'), 10);
const D = parseFloat(arg('duration', '5')) * 1000;
const REPO = path.resolve(__dirname, '../../..');
const release = path.join(REPO, 'target/release');
const TARGET = arg('target', fs.existsSync(path.join(release, 'examples/standalone')) && fs.existsSync(path.join(release, 'tandem-registry'))
  ? release : path.join(REPO, 'target/debug'));
const OUT = arg('out');
// The object cluster-client's getConfig returns, as the registry value (133 bytes of JSON).
const CONFIG = { appName: 'bench', timeout: 3000, hosts: ['10.0.0.1:12200', '10.0.0.2:12200'], enabled: true };
const VALUE = JSON.stringify({ key: 'app.bench', version: 1, value: CONFIG });
const TOKEN = 'bench-token';

const children = new Set();
function track(child) {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}
function killAll() {
  for (const child of children) {
    try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
  }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => { killAll(); process.exit(1); });
const guard = setTimeout(() => { console.error('bench: over 240 s; stopping'); killAll(); process.exit(2); }, 240000);
guard.unref();

function waitLine(child, re, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${re} within ${ms} ms`)), ms);
    const rl = readline.createInterface({ input: child.stdout });
    rl.on('line', (line) => {
      if (re.test(line)) { clearTimeout(timer); resolve(line); }
    });
    child.once('exit', (code) => reject(new Error(`${child.spawnfile} exited with ${code}`)));
  });
}

function request(child, message, type, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${type} within ${ms} ms`)), ms);
    const onMessage = (m) => {
      if (m.type === 'log') { console.error('[follower]', m.message); return; }
      if (m.type === 'error') { clearTimeout(timer); child.off('message', onMessage); reject(new Error(m.message)); return; }
      if (m.type === type) { clearTimeout(timer); child.off('message', onMessage); resolve(m); }
    };
    child.on('message', onMessage);
    child.send(message);
  });
}

function pct(sorted, p) {
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

function pooled(rs) {
  const all = Float64Array.from(rs.flatMap((r) => r.lats)).sort();
  return {
    n: all.length,
    p50_us: all.length ? +(pct(all, 50) / 1e3).toFixed(1) : null,
    p99_us: all.length ? +(pct(all, 99) / 1e3).toFixed(1) : null,
  };
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tnode-bench-'));
  const registry = track(spawn(path.join(TARGET, 'tandem-registry'), ['serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'error' } }));
  const addr = (await waitLine(registry, /^listening on /, 20000)).slice('listening on '.length).trim();
  execFileSync(path.join(TARGET, 'tandem-registry'), ['put', '--server', addr, 'app.bench', VALUE]);
  const leader = track(spawn(path.join(TARGET, 'examples/standalone'),
    ['--name', 'bench', '--dir', dir, '--registry', addr, '--subscribe', 'app.bench', '--token', TOKEN],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'error' } }));
  await waitLine(leader, /role=leader/, 20000);
  const socket = path.join(dir, 'bench.sock');

  const result = { bench: 'tandem-follower (node)', node: process.version, n: N, durationS: D / 1000, target: TARGET, payload_bytes: VALUE.length, at: new Date().toISOString(), loadavg_start: os.loadavg()[0] };
  const followers = Array.from({ length: N }, () => track(fork(path.join(__dirname, 'follower.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })));
  await Promise.all(followers.map((f) => request(f, { cmd: 'connect', socket, token: TOKEN }, 'connected', 20000)));
  for (const c of [1, 64]) {
    const rs = await Promise.all(followers.map((f) => request(f, { cmd: 'invoke', c, durationMs: D }, 'invoke', D + 30000)));
    const total = rs.reduce((a, r) => a + r.count, 0);
    const secs = Math.max(...rs.map((r) => r.elapsedNs)) / 1e9;
    result[`invoke_c${c}`] = { calls_per_s: Math.round(total / secs), errors: rs.reduce((a, r) => a + r.errs, 0), ...pooled(rs) };
    console.error(`[tandem n=${N}] invoke c=${c}:`, JSON.stringify(result[`invoke_c${c}`]));
  }
  const rss = await Promise.all(followers.map((f) => request(f, { cmd: 'rss' }, 'rss', 5000)));
  result.rss_followers_mib = rss.map((r) => r.rss);
  result.loadavg_end = os.loadavg()[0];
  await Promise.all(followers.map((f) => new Promise((resolve) => { f.once('exit', resolve); f.send({ cmd: 'exit' }); })));
  console.log(JSON.stringify(result));
  if (OUT) fs.appendFileSync(OUT, `${JSON.stringify(result)}\n`);
  killAll();
}

main().catch((e) => { console.error(e); killAll(); process.exit(1); });
