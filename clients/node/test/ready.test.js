'use strict';
// ready(): READY=1 over TANDEM_NOTIFY_STREAM (a real Unix stream socket, as
// `tandem run`'s worker binds, src/bin/tandem/run/notify.rs), and a clear
// no-op answer when not supervised.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { ready } = require('..');

function tempDir() {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'tandem-ready-'));
}

test('ready() writes READY=1 to TANDEM_NOTIFY_STREAM', { timeout: 10000 }, async () => {
  const dir = tempDir();
  const stream = path.join(dir, 'notify.stream');
  let received = '';
  const got = new Promise((resolve) => {
    const server = net.createServer((socket) => {
      socket.on('data', (chunk) => { received += chunk; });
      socket.on('end', () => { server.close(); resolve(received); });
    });
    server.listen(stream);
  });
  await new Promise((resolve) => setImmediate(resolve));
  const via = await ready({ env: { TANDEM_NOTIFY_STREAM: stream, NOTIFY_SOCKET: path.join(dir, 'x.sock') } });
  assert.equal(via, 'stream');
  assert.equal(await got, 'READY=1\n');
  fs.rmSync(dir, { recursive: true, force: true });
});

test('ready() is a no-op that says so when not supervised', { timeout: 10000 }, async () => {
  assert.equal(await ready({ env: {} }), 'none');
  // systemd's datagram socket alone: Node.js cannot send it, and says so.
  assert.equal(await ready({ env: { NOTIFY_SOCKET: '/run/systemd/notify' } }), 'unsupported');
});

test('ready() rejects when the stream socket is not there', { timeout: 10000 }, async () => {
  const dir = tempDir();
  await assert.rejects(ready({ env: { TANDEM_NOTIFY_STREAM: path.join(dir, 'missing.stream') } }), /ENOENT/);
  fs.rmSync(dir, { recursive: true, force: true });
});

test('under the real `tandem run`, ready() makes the worker ready', { timeout: 60000 }, async (t) => {
  const { start, waitLine, kill, killAll, tempDir: dir } = require('./support/procs');
  t.after(killAll);
  const tandem = path.join(process.env.TANDEM_TARGET_DIR || path.resolve(__dirname, '../../../target/debug'), 'tandem');
  if (!fs.existsSync(tandem)) throw new Error(`${tandem} is missing: build it first with \`cargo build -p tandem --bin tandem\``);
  const lib = path.resolve(__dirname, '..');
  // Without READY=1 the run would wait its 30 s ready timeout.
  const program = `require(${JSON.stringify(lib)}).ready().then((via) => { console.log('via=' + via); setInterval(() => {}, 1000); })`;
  const xdg = dir();
  const run = start(tandem, ['run', '--name', 'node-ready', '--workers', '1', '--', process.execPath, '-e', program], {
    XDG_RUNTIME_DIR: xdg,
  });
  await waitLine(run, /^via=stream$/);
  await waitLine(run, /^ready: 1 workers running/);
  await new Promise((resolve) => {
    run.once('exit', resolve);
    run.kill('SIGTERM');
  });
  assert.equal(run.exitCode, 0, run.stderrText);
  await kill(run);
  fs.rmSync(xdg, { recursive: true, force: true });
});
