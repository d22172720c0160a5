'use strict';
// The wire contract: every golden frame of protocol/tests/golden.rs (read from
// that file, so the two cannot drift) encodes to exactly its bytes and
// decodes back; malformed bodies are refused with a ProtocolError, never a crash.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { codec, ProtocolError } = require('..');

const GOLDEN_RS = path.resolve(__dirname, '../../../protocol/tests/golden.rs');

/** `const NAME: &str = concat!("..", ..);` blocks of golden.rs, as name -> bytes. */
function goldens() {
  const source = fs.readFileSync(GOLDEN_RS, 'utf8');
  const found = new Map();
  const re = /const ([A-Z_0-9]+): &str = concat!\(([\s\S]*?)\);/g;
  for (const [, name, body] of source.matchAll(re)) {
    const literals = [...body.replace(/\/\/[^\n]*/g, '').matchAll(/"([^"]*)"/g)].map((m) => m[1]);
    found.set(name, Buffer.from(literals.join('').replace(/\s+/g, ''), 'hex'));
  }
  return found;
}

const UUID_A = '00112233445566778899aabbccddeeff';
const UUID_B = '0f1e2d3c4b5a69788796a5b4c3d2e1f0';
const KEY = Buffer.from('a664622e75726c', 'hex'); // the MessagePack string "db.url"

const EXPECTED = {
  HELLO: { kind: 'Hello', version: 1, peerId: UUID_A, pid: 4242, channels: ['config', 'registry'], token: 's3cret' },
  HELLO_WITHOUT_TOKEN: { kind: 'Hello', version: 1, peerId: UUID_A, pid: 4242, channels: [], token: null },
  WELCOME: { kind: 'Welcome', version: 1, leaderId: UUID_B, epoch: 3, pid: 100, heartbeatMs: 5000 },
  REJECT: { kind: 'Reject', version: 1, error: { kind: 'Rejected', code: 'token', message: 'missing or wrong token' } },
  INVOKE: { kind: 'Invoke', id: 1, channel: 'config', deadlineMs: 3000, oneway: false, payload: Buffer.from('a3676574', 'hex') },
  INVOKE_ONEWAY: { kind: 'Invoke', id: 2 ** 32, channel: 'config', deadlineMs: 0, oneway: true, payload: Buffer.alloc(0) },
  RESPONSE_OK: { kind: 'Response', id: 1, result: { ok: Buffer.from([0x2a]) } },
  RESPONSE_ERR: { kind: 'Response', id: 2, result: { err: { kind: 'DeadlineExceeded', code: '', message: 'deadline exceeded' } } },
  CANCEL: { kind: 'Cancel', id: 300 },
  SUBSCRIBE_RESUMING: { kind: 'Subscribe', id: 5, channel: 'config', key: KEY, lastSeen: { epoch: 2, seq: 7 } },
  SUBSCRIBE_FRESH: { kind: 'Subscribe', id: 6, channel: 'config', key: KEY, lastSeen: null },
  UNSUBSCRIBE: { kind: 'Unsubscribe', id: 7, channel: 'config', key: KEY },
  EVENT: { kind: 'Event', channel: 'config', key: KEY, epoch: 2, seq: 8, payload: Buffer.from('ad706f7374677265733a2f2f6462', 'hex'), cached: false },
  CACHED_EVENT: { kind: 'Event', channel: 'config', key: KEY, epoch: 2, seq: 8, payload: Buffer.from('ad706f7374677265733a2f2f6462', 'hex'), cached: true },
  PUBLISH: { kind: 'Publish', id: 8, channel: 'registry', payload: Buffer.from('92a373766350', 'hex') },
  ACK_OK: { kind: 'Ack', id: 5, result: { ok: null } },
  ACK_ERR: { kind: 'Ack', id: 8, result: { err: { kind: 'Upstream', code: '503', message: 'registry refused' } } },
  STATUS_STARTING: { kind: 'Status', channel: 'config', state: 'Starting' },
  STATUS_READY: { kind: 'Status', channel: 'config', state: 'Ready' },
  STATUS_DOWN: { kind: 'Status', channel: 'config', state: { Down: { kind: 'Unavailable', code: 'connect', message: 'connection refused' } } },
  PING: { kind: 'Ping', nonce: 7 },
  PING_U32: { kind: 'Ping', nonce: 0xdeadbeef },
  PONG: { kind: 'Pong', nonce: 2n ** 64n - 1n },
  GOODBYE: { kind: 'Goodbye', reason: 'shutting down' },
  OPEN: { kind: 'Open', channels: ['flags'] },
  ENDED: { kind: 'Ended', channel: 'config', key: KEY, error: { kind: 'Rejected', code: 'limit', message: 'no' } },
};

/** Bins decode as Uint8Array views; compare them as Buffers. */
function normalize(frame) {
  return JSON.parse(JSON.stringify(frame, (_, v) => {
    if (typeof v === 'bigint') return `${v}n`;
    if (v && v.type === 'Buffer') return Buffer.from(v.data).toString('hex');
    if (v instanceof Uint8Array) return Buffer.from(v).toString('hex');
    return v;
  }));
}

test('every golden frame of golden.rs encodes to its bytes and decodes back', () => {
  const all = goldens();
  const names = Object.keys(EXPECTED);
  for (const name of names) {
    const bytes = all.get(name);
    assert.ok(bytes, `golden ${name} not found in golden.rs`);
    assert.equal(codec.encodeFrame(EXPECTED[name]).toString('hex'), bytes.toString('hex'), `encoding of ${name}`);
    const reader = new codec.FrameReader();
    const bodies = reader.push(bytes);
    assert.equal(bodies.length, 1, name);
    assert.deepEqual(normalize(codec.decodeBody(bodies[0])), normalize(EXPECTED[name]), `decoding of ${name}`);
    reader.end();
  }
  // Every frame kind has a golden here, and golden.rs has no frame golden this test skips.
  assert.deepEqual(new Set(names.map((n) => EXPECTED[n].kind)), new Set(codec.FRAME_KINDS));
  for (const name of all.keys()) assert.ok(name in EXPECTED, `golden ${name} is not checked`);
});

test('all the goldens concatenated decode in order from one buffer, split at every byte', () => {
  const all = goldens();
  const names = Object.keys(EXPECTED);
  const stream = Buffer.concat(names.map((n) => all.get(n)));
  for (const step of [1, 3, 7, stream.length]) {
    const reader = new codec.FrameReader();
    const kinds = [];
    for (let i = 0; i < stream.length; i += step) {
      for (const body of reader.push(stream.subarray(i, i + step))) kinds.push(codec.decodeBody(body).kind);
    }
    reader.end();
    assert.deepEqual(kinds, names.map((n) => EXPECTED[n].kind), `split every ${step} bytes`);
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
  // A Response whose error kind this build does not know (golden.rs: unknown_error_kind_inside_a_frame).
  const response = codec.decodeBody(body('81 a8 526573706f6e7365 92 09 81 a3 457272 93 a8 4f7665726c6f6164 a0 a1 78'));
  assert.deepEqual(response.result.err, { kind: 'Internal', code: '', message: 'x' });
  // An Event with an explicit `false` 6th element is live.
  const all = goldens();
  const cached = all.get('CACHED_EVENT');
  const live = Buffer.from(cached);
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
  const goldenBodies = [...goldens().values()].map((b) => b.subarray(4));
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
