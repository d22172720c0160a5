'use strict';
// Against a scripted leader: a Node net server on a temp-dir socket that
// plays the leader's side frame by frame, to make the cases a healthy Rust
// leader never shows: garbage bytes, an older epoch, a call never answered,
// exact Ping nonces, an Ended subscription, a cached value. (The real
// leader's behaviour is covered by leader.test.js; the conformance harness of
// issue 27 will replace this with the Rust harness.)

const { test, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const path = require('node:path');
const { connect, codec, ProtocolError, LeaderLost, NotReady, DeadlineExceeded, Cancelled, RemoteError, Busy } = require('..');
const { tempDir } = require('./support/procs');
const { within, nextValue, waitEvent } = require('./support/util');

const LEADER_ID = '0f1e2d3c4b5a69788796a5b4c3d2e1f0';
const servers = new Set();

afterEach(async () => {
  for (const server of servers) {
    for (const socket of server.sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  }
  servers.clear();
});

/**
 * A scripted leader. `script(peer, n)` runs for the n-th connection (from 0);
 * `peer.frames()` is an async iterator of the follower's decoded frames,
 * `peer.send(frame)` / `peer.raw(bytes)` write.
 */
async function scriptedLeader(script) {
  const socketPath = path.join(tempDir(), 'leader.sock');
  const server = net.createServer();
  server.sockets = new Set();
  server.peers = [];
  let n = 0;
  server.on('connection', (socket) => {
    server.sockets.add(socket);
    const reader = new codec.FrameReader();
    const queue = [];
    let wake = null;
    let closed = false;
    socket.on('data', (chunk) => {
      for (const body of reader.push(chunk)) queue.push(codec.decodeBody(body));
      if (wake) wake();
    });
    socket.on('close', () => {
      closed = true;
      if (wake) wake();
    });
    socket.on('error', () => {});
    const peer = {
      socket,
      seen: [],
      send: (frame) => socket.write(codec.encodeFrame(frame)),
      raw: (bytes) => socket.write(bytes),
      /** The next frame from the follower that is not a Ping (Pings are answered). */
      async next(ms = 5000) {
        for (;;) {
          while (queue.length) {
            const frame = queue.shift();
            peer.seen.push(frame);
            if (frame.kind === 'Ping') {
              if (!peer.silent) peer.send({ kind: 'Pong', nonce: frame.nonce });
              continue;
            }
            return frame;
          }
          if (closed) return null;
          await within(new Promise((resolve) => { wake = resolve; }), ms, 'a frame from the follower');
        }
      },
      /** Reads the Hello and answers Welcome (epoch given) and one Ready Status per channel. */
      async welcome(epoch = 1, heartbeatMs = 1000) {
        const hello = await peer.next();
        assert.equal(hello.kind, 'Hello');
        peer.send({ kind: 'Welcome', version: 1, leaderId: LEADER_ID, epoch, pid: 4242, heartbeatMs });
        for (const channel of hello.channels) peer.send({ kind: 'Status', channel, state: 'Ready' });
        return hello;
      },
    };
    server.peers.push(peer);
    Promise.resolve(script(peer, n++)).catch((error) => {
      server.scriptError = error;
      socket.destroy();
    });
  });
  await new Promise((resolve) => server.listen(socketPath, resolve));
  servers.add(server);
  return { server, socketPath };
}

/** Answers every Invoke with `Ok(payload)` and every Subscribe with an Ack. */
async function serve(peer) {
  for (;;) {
    const frame = await peer.next(60000);
    if (!frame) return;
    if (frame.kind === 'Invoke' && !frame.oneway) {
      peer.send({ kind: 'Response', id: frame.id, result: { ok: frame.payload } });
    } else if (frame.kind === 'Subscribe' || frame.kind === 'Unsubscribe') {
      peer.send({ kind: 'Ack', id: frame.id, result: { ok: null } });
    }
  }
}

const GARBAGE = {
  'a length prefix over the limit': Buffer.from('7fffffff', 'hex'),
  'an unknown frame kind': codec.encodeFrame({ kind: 'Ping', nonce: 1 }).fill(0x4e, 6, 10), // "NNNN"
  'a frame only a follower may send': codec.encodeFrame({ kind: 'Invoke', id: 1, channel: 'c', deadlineMs: 1, oneway: false, payload: Buffer.alloc(0) }),
  'a second Welcome': codec.encodeFrame({ kind: 'Welcome', version: 1, leaderId: LEADER_ID, epoch: 1, pid: 1, heartbeatMs: 1000 }),
  'bytes that are not MessagePack': Buffer.from('00000004c1c1c1c1', 'hex'),
  'a Response with a string id': Buffer.from('0000001381a8526573706f6e736592a13181a24f6bc400', 'hex'),
  'random bytes': Buffer.from('0000000a0123456789abcdef0123', 'hex'),
};

for (const [what, bytes] of Object.entries(GARBAGE)) {
  test(`garbage from the leader (${what}): a clear error, the link dropped, a reconnect`, { timeout: 15000 }, async () => {
    const { socketPath } = await scriptedLeader(async (peer, n) => {
      await peer.welcome(1);
      if (n === 0) {
        const call = await peer.next();
        assert.equal(call.kind, 'Invoke');
        peer.raw(bytes);
        return;
      }
      await serve(peer);
    });
    const client = await connect({ socket: socketPath, channels: ['c'] });
    try {
      const lost = waitEvent(client, 'disconnected');
      await assert.rejects(client.invoke('c', 'x'), (error) => {
        assert.ok(error instanceof LeaderLost, `${error}`);
        assert.ok(error.cause instanceof ProtocolError, `cause: ${error.cause}`);
        return true;
      });
      const [reason] = await lost;
      assert.ok(reason.cause instanceof ProtocolError);
      await waitEvent(client, 'connected');
      assert.equal(await client.invoke('c', 'again'), 'again');
    } finally {
      await client.close();
    }
  });
}

test('a truncated frame then a close is a broken link, not a clean one', { timeout: 15000 }, async () => {
  const { socketPath } = await scriptedLeader(async (peer, n) => {
    await peer.welcome(1);
    if (n === 0) {
      await peer.next();
      peer.socket.end(codec.encodeFrame({ kind: 'Ping', nonce: 7 }).subarray(0, 8));
      return;
    }
    await serve(peer);
  });
  const client = await connect({ socket: socketPath, channels: ['c'] });
  try {
    const lost = waitEvent(client, 'disconnected');
    await assert.rejects(client.invoke('c', 'x'), LeaderLost);
    const [reason] = await lost;
    assert.equal(reason.cause.code, 'truncated');
  } finally {
    await client.close();
  }
});

test('bad bytes in the same write as the Welcome: the link ends at once and the client reconnects', { timeout: 15000 }, async () => {
  // Found by the conformance harness (case malformed): the link ended before
  // the session started, nobody was told, and the client stayed stuck.
  const garbageAfterWelcome = async (peer) => {
    const hello = await peer.next();
    peer.raw(Buffer.concat([
      codec.encodeFrame({ kind: 'Welcome', version: 1, leaderId: LEADER_ID, epoch: 1, pid: 4242, heartbeatMs: 1000 }),
      ...hello.channels.map((channel) => codec.encodeFrame({ kind: 'Status', channel, state: 'Ready' })),
      Buffer.from('0000000781a5426f67757301', 'hex'), // {"Bogus": 1}
    ]));
    await peer.next(); // the follower closes
  };
  const { server, socketPath } = await scriptedLeader(async (peer, n) => {
    if (n === 0 || n === 2) return garbageAfterWelcome(peer);
    await peer.welcome(1);
    if (n === 1) {
      await peer.next();
      peer.send({ kind: 'Goodbye', reason: 'leaving' });
      peer.socket.end();
      return;
    }
    await serve(peer);
  });
  // The first connect: its first link dies that way, connect tries again.
  const client = await connect({ socket: socketPath, channels: ['c'] });
  try {
    assert.equal(server.peers.length, 2);
    const back = waitEvent(client, 'connected');
    await assert.rejects(client.invoke('c', 'x'), LeaderLost);
    // A reconnect: its first link dies that way too, the next one serves.
    await back;
    assert.equal(server.peers.length, 4);
    assert.equal(await client.invoke('c', 'y'), 'y');
  } finally {
    await client.close();
  }
});

test('a Welcome of another version than the Hello offered is a broken handshake', { timeout: 15000 }, async () => {
  const { socketPath } = await scriptedLeader(async (peer) => {
    const hello = await peer.next();
    assert.equal(hello.version, 1);
    peer.send({ kind: 'Welcome', version: 2, leaderId: LEADER_ID, epoch: 1, pid: 4242, heartbeatMs: 1000 });
  });
  await assert.rejects(connect({ socket: socketPath, connectTimeout: 300 }), (error) => {
    assert.ok(error instanceof NotReady, `${error}`);
    assert.ok(error.cause instanceof ProtocolError && error.cause.code === 'handshake', `cause: ${error.cause}`);
    return true;
  });
});

test('garbage instead of a Welcome: connect fails with NotReady caused by a ProtocolError', { timeout: 15000 }, async () => {
  const { socketPath } = await scriptedLeader(async (peer) => {
    await peer.next();
    peer.raw(Buffer.from('0000000381a4', 'hex'));
    peer.raw(Buffer.from('deadbeefdeadbeef', 'hex'));
  });
  await assert.rejects(connect({ socket: socketPath, connectTimeout: 300 }), (error) => {
    assert.ok(error instanceof NotReady, `${error}`);
    assert.ok(error.cause instanceof ProtocolError, `cause: ${error.cause}`);
    return true;
  });
});

test('no leader at the path: connect fails with NotReady after connectTimeout', { timeout: 15000 }, async () => {
  const started = Date.now();
  await assert.rejects(connect({ socket: path.join(tempDir(), 'none.sock'), connectTimeout: 200 }), (error) => {
    assert.ok(error instanceof NotReady);
    assert.equal(error.cause.code, 'ENOENT');
    return true;
  });
  assert.ok(Date.now() - started >= 190);
});

test('a leader with an older epoch is refused; the client waits for one at least as new', { timeout: 15000 }, async () => {
  const { server, socketPath } = await scriptedLeader(async (peer, n) => {
    const epochs = [5, 3, 6];
    await peer.welcome(epochs[n]);
    if (n === 0) {
      peer.socket.destroy();
      return;
    }
    await serve(peer);
  });
  const client = await connect({ socket: socketPath, channels: ['c'] });
  try {
    assert.equal(client.epoch, 5);
    const [welcome] = await waitEvent(client, 'connected');
    assert.equal(welcome.epoch, 6);
    assert.equal(client.epoch, 6);
    // The epoch-3 leader got a Goodbye, and nothing else after its Welcome.
    const old = server.peers[1];
    await within((async () => { while (await old.next()); })(), 5000, 'the old leader\'s link to close');
    assert.deepEqual(old.seen.map((f) => f.kind).filter((k) => k !== 'Ping'), ['Hello', 'Goodbye']);
    assert.equal(await client.invoke('c', 1), 1);
  } finally {
    await client.close();
  }
});

test('deadline: the call fails with DeadlineExceeded and the leader gets a Cancel of its id', { timeout: 15000 }, async () => {
  let cancelled;
  const { socketPath } = await scriptedLeader(async (peer) => {
    await peer.welcome(1);
    const call = await peer.next();
    assert.equal(call.kind, 'Invoke');
    assert.ok(call.deadlineMs >= 1 && call.deadlineMs <= 100, `deadline_ms ${call.deadlineMs}`);
    cancelled = { id: call.id, cancel: await peer.next() };
    // An answer crossing the Cancel is ignored.
    peer.send({ kind: 'Response', id: call.id, result: { ok: Buffer.from([1]) } });
    await serve(peer);
  });
  const client = await connect({ socket: socketPath, channels: ['c'] });
  try {
    const started = Date.now();
    await assert.rejects(client.invoke('c', 'slow', { timeout: 100 }), (error) => {
      assert.ok(error instanceof DeadlineExceeded);
      assert.equal(error.timeout, true);
      return true;
    });
    assert.ok(Date.now() - started >= 95);
    assert.equal(await client.invoke('c', 'next'), 'next');
    assert.deepEqual(cancelled.cancel, { kind: 'Cancel', id: cancelled.id });
  } finally {
    await client.close();
  }
});

test('an AbortSignal cancels the call: Cancelled, and a Cancel to the leader', { timeout: 15000 }, async () => {
  const seen = [];
  const { socketPath } = await scriptedLeader(async (peer) => {
    await peer.welcome(1);
    const call = await peer.next();
    seen.push(call, await peer.next());
    await serve(peer);
  });
  const client = await connect({ socket: socketPath, channels: ['c'] });
  try {
    const ac = new AbortController();
    const pending = client.invoke('c', 'forever', { signal: ac.signal, timeout: 10000 });
    // Abort once the leader holds the call.
    await within((async () => { while (client.inFlight.size === 0 || seen.length === 0) await new Promise(setImmediate); })(), 5000, 'the call to be sent').catch(() => {});
    ac.abort(new Error('user gave up'));
    await assert.rejects(pending, (error) => {
      assert.ok(error instanceof Cancelled);
      assert.equal(error.cause.message, 'user gave up');
      return true;
    });
    assert.equal(await client.invoke('c', 'next'), 'next');
    assert.equal(seen[0].kind, 'Invoke');
    assert.deepEqual(seen[1], { kind: 'Cancel', id: seen[0].id });
    // An already aborted signal sends nothing.
    await assert.rejects(client.invoke('c', 'x', { signal: AbortSignal.abort() }), Cancelled);
  } finally {
    await client.close();
  }
});

test('heartbeats: Pings answered with the exact nonce, Pings sent every heartbeat, a silent leader given up', { timeout: 15000 }, async () => {
  const { server, socketPath } = await scriptedLeader(async (peer, n) => {
    await peer.welcome(1, 50);
    if (n === 0) {
      peer.send({ kind: 'Ping', nonce: 2n ** 64n - 1n });
      peer.send({ kind: 'Ping', nonce: 7 });
      const pongs = [];
      while (pongs.length < 2) {
        const frame = await peer.next();
        if (frame.kind === 'Pong') pongs.push(frame.nonce);
      }
      assert.deepEqual(pongs, [2n ** 64n - 1n, 7]);
      // Then silence: the follower keeps pinging, then gives up.
      peer.silent = true;
      await within((async () => { while (await peer.next(10000)); })(), 10000, 'the follower to give up');
      return;
    }
    await serve(peer);
  });
  const client = await connect({ socket: socketPath, peerTimeout: 400 });
  try {
    const [reason] = await waitEvent(client, 'disconnected');
    assert.equal(server.scriptError, undefined);
    assert.match(reason.message, /no frame from the leader for \d+ ms/);
    const pings = server.peers[0].seen.filter((f) => f.kind === 'Ping').length;
    assert.ok(pings >= 5, `only ${pings} pings in 400 ms at a 50 ms heartbeat`);
    assert.equal(server.scriptError, undefined);
    await waitEvent(client, 'connected');
  } finally {
    await client.close();
  }
});

test('subscriptions: cached values are marked, older positions dropped, Ended ends the loop with its error', { timeout: 15000 }, async () => {
  const key = codec.encodeValue('k');
  const event = (epoch, seq, value, cached = false) =>
    ({ kind: 'Event', channel: 'c', key, epoch, seq, payload: codec.encodeValue(value), cached });
  const { socketPath } = await scriptedLeader(async (peer) => {
    await peer.welcome(4);
    const sub = await peer.next();
    assert.equal(sub.kind, 'Subscribe');
    assert.equal(sub.lastSeen, null);
    assert.equal(Buffer.from(sub.key).toString('hex'), Buffer.from(key).toString('hex'));
    peer.send({ kind: 'Ack', id: sub.id, result: { ok: null } });
    peer.send(event(4, 1, 'stale', true));
    peer.send(event(4, 2, 'fresh'));
    peer.send(event(4, 2, 'replayed'));
    peer.send(event(3, 9, 'older epoch'));
    peer.send(event(2 ** 53 + 10, 1, 'wide epoch'));
    peer.send({ kind: 'Event', channel: 'c', key: codec.encodeValue('other'), epoch: 9, seq: 1, payload: codec.encodeValue('not mine') });
    peer.send({ kind: 'Ended', channel: 'c', key, error: { kind: 'Rejected', code: 'limit', message: 'no' } });
    await serve(peer);
  });
  const client = await connect({ socket: socketPath, channels: ['c'] });
  try {
    const sub = client.subscribe('c', 'k');
    await sub.ready;
    assert.deepEqual(await nextValue(sub), { value: 'stale', epoch: 4, seq: 1, source: 'cache' });
    assert.deepEqual(await nextValue(sub), { value: 'fresh', epoch: 4, seq: 2, source: 'live' });
    assert.deepEqual(await nextValue(sub), { value: 'wide epoch', epoch: 2n ** 53n + 10n, seq: 1, source: 'live' });
    await assert.rejects(sub.next(), (error) => {
      assert.ok(error instanceof RemoteError);
      assert.deepEqual(error.toJSON(), { kind: 'Rejected', code: 'limit', message: 'no' });
      return true;
    });
    assert.deepEqual(await sub.next(), { value: undefined, done: true });
    assert.equal(sub.ended.code, 'limit');
  } finally {
    await client.close();
  }
});

test('a refused subscribe throws from the loop; a channel not in Hello is opened first', { timeout: 15000 }, async () => {
  const frames = [];
  const { socketPath } = await scriptedLeader(async (peer) => {
    await peer.welcome(1);
    const open = await peer.next();
    const sub = await peer.next();
    frames.push(open, sub);
    peer.send({ kind: 'Ack', id: sub.id, result: { err: { kind: 'Unavailable', code: 'registry', message: 'down' } } });
    await serve(peer);
  });
  const client = await connect({ socket: socketPath });
  try {
    const sub = client.subscribe('late', 'k');
    await assert.rejects(async () => {
      for await (const _ of sub) assert.fail('no value expected');
    }, (error) => error instanceof RemoteError && error.kind === 'Unavailable' && error.retryable);
    assert.deepEqual(frames[0], { kind: 'Open', channels: ['late'] });
    assert.equal(frames[1].channel, 'late');
    assert.equal(client.topics.size, 0);
  } finally {
    await client.close();
  }
});

test('limits: maxInFlight refuses the next call with Busy; close fails what is outstanding', { timeout: 15000 }, async () => {
  const { socketPath } = await scriptedLeader(async (peer) => {
    await peer.welcome(1);
    while (await peer.next(10000));
  });
  const client = await connect({ socket: socketPath, maxInFlight: 2 });
  const held = [client.invoke('c', 1), client.invoke('c', 2)].map((p) => p.then(() => 'resolved', (e) => e));
  await assert.rejects(client.invoke('c', 3), Busy);
  const sub = client.subscribe('c', 'k');
  await client.close();
  for (const call of held) assert.equal((await call).name, 'Closed');
  assert.deepEqual(await sub.next(), { value: undefined, done: true });
  await assert.rejects(sub.ready, (e) => e.name === 'Closed');
});
