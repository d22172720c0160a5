'use strict';
// The wire contract: every golden frame of conformance/vectors.json (generated
// from the Rust goldens, protocol/tests/goldens/mod.rs, and checked against
// them by `cargo test -p tandem-conformance --test vectors`, so the two cannot
// drift) encodes to exactly its bytes and decodes to its fields; malformed
// bodies are refused with a ProtocolError, never a crash.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { codec, ProtocolError } = require('..');

const VECTORS_JSON = path.resolve(__dirname, '../../../conformance/vectors.json');

// This follower speaks protocol version 1 (lib/client.js, PROTOCOL_VERSION):
// the deliver-to-one frames of version 2 (PROTOCOL.md §7.1) and the mirror
// frames of version 3 (§7.2) are not implemented, so their vectors are
// skipped, by name of kind, here, and nowhere else. A newer leader never
// sends them to a version 1 follower.
const VERSION_2_KINDS = new Set(['SubscribeOne', 'Delivery', 'Settle', 'Mirror', 'Mirrored']);

function loadVectors() {
  const doc = JSON.parse(fs.readFileSync(VECTORS_JSON, 'utf8'));
  assert.equal(doc.schema, 'tandem-conformance-vectors/1');
  return doc.frames;
}

/** A u64 field of vectors.json: a number, or above 2^53 - 1 a string of digits (a BigInt here). */
function u64(value) {
  return typeof value === 'string' ? BigInt(value) : value;
}

const hex = (h) => Buffer.from(h, 'hex');
const KEY = hex('a664622e75726c'); // the MessagePack string "db.url"
const uuid = (text) => text.replace(/-/g, '');

/** A vector's `fields` as this package's frame object (camelCase fields, bins as Buffers). */
function frameOf(vector) {
  const f = vector.fields;
  const result = (r, ok) => (r.err ? { err: r.err } : { ok: ok(r.ok) });
  switch (vector.kind) {
    case 'Hello':
      return { kind: 'Hello', version: f.version, peerId: uuid(f.peer_id), pid: f.pid, channels: f.channels, token: f.token };
    case 'Welcome':
      return { kind: 'Welcome', version: f.version, leaderId: uuid(f.leader_id), epoch: u64(f.epoch), pid: f.pid, heartbeatMs: f.heartbeat_ms };
    case 'Reject':
      return { kind: 'Reject', version: f.version, error: f.error };
    case 'Invoke':
      return { kind: 'Invoke', id: u64(f.id), channel: f.channel, deadlineMs: f.deadline_ms, oneway: f.oneway, payload: hex(f.payload) };
    case 'Response':
      return { kind: 'Response', id: u64(f.id), result: result(f.result, hex) };
    case 'Cancel':
      return { kind: 'Cancel', id: u64(f.id) };
    case 'Subscribe':
      return {
        kind: 'Subscribe', id: u64(f.id), channel: f.channel, key: hex(f.key),
        lastSeen: f.last_seen && { epoch: u64(f.last_seen.epoch), seq: u64(f.last_seen.seq) },
      };
    case 'Unsubscribe':
      return { kind: 'Unsubscribe', id: u64(f.id), channel: f.channel, key: hex(f.key) };
    case 'Event':
      return { kind: 'Event', channel: f.channel, key: hex(f.key), epoch: u64(f.epoch), seq: u64(f.seq), payload: hex(f.payload), cached: f.cached };
    case 'Publish':
      return { kind: 'Publish', id: u64(f.id), channel: f.channel, payload: hex(f.payload) };
    case 'Ack':
      return { kind: 'Ack', id: u64(f.id), result: result(f.result, () => null) };
    case 'Status':
      return { kind: 'Status', channel: f.channel, state: f.state.state === 'Down' ? { Down: f.state.error } : f.state.state };
    case 'Ping':
    case 'Pong':
      return { kind: vector.kind, nonce: u64(f.nonce) };
    case 'Goodbye':
      return { kind: 'Goodbye', reason: f.reason };
    case 'Open':
      return { kind: 'Open', channels: f.channels };
    case 'Ended':
      return { kind: 'Ended', channel: f.channel, key: hex(f.key), error: f.error };
    default:
      throw new Error(`vector ${vector.name}: no mapping for kind ${vector.kind}`);
  }
}

/** The version 1 vectors (see VERSION_2_KINDS). */
function vectors() {
  return loadVectors().filter((v) => !VERSION_2_KINDS.has(v.kind));
}

function vector(name) {
  const found = loadVectors().find((v) => v.name === name);
  assert.ok(found, `vector ${name} not in vectors.json`);
  return found;
}

/** Bins decode as Uint8Array views; compare them as Buffers. */
function normalize(frame) {
  return JSON.parse(JSON.stringify(frame, (_, v) => {
    if (typeof v === 'bigint') return `${v}n`;
    if (v && v.type === 'Buffer') return Buffer.from(v.data).toString('hex');
    if (v instanceof Uint8Array) return Buffer.from(v).toString('hex');
    return v;
  }));
}

test('every version 1 vector of vectors.json encodes to its bytes (unless decode_only) and decodes to its fields', () => {
  const all = loadVectors();
  const checked = vectors();
  for (const v of checked) {
    const bytes = hex(v.hex);
    const expected = frameOf(v);
    if (!v.decode_only) {
      assert.equal(codec.encodeFrame(expected).toString('hex'), v.hex, `encoding of ${v.name}`);
    }
    const reader = new codec.FrameReader();
    const bodies = reader.push(bytes);
    assert.equal(bodies.length, 1, v.name);
    assert.deepEqual(normalize(codec.decodeBody(bodies[0])), normalize(expected), `decoding of ${v.name}`);
    reader.end();
  }
  // Every frame kind of this package has a vector, and every vector is
  // checked here or skipped as version 2 on purpose.
  assert.deepEqual(new Set(checked.map((v) => v.kind)), new Set(codec.FRAME_KINDS));
  const names = new Set(checked.map((v) => v.name));
  for (const v of all) assert.ok(names.has(v.name) || VERSION_2_KINDS.has(v.kind), `vector ${v.name} is not checked`);
  assert.deepEqual(new Set(all.filter((v) => !names.has(v.name)).map((v) => v.kind)), VERSION_2_KINDS);
});

test('a version 2 frame is refused by this version 1 reader', () => {
  for (const v of loadVectors().filter((x) => VERSION_2_KINDS.has(x.kind))) {
    assert.throws(() => codec.decodeBody(hex(v.hex).subarray(4)), ProtocolError, v.name);
  }
});

test('all the vectors concatenated decode in order from one buffer, split at every byte', () => {
  const checked = vectors();
  const stream = Buffer.concat(checked.map((v) => hex(v.hex)));
  for (const step of [1, 3, 7, stream.length]) {
    const reader = new codec.FrameReader();
    const kinds = [];
    for (let i = 0; i < stream.length; i += step) {
      for (const body of reader.push(stream.subarray(i, i + step))) kinds.push(codec.decodeBody(body).kind);
    }
    reader.end();
    assert.deepEqual(kinds, checked.map((v) => v.kind), `split every ${step} bytes`);
  }
});

function body(hex) {
  return Buffer.from(hex.replace(/\s+/g, ''), 'hex');
}

test('readers accept any integer width whose value fits, and map an unknown error kind to Internal', () => {
  // {"Ping": 7} with 7 as uint64, and as int8.
  assert.deepEqual(codec.decodeBody(body('81 a4 50696e67 cf 0000000000000007')), { kind: 'Ping', nonce: 7 });
  assert.deepEqual(codec.decodeBody(body('81 a4 50696e67 d0 07')), { kind: 'Ping', nonce: 7 });
  // str8 "Ping" key and map16 header.
  assert.deepEqual(codec.decodeBody(body('de 0001 d9 04 50696e67 07')), { kind: 'Ping', nonce: 7 });
  // A Response whose error kind this build does not know (also the decode_only vector response_err_unknown_kind).
  const response = codec.decodeBody(body('81 a8 526573706f6e7365 92 09 81 a3 457272 93 a8 4f7665726c6f6164 a0 a1 78'));
  assert.deepEqual(response.result.err, { kind: 'Internal', code: '', message: 'x' });
  // An Event with an explicit `false` 6th element is live.
  const live = hex(vector('event_cached').hex);
  live[live.length - 1] = 0xc2;
  assert.equal(codec.decodeBody(live.subarray(4)).cached, false);
  // u64 values beyond 2^53 stay exact.
  assert.equal(codec.decodeBody(body('81 a4 50696e67 cf ffffffffffffffff')).nonce, 2n ** 64n - 1n);
  // A real U+FFFD (EF BF BD) in a string is valid UTF-8.
  assert.equal(codec.decodeBody(body('81 a7 476f6f64627965 a3 efbfbd')).reason, '\ufffd');
});

test('malformed bodies are refused with a ProtocolError', () => {
  const cases = {
    'empty body': '',
    'trailing bytes': '81 a4 50696e67 07 00',
    'not a map': '92 01 02',
    'a map of two entries': '82 a4 50696e67 07 a4 506f6e67 07',
    'a map of two entries with the same key': '82 a4 50696e67 07 a4 50696e67 07',
    'a Response result map repeating Ok': '81 a8 526573706f6e7365 92 01 82 a2 4f6b c4 00 a2 4f6b c4 00',
    'a Status Down map repeating Down': '81 a6 537461747573 92 a1 63 82 a4 446f776e 93 a0 a0 a0 a4 446f776e 93 a0 a0 a0',
    'unknown kind': '81 a4 4e6f7065 07',
    'kind in a different case': '81 a4 70696e67 07',
    'negative nonce': '81 a4 50696e67 ff',
    'string nonce': '81 a4 50696e67 a1 37',
    'Welcome with 4 fields': '81 a7 57656c636f6d65 94 01 c410 0f1e2d3c4b5a69788796a5b4c3d2e1f0 03 64',
    'Welcome version over u16': '81 a7 57656c636f6d65 95 ce 00011170 c410 0f1e2d3c4b5a69788796a5b4c3d2e1f0 03 64 cd 1388',
    'Welcome leader_id of 15 bytes': '81 a7 57656c636f6d65 95 01 c40f 0f1e2d3c4b5a69788796a5b4c3d2e1 03 64 cd 1388',
    'Welcome heartbeat over u32': '81 a7 57656c636f6d65 95 01 c410 0f1e2d3c4b5a69788796a5b4c3d2e1f0 03 64 cf 0000000100000000',
    'Response result neither Ok nor Err': '81 a8 526573706f6e7365 92 01 81 a2 4e6f c0',
    'Response Ok not bin': '81 a8 526573706f6e7365 92 01 81 a2 4f6b a1 78',
    'Ack Ok not nil': '81 a3 41636b 92 05 81 a2 4f6b 01',
    'Event with 4 fields': '81 a5 4576656e74 94 a1 63 c4 00 01 01',
    'Event key as str': '81 a5 4576656e74 95 a1 63 a1 6b 01 01 c4 00',
    'Status unknown state': '81 a6 537461747573 92 a1 63 a7 556e6b6e6f776e',
    'RemoteError of 2 fields': '81 a6 52656a656374 92 01 92 a8 52656a6563746564 a0',
    'invalid UTF-8': '81 a7 476f6f64627965 a2 c328',
    'invalid UTF-8 in a channel name': '81 a6 537461747573 92 a2 ff63 a5 5265616479',
    'truncated value': '81 a7 476f6f64627965 a5 6869',
    '__proto__ key': '81 a9 5f5f70726f746f5f5f 07',
  };
  for (const [what, hex] of Object.entries(cases)) {
    assert.throws(() => codec.decodeBody(body(hex)), ProtocolError, what);
  }
});

test('random bytes never throw anything but a ProtocolError', () => {
  let seed = 42;
  const random = () => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed;
  };
  const goldenBodies = vectors().map((v) => hex(v.hex).subarray(4));
  for (let i = 0; i < 20000; i++) {
    let bytes;
    if (i % 2 === 0) {
      bytes = Buffer.alloc(random() % 40);
      for (let j = 0; j < bytes.length; j++) bytes[j] = random() & 0xff;
    } else {
      // A golden with one byte flipped: mostly well-formed MessagePack, subtly wrong.
      bytes = Buffer.from(goldenBodies[random() % goldenBodies.length]);
      bytes[random() % bytes.length] = random() & 0xff;
    }
    try {
      codec.decodeBody(bytes);
    } catch (error) {
      assert.ok(error instanceof ProtocolError, `${bytes.toString('hex')}: ${error.stack}`);
    }
  }
});

test('framing: a length over the limit is refused from the prefix alone; truncation is not a clean close', () => {
  const reader = new codec.FrameReader(16);
  // The prefix announces 17 bytes: refused before any body byte arrives.
  assert.throws(() => reader.push(Buffer.from('00000011', 'hex')), (e) => e instanceof ProtocolError && e.code === 'too_large');
  // Exactly the limit is fine.
  const exact = new codec.FrameReader(16);
  assert.equal(exact.push(Buffer.concat([Buffer.from('00000010', 'hex'), Buffer.alloc(16)])).length, 1);
  exact.end();
  // The default limit is 16 MiB.
  const big = new codec.FrameReader();
  assert.throws(() => big.push(Buffer.from('01000001', 'hex')), (e) => e.code === 'too_large');
  assert.equal(new codec.FrameReader().push(Buffer.from('01000000', 'hex')).length, 0);
  // The stream ends inside a prefix, or inside a body.
  for (const partial of ['00', '00000007', '00000007 81a4']) {
    const r = new codec.FrameReader();
    r.push(body(partial));
    assert.throws(() => r.end(), (e) => e instanceof ProtocolError && e.code === 'truncated', partial);
  }
  // An empty body is a frame (malformed at decoding, not a framing error).
  const empty = new codec.FrameReader();
  assert.equal(empty.push(body('00000000'))[0].length, 0);
  assert.throws(() => codec.decodeBody(Buffer.alloc(0)), ProtocolError);
});

test('payload values: Rust enums, structs and Option map to the documented JS shapes', () => {
  // ConfigRequest::Put("k", "v") = {"Put": ["k", "v"]}; a String key is a str, shortest form.
  assert.equal(Buffer.from(codec.encodeValue({ Put: ['k', 'v'] })).toString('hex'), '81a350757492a16ba176');
  assert.equal(Buffer.from(codec.encodeValue('db.url')).toString('hex'), KEY.toString('hex'));
  // Integers use the shortest form, up to and beyond 2^32.
  assert.equal(Buffer.from(codec.encodeValue(4242)).toString('hex'), 'cd1092');
  assert.equal(Buffer.from(codec.encodeValue(2 ** 32)).toString('hex'), 'cf0000000100000000');
  // ConfigResponse::Value(Some(ConfigValue { value: Some("v"), revision: 3 })) and Value(None).
  assert.deepEqual(codec.decodeValue(body('81 a5 56616c7565 92 a1 76 03')), { Value: ['v', 3] });
  assert.deepEqual(codec.decodeValue(body('81 a5 56616c7565 c0')), { Value: null });
});

test('the hand-written Invoke and Response paths (lib/hotpath.js) give the general path\'s bytes and fields', () => {
  const lib = require('../lib/codec');
  const hot = require('../lib/hotpath');
  const ids = [0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, 2n ** 64n - 1n];
  const channels = ['c', 'config', 'x'.repeat(31), 'x'.repeat(32), 'x'.repeat(255), 'x'.repeat(256), '\u00e9'.repeat(16), 'y'.repeat(70000)];
  const deadlines = [1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1];
  const sizes = [0, 1, 255, 256, 65535, 65536];
  const payloadOf = (n) => Buffer.alloc(n, n & 0xff);
  const invoke = (id, channel, deadlineMs, oneway, payload) => {
    const general = lib.encodeFrame({ kind: 'Invoke', id, channel, deadlineMs, oneway, payload }).toString('hex');
    const fast = lib.encodeInvoke(id, channel, deadlineMs, oneway, payload).toString('hex');
    assert.equal(fast, general, `Invoke id=${id} channel=${channel.length} chars deadline=${deadlineMs} payload=${payload.length}`);
    // The hand-written path took it whenever it can.
    const small = typeof id === 'number' && id < 2 ** 32;
    assert.equal(hot.encodeInvoke(id, channel, deadlineMs, oneway, payload) !== null, small);
  };
  // Each width of each field, the others at a plain value; both oneway flags.
  for (const oneway of [false, true]) {
    for (const id of ids) invoke(id, 'config', 5000, oneway, payloadOf(12));
    for (const channel of channels) invoke(7, channel, 5000, oneway, payloadOf(12));
    for (const deadline of deadlines) invoke(7, 'config', deadline, oneway, payloadOf(12));
    for (const n of sizes) invoke(7, 'config', 5000, oneway, payloadOf(n));
  }
  // A payload that is a view into a larger buffer, as encodeValueShared gives.
  const big = Buffer.alloc(100, 1);
  invoke(300, 'config', 3000, false, big.subarray(10, 40));
  assert.deepEqual(lib.decodeValue(lib.encodeValueShared({ Get: 'k' })), { Get: 'k' });

  // Responses: every id and bin width decodes as the general path does; other bodies are left to it.
  for (const id of ids) {
    for (const n of sizes) {
      const body = Buffer.from(lib.encodeBody({ kind: 'Response', id, result: { ok: payloadOf(n) } }));
      const general = lib.decodeGeneral(body);
      assert.deepEqual(lib.decodeBody(body), general, `Response id=${id} payload=${n}`);
      const fast = hot.decodeResponse(body);
      assert.equal(fast !== null, typeof id === 'number' && id < 2 ** 32, `fast path for id=${id}`);
      if (fast) assert.deepEqual(fast, general);
    }
  }
  const err = Buffer.from(lib.encodeBody({ kind: 'Response', id: 9, result: { err: { kind: 'Upstream', code: 'x', message: 'y' } } }));
  assert.equal(hot.decodeResponse(err), null);
  // Cut short or with a byte too many: left to the general path, which refuses it.
  const ok = Buffer.from(lib.encodeBody({ kind: 'Response', id: 9, result: { ok: payloadOf(20) } }));
  for (const bad of [ok.subarray(0, ok.length - 1), Buffer.concat([ok, Buffer.from([0])])]) {
    assert.equal(hot.decodeResponse(bad), null);
    assert.throws(() => lib.decodeBody(bad), ProtocolError);
  }
});

test('values: strings of every length decode the same with the native string path', () => {
  const { Decoder } = require('@msgpack/msgpack');
  const plain = new Decoder();
  for (const n of [0, 1, 16, 17, 31, 32, 133, 255, 256, 70000]) {
    // Whole code points (a lone surrogate has no UTF-8 form: the Rust side never sends one).
    const mixed = Array.from('\u00e9\u4e2d\ud83d\ude00'.repeat(Math.ceil(n / 3))).slice(0, n).join('');
    for (const s of ['a'.repeat(n), mixed]) {
      const value = { key: s, list: [s, { [s.slice(0, 10)]: s }] };
      const bytes = codec.encodeValue(value);
      assert.deepEqual(codec.decodeValue(bytes), plain.decode(bytes), `string of ${n}`);
      assert.deepEqual(codec.decodeValue(bytes), value);
    }
  }
});
