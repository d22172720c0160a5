'use strict';
// The benchmark's Leader (examples/bench_leader.rs: the real tandem Leader
// with an in-memory `config` upstream) answers this follower as the
// registry-backed one does, so bench/bench.js --upstream memory measures real
// answers: Get of a value set at start (the bench's 133-byte JSON), Put, Get,
// Delete, a subscription seeing a Put, raw bytes both ways, 64 calls at once,
// a wrong token refused.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { connect, Rejected, codec } = require('..');
const { tempDir, startBenchLeader, killAll } = require('./support/procs');
const { within, nextValue } = require('./support/util');

const TOKEN = 'bench-leader-token';
const VALUE = JSON.stringify({ key: 'app.bench', version: 1, value: { appName: 'bench', hosts: ['10.0.0.1:12200'] } });

after(async () => {
  await killAll();
});

test('the in-memory bench leader: Get, Put, Delete, subscribe, 64 at once, token', { timeout: 30000 }, async () => {
  const { socket } = await startBenchLeader({ dir: tempDir(), token: TOKEN, values: { 'app.bench': VALUE } });
  const client = await connect({ socket, token: TOKEN, channels: ['config'] });
  try {
    const got = await client.invoke('config', { Get: 'app.bench' });
    assert.equal(got.Value[0], VALUE);
    assert.equal(JSON.parse(got.Value[0]).key, 'app.bench');
    assert.deepEqual(await client.invoke('config', { Get: 'absent' }), { Value: null });

    const sub = client.subscribe('config', 'k');
    await within(sub.ready, 5000, 'the subscription is acknowledged');
    const put = await client.invoke('config', { Put: ['k', 'v1'] });
    assert.ok(put.Revision > got.Value[1]);
    assert.deepEqual(await client.invoke('config', { Get: 'k' }), { Value: ['v1', put.Revision] });
    const update = await nextValue(sub, 5000);
    assert.deepEqual(update.value, ['v1', put.Revision]);

    const deleted = await client.invoke('config', { Delete: 'k' });
    assert.ok(deleted.Deleted > put.Revision);
    assert.deepEqual(await client.invoke('config', { Get: 'k' }), { Value: null });
    assert.deepEqual(await client.invoke('config', { Delete: 'k' }), { Deleted: null });

    // raw: MessagePack bytes in, a Buffer out; anything but bytes is a TypeError.
    const raw = await client.invoke('config', codec.encodeValue({ Get: 'app.bench' }), { raw: true });
    assert.ok(Buffer.isBuffer(raw));
    assert.deepEqual(codec.decodeValue(raw), got);
    await assert.rejects(client.invoke('config', 'not bytes', { raw: true }), TypeError);

    const many = await Promise.all(Array.from({ length: 64 }, () => client.invoke('config', { Get: 'app.bench' })));
    assert.ok(many.every((r) => r.Value[0] === VALUE));
  } finally {
    await client.close();
  }
  await assert.rejects(connect({ socket, token: 'wrong', channels: ['config'] }), Rejected);
});
