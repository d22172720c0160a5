'use strict';
// Against the real Rust Leader: `examples/standalone.rs` processes (the one
// elected serves `<dir>/<name>.sock`) in front of the bundled registry server.
// The channel is `config` (src/apis.rs): requests `{ Get: key }`,
// `{ Put: [key, value] }`, `{ Delete: key }`; responses `{ Value: [value, revision] | null }`,
// `{ Revision: n }`, `{ Deleted: n | null }`; events `[value | null, revision]`.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { connect, Rejected, RemoteError, LeaderLost, Closed } = require('..');
const { tempDir, startRegistry, startLeader, registryPut, kill, killAll } = require('./support/procs');
const { within, nextValue, readUntil, waitEvent } = require('./support/util');

const TOKEN = 'node-test-token';
let registry;

before(async () => {
  registry = await startRegistry();
});

after(async () => {
  await killAll();
});

/** A leader of its own (own directory, so its own epochs) and a client of it. */
async function leaderAndClient(options = {}) {
  const dir = tempDir();
  const leader = await startLeader({ dir, registry: registry.addr, token: TOKEN });
  const client = await connect({ socket: leader.socket, token: TOKEN, channels: ['config'], ...options });
  return { dir, leader, client };
}

function strictlyIncreasing(updates) {
  for (let i = 1; i < updates.length; i++) {
    const [a, b] = [updates[i - 1], updates[i]];
    assert.ok(b.epoch > a.epoch || (b.epoch === a.epoch && b.seq > a.seq),
      `position went back or repeated: (${a.epoch}, ${a.seq}) then (${b.epoch}, ${b.seq})`);
  }
}

test('invoke: Put, Get and Delete through the real leader', { timeout: 30000 }, async () => {
  const { leader, client } = await leaderAndClient();
  try {
    assert.equal(client.state, 'connected');
    assert.equal(client.epoch, leader.epoch);
    assert.equal(client.leaderPid, leader.child.pid);
    const put = await client.invoke('config', { Put: ['node.invoke', 'v1'] });
    assert.equal(typeof put.Revision, 'number');
    assert.deepEqual(await client.invoke('config', { Get: 'node.invoke' }), { Value: ['v1', put.Revision] });
    assert.deepEqual(await client.invoke('config', { Get: 'node.absent' }), { Value: null });
    const deleted = await client.invoke('config', { Delete: 'node.invoke' }, { timeout: 2000 });
    assert.ok(deleted.Deleted > put.Revision);
    assert.deepEqual(await client.invoke('config', { Get: 'node.invoke' }), { Value: null });
    // 64 calls at once, answered by id whatever their order.
    const many = await Promise.all(
      Array.from({ length: 64 }, (_, i) => client.invoke('config', { Put: [`node.many.${i}`, `${i}`] })),
    );
    assert.equal(new Set(many.map((r) => r.Revision)).size, 64);
  } finally {
    await client.close();
  }
});

test('errors from the leader are typed: RemoteError with kind, code and message', { timeout: 30000 }, async () => {
  const { client } = await leaderAndClient();
  try {
    await assert.rejects(client.invoke('config', { Bogus: 1 }), (error) => {
      assert.ok(error instanceof RemoteError);
      assert.equal(error.kind, 'BadRequest');
      assert.equal(error.code, 'decode');
      assert.match(error.reason, /unknown variant `Bogus`/);
      assert.equal(error.retryable, false);
      return true;
    });
    // A channel the leader does not serve: opened on first use, refused by the leader.
    await assert.rejects(client.invoke('nosuchchannel', 'x'), (error) => {
      assert.ok(error instanceof RemoteError);
      assert.equal(error.kind, 'BadRequest');
      assert.equal(error.code, 'channel');
      return true;
    });
    assert.deepEqual(client.status('nosuchchannel').Down.code, 'channel');
    assert.equal(client.status('config'), 'Ready');
    // The connection is still fine.
    assert.deepEqual(await client.invoke('config', { Get: 'node.absent' }), { Value: null });
  } finally {
    await client.close();
  }
  await assert.rejects(client.invoke('config', { Get: 'x' }), Closed);
});

test('a wrong or missing token is rejected with a typed error', { timeout: 30000 }, async () => {
  const dir = tempDir();
  const leader = await startLeader({ dir, registry: registry.addr, token: TOKEN });
  for (const token of ['wrong', null]) {
    await assert.rejects(connect({ socket: leader.socket, token, channels: ['config'] }), (error) => {
      assert.ok(error instanceof Rejected, `${error}`);
      assert.equal(error.kind, 'Rejected');
      assert.equal(error.code, 'token');
      assert.equal(error.reason, 'missing or wrong token');
      return true;
    });
  }
  // The token from the environment is used when none is given.
  process.env.TANDEM_TOKEN = TOKEN;
  process.env.TANDEM_LEADER_SOCKET = leader.socket;
  try {
    const client = await connect({ channels: ['config'] });
    assert.deepEqual(await client.invoke('config', { Get: 'node.absent' }), { Value: null });
    await client.close();
  } finally {
    delete process.env.TANDEM_TOKEN;
    delete process.env.TANDEM_LEADER_SOCKET;
  }
});

test('a subscription receives the values put into the registry, in order, with positions', { timeout: 30000 }, async () => {
  const { leader, client } = await leaderAndClient();
  try {
    const sub = client.subscribe('config', 'node.sub');
    await within(sub.ready, 10000, 'the subscription ack');
    // The key's current state comes first: absent.
    const first = await nextValue(sub);
    assert.deepEqual(first.value, [null, first.value[1]]);
    assert.equal(first.epoch, leader.epoch);
    assert.equal(first.source, 'live');
    await registryPut(registry.addr, 'node.sub', 'one');
    await registryPut(registry.addr, 'node.sub', 'two');
    const seen = [first, ...(await readUntil(sub, (u) => u.value[0] === 'two'))];
    assert.deepEqual(seen.map((u) => u.value[0]), [null, 'one', 'two']);
    strictlyIncreasing(seen);
    assert.ok(seen.every((u) => u.epoch === leader.epoch && u.source === 'live'));

    // A second subscription of the same key starts with the current value, at once.
    const again = client.subscribe('config', 'node.sub');
    const current = await nextValue(again);
    assert.deepEqual(current, seen[seen.length - 1]);
    assert.equal(again.latest(), current);
    // Leaving one loop leaves the other running.
    await again.return();
    await registryPut(registry.addr, 'node.sub', 'three');
    assert.equal((await nextValue(sub)).value[0], 'three');

    // for await ... break unsubscribes; a publish goes through the upstream.
    await client.publish('config', { Put: ['node.sub', 'four'] });
    for await (const update of sub) {
      assert.equal(update.value[0], 'four');
      break;
    }
    assert.equal(client.topics.size, 0);
  } finally {
    await client.close();
  }
});

test('survives the leader being killed: a new leader at a higher epoch, values resume, none repeated or older', { timeout: 60000 }, async () => {
  const dir = tempDir();
  const first = await startLeader({ dir, registry: registry.addr, token: TOKEN });
  const client = await connect({ socket: first.socket, token: TOKEN, channels: ['config'], reconnectMax: 100 });
  try {
    const sub = client.subscribe('config', 'node.failover');
    await registryPut(registry.addr, 'node.failover', 'before');
    const seen = await readUntil(sub, (u) => u.value[0] === 'before');

    const lost = waitEvent(client, 'disconnected');
    await kill(first.child);
    const [reason] = await lost;
    assert.ok(reason instanceof LeaderLost, `${reason}`);
    assert.equal(client.state, 'leaderLost');
    // Between leaders, calls fail at once.
    await assert.rejects(client.invoke('config', { Get: 'x' }), LeaderLost);

    // A value written while there is no leader, then a new leader in the same directory.
    await registryPut(registry.addr, 'node.failover', 'between');
    const reconnected = waitEvent(client, 'connected');
    const second = await startLeader({ dir, registry: registry.addr, token: TOKEN });
    assert.ok(second.epoch > first.epoch, `epoch ${second.epoch} after ${first.epoch}`);
    const [welcome] = await reconnected;
    assert.equal(welcome.epoch, second.epoch);
    assert.equal(client.epoch, second.epoch);

    seen.push(...(await readUntil(sub, (u) => u.value[0] === 'between')));

    // Killed again, and nothing written meanwhile: the third leader announces
    // the same value at a new position; it is not delivered a second time.
    const lostAgain = waitEvent(client, 'disconnected');
    await kill(second.child);
    await lostAgain;
    const reconnectedAgain = waitEvent(client, 'connected');
    const third = await startLeader({ dir, registry: registry.addr, token: TOKEN });
    assert.ok(third.epoch > second.epoch);
    await reconnectedAgain;
    await registryPut(registry.addr, 'node.failover', 'after');
    seen.push(...(await readUntil(sub, (u) => u.value[0] === 'after')));

    const values = seen.map((u) => u.value[0]);
    assert.deepEqual(values.slice(-3), ['before', 'between', 'after']);
    for (const value of ['before', 'between']) {
      assert.equal(values.filter((v) => v === value).length, 1, `${value} delivered twice: ${values}`);
    }
    strictlyIncreasing(seen);
    assert.equal(seen[seen.length - 2].epoch, second.epoch);
    assert.equal(seen[seen.length - 1].epoch, third.epoch);
    assert.deepEqual(await client.invoke('config', { Get: 'node.failover' }), { Value: ['after', seen[seen.length - 1].value[1]] });
  } finally {
    await client.close();
  }
});

test('gives up a silent leader (SIGSTOP) after peerTimeout and reconnects', { timeout: 60000 }, async () => {
  const { dir, leader, client } = await leaderAndClient({ peerTimeout: 1500, reconnectMax: 100 });
  try {
    const lost = waitEvent(client, 'disconnected');
    const stoppedAt = Date.now();
    process.kill(leader.child.pid, 'SIGSTOP');
    const [reason] = await lost;
    const waited = Date.now() - stoppedAt;
    assert.match(reason.message, /no frame from the leader/);
    // The leader pings every second: silence is noticed between peerTimeout and peerTimeout + 2 heartbeats.
    assert.ok(waited >= 1400 && waited < 6000, `gave up after ${waited} ms`);
    await kill(leader.child);
    const reconnected = waitEvent(client, 'connected');
    const next = await startLeader({ dir, registry: registry.addr, token: TOKEN });
    await reconnected;
    assert.equal(client.epoch, next.epoch);
    assert.deepEqual(await client.invoke('config', { Get: 'node.absent' }), { Value: null });
  } finally {
    await client.close();
  }
});

test('a new leader that rejects the token: calls fail with Rejected until another leader replaces it', { timeout: 60000 }, async () => {
  const dir = tempDir();
  const first = await startLeader({ dir, registry: registry.addr, token: TOKEN });
  const client = await connect({ socket: first.socket, token: TOKEN, channels: ['config'], reconnectMax: 100 });
  try {
    const rejected = waitEvent(client, 'rejected');
    await kill(first.child);
    const other = await startLeader({ dir, registry: registry.addr, token: 'another-token' });
    const [error] = await rejected;
    assert.equal(error.code, 'token');
    assert.equal(client.state, 'rejected');
    await assert.rejects(client.invoke('config', { Get: 'x' }), (e) => e instanceof Rejected && e.code === 'token');
    // The rejected Hello is not sent again to the same leader: no second rejection while it runs.
    let again = 0;
    client.on('rejected', () => { again += 1; });
    const reconnected = waitEvent(client, 'connected');
    await kill(other.child);
    const third = await startLeader({ dir, registry: registry.addr, token: TOKEN });
    const [welcome] = await reconnected;
    assert.equal(welcome.epoch, third.epoch);
    assert.equal(again, 0);
    assert.deepEqual(await client.invoke('config', { Get: 'node.absent' }), { Value: null });
  } finally {
    await client.close();
  }
});
