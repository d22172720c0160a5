#!/usr/bin/env node
'use strict';
// The Node.js follower under test for the tandem conformance harness
// (conformance/README.md, "The driver protocol"): commands as JSON lines on
// stdin, replies and events as JSON lines on stdout; logs go to stderr. Run
// by the harness, from the repository root:
//
//   target/debug/tandem-conformance -- node clients/node/conformance.js
//
// Each command maps to one call of the public API (`connect`, `invoke`,
// `publish`, `subscribe`, `close`, `client.state` / `status`), and each typed
// error to its name: the harness checks the follower, not this script.

const readline = require('node:readline');
const {
  connect, Rejected, RemoteError, DeadlineExceeded, LeaderLost, Cancelled, Closed,
} = require('./lib');

// ------------------------------------------------------------------ output

const BIG = '\u0000big:';

/** JSON, with a BigInt (a u64 beyond 2^53 - 1: an epoch, a seq) written as its exact digits. */
function stringify(value) {
  const text = JSON.stringify(value, (_, v) => {
    if (typeof v === 'bigint') return `${BIG}${v}`;
    if (v instanceof Uint8Array) return Buffer.from(v).toString('hex');
    return v;
  });
  return text.replace(/"\\u0000big:(\d+)"/g, '$1');
}

function print(line) {
  process.stdout.write(`${stringify(line)}\n`);
}

function log(...what) {
  process.stderr.write(`conformance.js: ${what.join(' ')}\n`);
}

/** The driver protocol's ERROR for a thrown value. */
function errorJson(error) {
  const plain = (type) => ({ type, kind: null, code: null, message: String(error && error.message) });
  if (error instanceof Rejected) return { type: 'Rejected', kind: error.kind, code: error.code, message: error.reason };
  if (error instanceof RemoteError) return { type: 'Remote', kind: error.kind, code: error.code, message: error.reason };
  if (error instanceof DeadlineExceeded) return plain('DeadlineExceeded');
  if (error instanceof LeaderLost) return plain('LeaderLost');
  if (error instanceof Cancelled) return plain('Cancelled');
  if (error instanceof Closed) return plain('Closed');
  return { type: 'Other', kind: null, code: null, message: `${error && error.name}: ${error && error.message}` };
}

/** The driver's `link` for the client's state. */
const LINK = { connecting: 'connecting', connected: 'connected', leaderLost: 'lost', rejected: 'rejected', closed: 'closed' };

// ------------------------------------------------------------------ the driver

class Driver {
  constructor() {
    this.client = null;
    this.connectError = null;
    /** command id -> AbortController of a running invoke or publish. */
    this.calls = new Map();
    /** command id -> Subscription. */
    this.subs = new Map();
  }

  command(command) {
    const id = Number(command.id);
    const handler = this[`op_${command.op}`];
    if (typeof handler !== 'function') {
      print({ id, ok: false, error: { type: 'Other', kind: null, code: null, message: `unknown op ${JSON.stringify(command.op)}` } });
      return;
    }
    Promise.resolve()
      .then(() => handler.call(this, id, command))
      .then(
        (result) => print({ id, ok: true, ...(result || {}) }),
        (error) => print({ id, ok: false, error: errorJson(error) }),
      );
  }

  get(id) {
    if (!this.client) throw new Error('not connected: send connect first');
    return this.client;
  }

  async op_connect(id, c) {
    const channels = c.channels || [];
    const options = { channels };
    if (c.peer_timeout_ms != null) options.peerTimeout = c.peer_timeout_ms;
    let client;
    try {
      client = await connect(options);
    } catch (error) {
      this.connectError = error;
      throw error;
    }
    this.client = client;
    // "once the Leader welcomed it and the channels have a state": the
    // Status frames follow the Welcome.
    const missing = () => channels.some((ch) => client.status(ch) === undefined);
    if (missing()) {
      await new Promise((resolve) => {
        const check = () => {
          if (!missing() || client.state !== 'connected') {
            client.off('status', check);
            client.off('state', check);
            resolve();
          }
        };
        client.on('status', check);
        client.on('state', check);
      });
    }
    return {};
  }

  async op_invoke(id, c) {
    const client = this.get();
    const request = c.request === undefined ? null : c.request;
    if (c.oneway) {
      await client.invoke(c.channel, request, { oneway: true, timeout: c.deadline_ms || undefined });
      return { response: null };
    }
    const abort = new AbortController();
    this.calls.set(id, abort);
    try {
      const response = await client.invoke(c.channel, request, { timeout: c.deadline_ms || undefined, signal: abort.signal });
      return { response: response === undefined ? null : response };
    } finally {
      this.calls.delete(id);
    }
  }

  async op_cancel(id, c) {
    const abort = this.calls.get(Number(c.target));
    if (abort) abort.abort(new Error('cancelled by the harness'));
    return {};
  }

  async op_publish(id, c) {
    const request = c.request === undefined ? null : c.request;
    await this.get().publish(c.channel, request);
    return {};
  }

  async op_subscribe(id, c) {
    const sub = this.get().subscribe(c.channel, c.key);
    await sub.ready;
    this.subs.set(id, sub);
    this.forward(id, sub);
    return {};
  }

  async forward(id, sub) {
    let error = null;
    try {
      for await (const update of sub) {
        print({
          event: 'value', sub: id, value: update.value, epoch: update.epoch, seq: update.seq, cached: update.source === 'cache',
        });
      }
    } catch (e) {
      error = errorJson(e);
    }
    print({ event: 'end', sub: id, error });
  }

  async op_unsubscribe(id, c) {
    const sub = this.subs.get(Number(c.target));
    this.subs.delete(Number(c.target));
    if (sub) sub.close();
    return {};
  }

  async op_status(id, c) {
    const client = this.client;
    if (!client) {
      let link = 'connecting';
      if (this.connectError) link = this.connectError instanceof Rejected ? 'rejected' : 'failed';
      return { link, epoch: null, state: null, error: null };
    }
    const state = client.status(c.channel);
    let name = null;
    let error = null;
    if (typeof state === 'string') name = state;
    else if (state && state.Down) {
      name = 'Down';
      error = { type: 'Remote', kind: state.Down.kind, code: state.Down.code, message: state.Down.message };
    }
    return { link: LINK[client.state] || 'failed', epoch: client.epoch, state: name, error };
  }

  async op_close() {
    await this.get().close();
    return {};
  }
}

function main() {
  const driver = new Driver();
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  lines.on('line', (line) => {
    if (line.trim() === '') return;
    let command;
    try {
      command = JSON.parse(line);
    } catch {
      log(`not a JSON command: ${line}`);
      return;
    }
    driver.command(command);
  });
  lines.on('close', async () => {
    // stdin ended: the harness is done with this follower.
    if (driver.client) await driver.client.close().catch(() => {});
    process.exit(0);
  });
}

main();
