'use strict';
// The real Rust processes the tests run against: the bundled registry server
// (`tandem-registry serve`) and standalone leaders (`examples/standalone.rs`).
// Build them first (ci.sh does):
//   cargo build --example standalone --example bench_leader -p tandem && cargo build -p tandem-registry
// `TANDEM_TARGET_DIR` overrides where they are looked for (default: the
// repository's target/debug). Every process started here is killed by PID in
// `killAll()`, which each test file calls from its `after` hook.

const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const REPO = path.resolve(__dirname, '../../../..');
const TARGET = process.env.TANDEM_TARGET_DIR || path.join(REPO, 'target/debug');
const STANDALONE = path.join(TARGET, 'examples/standalone');
const REGISTRY = path.join(TARGET, 'tandem-registry');
const BENCH_LEADER = path.join(TARGET, 'examples/bench_leader');

const running = new Set();

function requireBinaries() {
  for (const bin of [STANDALONE, REGISTRY]) {
    if (!fs.existsSync(bin)) {
      throw new Error(
        `${bin} is missing: build it first with ` +
          '`cargo build --example standalone -p tandem && cargo build -p tandem-registry` ' +
          '(or set TANDEM_TARGET_DIR)',
      );
    }
  }
}

/** A private temporary directory (mode 0700, as the standalone election requires). */
function tempDir() {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'tnode-'));
}

/** Starts `file args`, tracked for `killAll`; `lines` yields its stdout lines. */
function start(file, args, env) {
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  running.add(child);
  child.once('exit', () => running.delete(child));
  child.stderrText = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    if (child.stderrText.length < 64 * 1024) child.stderrText += d;
  });
  child.lines = [];
  child.waiters = [];
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    child.lines.push(line);
    for (const w of [...child.waiters]) w(line);
  });
  return child;
}

/** Resolves with the first stdout line of `child` matching `re` (seen before or after the call). */
function waitLine(child, re, ms = 20000) {
  const seen = child.lines.find((l) => re.test(l));
  if (seen) return Promise.resolve(seen);
  return new Promise((resolve, reject) => {
    const done = (fn, v) => {
      clearTimeout(timer);
      child.waiters.splice(child.waiters.indexOf(onLine), 1);
      child.off('exit', onExit);
      fn(v);
    };
    const onLine = (line) => {
      if (re.test(line)) done(resolve, line);
    };
    const onExit = (code, signal) =>
      done(reject, new Error(`${path.basename(child.spawnfile)} exited (${code ?? signal}) before printing ${re}: ${child.stderrText}`));
    const timer = setTimeout(() => done(reject, new Error(`no line matching ${re} within ${ms} ms: ${child.stderrText}`)), ms);
    child.waiters.push(onLine);
    child.once('exit', onExit);
  });
}

/** The bundled registry on an ephemeral port: `{ child, addr }`. */
async function startRegistry() {
  requireBinaries();
  const child = start(REGISTRY, ['serve', '--listen', '127.0.0.1:0']);
  const line = await waitLine(child, /^listening on /);
  return { child, addr: line.slice('listening on '.length).trim() };
}

/**
 * A standalone process in `dir` (election `name`) that is, or becomes, the
 * leader: resolves `{ child, epoch, socket }` once it printed `role=leader`.
 */
async function startLeader({ dir, name = 't', registry, token }) {
  requireBinaries();
  const args = ['--name', name, '--dir', dir, '--registry', registry, '--subscribe', 'app.greeting'];
  if (token) args.push('--token', token);
  const child = start(STANDALONE, args, { RUST_LOG: 'error' });
  const line = await waitLine(child, /role=leader epoch=\d+/);
  return { child, epoch: Number(/epoch=(\d+)/.exec(line)[1]), socket: path.join(dir, `${name}.sock`) };
}

/**
 * `examples/bench_leader` (the benchmark's Leader: an in-memory `config`
 * upstream) on a socket in `dir`, with `values` ({ key: value }) set:
 * resolves `{ child, socket }` once it listens.
 */
async function startBenchLeader({ dir, token, values = {} }) {
  if (!fs.existsSync(BENCH_LEADER)) {
    throw new Error(`${BENCH_LEADER} is missing: build it first with \`cargo build --example bench_leader -p tandem\` (or set TANDEM_TARGET_DIR)`);
  }
  const socket = path.join(dir, 'bench.sock');
  const args = ['--socket', socket];
  if (token) args.push('--token', token);
  for (const [key, value] of Object.entries(values)) args.push('--set', `${key}=${value}`);
  const child = start(BENCH_LEADER, args, { RUST_LOG: 'error' });
  await waitLine(child, /^listening /);
  return { child, socket };
}

/** Writes `key = value` into the registry directly (not through tandem). */
function registryPut(addr, key, value) {
  return new Promise((resolve, reject) => {
    execFile(REGISTRY, ['put', '--server', addr, key, value], { timeout: 10000 }, (error, stdout, stderr) =>
      error ? reject(new Error(`registry put failed: ${error.message} ${stderr}`)) : resolve(stdout));
  });
}

/** Kills a process by PID and waits for it to be gone. */
function kill(child, signal = 'SIGKILL') {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', () => resolve());
    try {
      process.kill(child.pid, signal);
    } catch {
      resolve();
    }
  });
}

/** Kills every process this file started (by PID). */
async function killAll() {
  const children = [...running];
  for (const child of children) {
    try {
      process.kill(child.pid, 'SIGCONT');
    } catch { /* gone */ }
  }
  await Promise.all(children.map((c) => kill(c)));
}

module.exports = { tempDir, start, waitLine, startRegistry, startLeader, startBenchLeader, registryPut, kill, killAll, requireBinaries };
