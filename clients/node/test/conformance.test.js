'use strict';
// The conformance harness (conformance/, the Rust scripted Leader) against
// this package's driver, conformance.js: every case must pass. Build the
// harness first (ci.sh does): `cargo build -p tandem-conformance`.
// `TANDEM_TARGET_DIR` overrides where it is looked for, as for procs.js.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const REPO = path.resolve(__dirname, '../../..');
const TARGET = process.env.TANDEM_TARGET_DIR || path.join(REPO, 'target/debug');
const HARNESS = path.join(TARGET, 'tandem-conformance');
const DRIVER = path.resolve(__dirname, '../conformance.js');
/** 17 cases of a few seconds at most each (each has its own 60 s limit in the harness). */
const RUN_TIMEOUT_MS = 240000;

const running = new Set();

after(() => {
  // The harness kills its own child (the driver) by pid at the end of every case.
  for (const child of running) {
    try {
      process.kill(child.pid, 'SIGKILL');
    } catch { /* gone */ }
  }
});

function requireHarness() {
  if (!fs.existsSync(HARNESS)) {
    throw new Error(`${HARNESS} is missing: build it first with \`cargo build -p tandem-conformance\` (or set TANDEM_TARGET_DIR)`);
  }
}

function listCases() {
  return new Promise((resolve, reject) => {
    execFile(HARNESS, ['--list'], { timeout: 30000 }, (error, stdout) =>
      error ? reject(error) : resolve(stdout.split('\n').filter(Boolean).map((l) => l.split(' - ')[0])));
  });
}

/** Runs the harness against the driver: resolves `{ code, stdout, stderr }` once it exits. */
function runHarness() {
  const child = spawn(HARNESS, ['--', process.execPath, DRIVER], { stdio: ['ignore', 'pipe', 'pipe'], cwd: REPO });
  running.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
  child.stderr.setEncoding('utf8').on('data', (d) => { if (stderr.length < 64 * 1024) stderr += d; });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

test('the Node follower passes every case of the conformance harness', { timeout: RUN_TIMEOUT_MS + 30000 }, async () => {
  requireHarness();
  const names = await listCases();
  assert.ok(names.length > 0, 'the harness lists no case');
  const run = await runHarness();
  const passed = run.stdout.split('\n').filter((l) => l.startsWith('PASS ')).map((l) => l.slice(5));
  assert.deepEqual(passed, names, `${run.stdout}\n${run.stderr}`);
  assert.equal(run.code, 0, `the harness exited with ${run.code ?? run.signal}:\n${run.stdout}\n${run.stderr}`);
});
