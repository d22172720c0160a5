'use strict';
// The Node (or Python) follower through a real tandem Leader, measured the way
// ../shared/anchors/node-cluster-client/cc_bench.js measures cluster-client:
// N follower processes, each keeping C calls in flight for D seconds; total
// calls/s across followers (count / slowest follower's elapsed time), and
// p50/p99 of the pooled per-call latencies.
//
//   node bench/bench.js [--n 4] [--duration 5] [--upstream memory|registry]
//                       [--runtime multi|current] [--lang node|python] [--python PATH]
//                       [--target DIR] [--out FILE]
//
// Every call is a `config` Get of `app.bench`, whose value is the 133-byte
// JSON of the object cluster-client's getConfig returns; the follower parses
// it back into an object. What answers it (`--upstream`):
// - `memory` (the default; like for like with cluster-client, whose upstream
//   is a `getConfig` in the cluster-client leader's memory): the Leader is
//   `examples/bench_leader` and the value comes out of a HashMap in its
//   process. One round trip follower -> Leader -> follower per call.
// - `registry`: the Leader is `examples/standalone` in front of the bundled
//   registry server (`tandem-registry serve`), and every call is forwarded to
//   the registry over TCP: one more hop (and one more process woken) per call.
// `--runtime current` runs the memory leader on tokio's current-thread
// runtime (one thread, as cluster-client's Node leader); the default is the
// multi-thread runtime `standalone` uses.
//
// `--lang python` runs the Python follower (clients/python/bench/follower.py,
// driven over stdin/stdout JSON lines) instead of bench/follower.js (driven
// over fork()'s IPC channel); control never travels on the measured path.
//
// DIR holds the binaries (default: the repository's target/release if they
// are there, else target/debug). Build them with
//   cargo build --release --example standalone --example bench_leader -p tandem
//   cargo build --release -p tandem-registry
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
const UPSTREAM = arg('upstream', 'memory');
const LANG = arg('lang', 'node');
// The memory leader's tokio runtime: `multi` (the default, as `standalone`) or `current` (one thread).
const RUNTIME = arg('runtime', 'multi');
if (!['multi', 'current'].includes(RUNTIME)) throw new Error(`--runtime ${RUNTIME}: multi or current`);
if (!['memory', 'registry'].includes(UPSTREAM)) throw new Error(`--upstream ${UPSTREAM}: memory or registry`);
if (!['node', 'python'].includes(LANG)) throw new Error(`--lang ${LANG}: node or python`);
const D = parseFloat(arg('duration', '5')) * 1000;
const REPO = path.resolve(__dirname, '../../..');
const release = path.join(REPO, 'target/release');
const LEADER_BIN = UPSTREAM === 'memory' ? 'examples/bench_leader' : 'examples/standalone';
const TARGET = arg('target', fs.existsSync(path.join(release, LEADER_BIN)) && fs.existsSync(path.join(release, 'tandem-registry'))
  ? release : path.join(REPO, 'target/debug'));
const venvPython = path.join(REPO, 'clients/python/.venv/bin/python');
const PYTHON = arg('python', fs.existsSync(venvPython) ? venvPython : 'python3');
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
    send(child, message);
  });
}

/** Sends a control message: over fork()'s IPC to a Node follower, as a JSON line to a Python one. */
function send(child, message) {
  if (child.jsonLines) child.stdin.write(`${JSON.stringify(message)}\n`);
  else child.send(message);
}

/** One follower process: bench/follower.js, or the Python follower (its JSON lines re-emitted as 'message'). */
function startFollower() {
  if (LANG === 'node') {
    return track(fork(path.join(__dirname, 'follower.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
  }
  const script = path.join(REPO, 'clients/python/bench/follower.py');
  const child = track(spawn(PYTHON, [script], { stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, PYTHONPATH: path.join(REPO, 'clients/python/src') } }));
  child.jsonLines = true;
  readline.createInterface({ input: child.stdout }).on('line', (line) => child.emit('message', JSON.parse(line)));
  return child;
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

async function startLeader(dir) {
  const socket = path.join(dir, 'bench.sock');
  if (UPSTREAM === 'memory') {
    const leader = track(spawn(path.join(TARGET, LEADER_BIN),
      ['--socket', socket, '--token', TOKEN, '--set', `app.bench=${VALUE}`, ...(RUNTIME === 'current' ? ['--current-thread'] : [])],
      { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'error' } }));
    await waitLine(leader, /^listening /, 20000);
    return socket;
  }
  const registry = track(spawn(path.join(TARGET, 'tandem-registry'), ['serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'error' } }));
  const addr = (await waitLine(registry, /^listening on /, 20000)).slice('listening on '.length).trim();
  execFileSync(path.join(TARGET, 'tandem-registry'), ['put', '--server', addr, 'app.bench', VALUE]);
  const leader = track(spawn(path.join(TARGET, LEADER_BIN),
    ['--name', 'bench', '--dir', dir, '--registry', addr, '--subscribe', 'app.bench', '--token', TOKEN],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'error' } }));
  await waitLine(leader, /role=leader/, 20000);
  return socket;
}

function loadavg() {
  try {
    return fs.readFileSync('/proc/loadavg', 'utf8').trim();
  } catch {
    return os.loadavg().map((x) => x.toFixed(2)).join(' ');
  }
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tnode-bench-'));
  const socket = await startLeader(dir);
  const result = {
    bench: `tandem-follower (${LANG})`, upstream: UPSTREAM, leader: LEADER_BIN, runtime: UPSTREAM === 'memory' ? RUNTIME : 'multi', node: process.version, n: N, durationS: D / 1000,
    target: TARGET, payload_bytes: VALUE.length, at: new Date().toISOString(), loadavg_start: os.loadavg()[0], proc_loadavg_start: loadavg(),
  };
  const followers = Array.from({ length: N }, startFollower);
  const hello = await Promise.all(followers.map((f) => request(f, { cmd: 'connect', socket, token: TOKEN }, 'connected', 20000)));
  if (hello[0].python) result.python = hello[0].python;
  for (const c of [1, 64]) {
    const rs = await Promise.all(followers.map((f) => request(f, { cmd: 'invoke', c, durationMs: D }, 'invoke', D + 30000)));
    const total = rs.reduce((a, r) => a + r.count, 0);
    const secs = Math.max(...rs.map((r) => r.elapsedNs)) / 1e9;
    result[`invoke_c${c}`] = { calls_per_s: Math.round(total / secs), errors: rs.reduce((a, r) => a + r.errs, 0), ...pooled(rs) };
    console.error(`[tandem ${LANG} ${UPSTREAM}/${result.runtime} n=${N}] invoke c=${c}:`, JSON.stringify(result[`invoke_c${c}`]));
  }
  const rss = await Promise.all(followers.map((f) => request(f, { cmd: 'rss' }, 'rss', 5000)));
  result.rss_followers_mib = rss.map((r) => r.rss);
  result.loadavg_end = os.loadavg()[0];
  result.proc_loadavg_end = loadavg();
  await Promise.all(followers.map((f) => new Promise((resolve) => { f.once('exit', resolve); send(f, { cmd: 'exit' }); })));
  console.log(JSON.stringify(result));
  if (OUT) fs.appendFileSync(OUT, `${JSON.stringify(result)}\n`);
  killAll();
  fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((e) => { console.error(e); killAll(); process.exit(1); });
