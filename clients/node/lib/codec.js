'use strict';
// Frames <-> MessagePack bodies, as protocol/PROTOCOL.md §3-§4 specify them.
//
// A frame is a plain object `{ kind, ...fields }` with camelCase field names
// (`{ kind: 'Invoke', id, channel, deadlineMs, oneway, payload }`). Every kind
// of the protocol encodes and decodes here, both directions, so a test (or a
// conformance driver) can speak either side; which kinds a follower accepts
// from a leader is the link's business (`link.js`), not the codec's.
//
// Decoding is strict: a body that is not exactly the shape of its kind (field
// count, types, integer ranges, UUID length) throws a `ProtocolError`. Readers
// accept any integer width whose value fits, as the spec requires; u64 values
// beyond 2^53 stay exact as BigInt.

const { isUtf8 } = require('node:buffer');
const { Encoder, Decoder } = require('@msgpack/msgpack');
const { ProtocolError } = require('./errors');
const { decodeResponse, encodeInvoke: encodeInvokeFast } = require('./hotpath');

// One encoder and decoder of each kind per process: encoding and decoding are
// synchronous, so sharing them is safe, and it saves an allocation per frame.
//
// Frames: `useBigInt64`, so a u64 (ids, epochs, seqs, nonces) stays exact: a
// uint64-encoded value decodes as BigInt (made a number again when it is at
// most 2^53 - 1, see `uint`), and `wide` turns every u64 of 2^32 or more into
// a BigInt before encoding (this encoder would write a *number* that large as
// a float).
const frameEncoder = new Encoder({ useBigInt64: true, initialBufferSize: 4096 });
// Every map key the frame decoder reads is counted: a map whose keys repeat
// decodes to an object with fewer keys, and that makes the frame malformed
// (§3; the decoder itself keeps the last value of a repeated key).
let mapKeysRead = 0;
const frameDecoder = new Decoder({
  useBigInt64: true,
  mapKeyConverter(key) {
    if (typeof key !== 'string' && typeof key !== 'number') throw new TypeError(`a map key must be a string, got ${typeof key}`);
    mapKeysRead += 1;
    return key;
  },
});

/** How many keys the objects (maps) of a decoded value hold. */
function keysIn(value) {
  if (value === null || typeof value !== 'object' || value instanceof Uint8Array) return 0;
  let n = 0;
  if (Array.isArray(value)) {
    for (const item of value) n += keysIn(item);
    return n;
  }
  for (const key of Object.keys(value)) n += 1 + keysIn(value[key]);
  return n;
}
// User values (requests, keys, responses, events): plain numbers both ways,
// exact up to 2^53 - 1 and written in the shortest form (integers of 2^32 or
// more as uint64 / int64), as JSON.parse would give them.
const valueEncoder = new Encoder({ initialBufferSize: 4096 });

// Strings longer than a map key are decoded by Node's native UTF-8 decoder
// (`Buffer#utf8Slice`) instead of the package's JavaScript loop, which is
// 2-3x slower for a value of a hundred bytes or more (a config value, a JSON
// document). Map keys and short strings keep the package's path (its key
// cache, and no native call for a few bytes). Invalid UTF-8 becomes U+FFFD,
// as Node's decoder does; the package's loop would make other code units.
// `decodeUtf8String` is the package's own hook (3.x); without it (another
// major version) the plain decoder is used.
const utf8Slice = Buffer.prototype.utf8Slice;
class ValueDecoder extends Decoder {
  decodeUtf8String(byteLength, headerOffset) {
    const start = this.pos + headerOffset;
    const end = start + byteLength;
    if (byteLength <= 16 || byteLength > this.maxStrLength || this.bytes.byteLength < end || this.stateIsMapKey()) {
      return super.decodeUtf8String(byteLength, headerOffset);
    }
    const string = utf8Slice.call(this.bytes, start, end);
    this.pos = end;
    return string;
  }
}
const nativeStrings = typeof utf8Slice === 'function' &&
  typeof Decoder.prototype.decodeUtf8String === 'function' && typeof Decoder.prototype.stateIsMapKey === 'function';
const valueDecoder = nativeStrings ? new ValueDecoder() : new Decoder();

/** A u64 field, ready for `frameEncoder`: a number below 2^32, a BigInt from there. */
function wide(value) {
  if (typeof value === 'bigint') return value < 0x100000000n ? Number(value) : value;
  return value >= 0x100000000 ? BigInt(value) : value;
}

const ERROR_KINDS = new Set([
  'DeadlineExceeded', 'Unavailable', 'Rejected', 'Upstream', 'BadRequest', 'Cancelled', 'Internal',
]);

// ------------------------------------------------------------------ helpers

function malformed(kind, what) {
  return new ProtocolError(`malformed ${kind} frame: ${what}`, { code: 'malformed' });
}

function isArray(value, length) {
  return Array.isArray(value) && (length === undefined || value.length === length);
}

const U64_MAX = (1n << 64n) - 1n;

/** An unsigned integer of at most `bits` bits (a number, or a BigInt for wide u64 values). */
function uint(kind, field, value, bits) {
  if (typeof value === 'number') {
    if (Number.isInteger(value) && value >= 0 && (bits === 64 || value < 2 ** bits)) return value;
  } else if (typeof value === 'bigint') {
    if (value >= 0n && value <= U64_MAX && (bits === 64 || value < 2n ** BigInt(bits))) {
      return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
    }
  }
  throw malformed(kind, `${field} must be a u${bits}, got ${describe(value)}`);
}

// The MessagePack decoder does not validate UTF-8 (it decodes bad bytes into
// some string). A frame's strings are usually ASCII; when one is not, every
// str of the body is checked against its bytes, and invalid UTF-8 makes the
// frame malformed (§3).
let currentBody = null;
let checkedBody = null;

function str(kind, field, value) {
  if (typeof value === 'string') {
    // eslint-disable-next-line no-control-regex
    if (currentBody !== checkedBody && /[^\x00-\x7f]/.test(value)) {
      checkedBody = currentBody;
      if (!stringsAreUtf8(currentBody)) throw malformed(kind, `${field}: a string of the frame is not valid UTF-8`);
    }
    return value;
  }
  throw malformed(kind, `${field} must be a string, got ${describe(value)}`);
}

/**
 * Whether every str in the MessagePack `bytes` (one well-formed value: the
 * decoder already accepted it) is valid UTF-8. Walks the headers; bins and
 * exts are skipped by their length.
 */
function stringsAreUtf8(bytes) {
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  let pos = 0;
  let pending = 1; // values left to walk
  const len = (n, at) => (n === 1 ? view[at] : n === 2 ? view.readUInt16BE(at) : view.readUInt32BE(at));
  while (pending > 0 && pos < view.length) {
    pending -= 1;
    const b = view[pos++];
    let strLength = -1;
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) continue;
    if (b >= 0xa0 && b <= 0xbf) strLength = b - 0xa0;
    else if (b >= 0x90 && b <= 0x9f) { pending += b - 0x90; continue; }
    else if (b >= 0x80 && b <= 0x8f) { pending += 2 * (b - 0x80); continue; }
    else if (b === 0xd9 || b === 0xda || b === 0xdb) {
      const n = b === 0xd9 ? 1 : b === 0xda ? 2 : 4;
      strLength = len(n, pos);
      pos += n;
    } else if (b === 0xc4 || b === 0xc5 || b === 0xc6) {
      const n = b === 0xc4 ? 1 : b === 0xc5 ? 2 : 4;
      pos += n + len(n, pos);
      continue;
    } else if (b === 0xc7 || b === 0xc8 || b === 0xc9) {
      const n = b === 0xc7 ? 1 : b === 0xc8 ? 2 : 4;
      pos += n + 1 + len(n, pos);
      continue;
    } else if (b === 0xdc || b === 0xdd) {
      const n = b === 0xdc ? 2 : 4;
      pending += len(n, pos);
      pos += n;
      continue;
    } else if (b === 0xde || b === 0xdf) {
      const n = b === 0xde ? 2 : 4;
      pending += 2 * len(n, pos);
      pos += n;
      continue;
    } else {
      // Fixed-size scalars: ints, floats, fixext.
      const sizes = { 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8,
        0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17 };
      pos += sizes[b] ?? 0;
      continue;
    }
    if (!isUtf8(view.subarray(pos, pos + strLength))) return false;
    pos += strLength;
  }
  return true;
}

function bin(kind, field, value) {
  if (value instanceof Uint8Array) return value;
  throw malformed(kind, `${field} must be bin, got ${describe(value)}`);
}

function bool(kind, field, value) {
  if (typeof value === 'boolean') return value;
  throw malformed(kind, `${field} must be a bool, got ${describe(value)}`);
}

function uuid(kind, field, value) {
  if (value instanceof Uint8Array && value.length === 16) return Buffer.from(value).toString('hex');
  throw malformed(kind, `${field} must be a 16-byte bin (a UUID), got ${describe(value)}`);
}

function describe(value) {
  if (value === null) return 'nil';
  if (value instanceof Uint8Array) return `bin(${value.length})`;
  if (Array.isArray(value)) return `array(${value.length})`;
  return typeof value;
}

/** A one-entry map `{ name: value }` (an enum's newtype variant), as `[name, value]`. */
function variant(kind, field, value) {
  if (value !== null && typeof value === 'object' && !Array.isArray(value) && !(value instanceof Uint8Array)) {
    const keys = Object.keys(value);
    if (keys.length === 1) return [keys[0], value[keys[0]]];
  }
  throw malformed(kind, `${field} must be a map of one entry, got ${describe(value)}`);
}

function remoteError(kind, field, value) {
  if (!isArray(value, 3)) throw malformed(kind, `${field} must be a RemoteError array(3), got ${describe(value)}`);
  const errorKind = str(kind, `${field}.kind`, value[0]);
  return {
    // PROTOCOL.md §10: an unknown kind reads as Internal.
    kind: ERROR_KINDS.has(errorKind) ? errorKind : 'Internal',
    code: str(kind, `${field}.code`, value[1]),
    message: str(kind, `${field}.message`, value[2]),
  };
}

function encodeRemoteError(error) {
  return [error.kind, error.code ?? '', error.message ?? ''];
}

/** `{"Ok": value}` or `{"Err": RemoteError}` -> `{ ok: value }` or `{ err: RemoteError }`. */
function result(kind, value, ok) {
  const [name, inner] = variant(kind, 'result', value);
  if (name === 'Ok') return { ok: ok(inner) };
  if (name === 'Err') return { err: remoteError(kind, 'result.Err', inner) };
  throw malformed(kind, `result must be Ok or Err, got ${JSON.stringify(name)}`);
}

function encodeResult(r, okValue) {
  return r.err ? { Err: encodeRemoteError(r.err) } : { Ok: okValue };
}

function upstreamState(kind, value) {
  if (value === 'Starting' || value === 'Ready') return value;
  if (typeof value === 'string') throw malformed(kind, `unknown upstream state ${JSON.stringify(value)}`);
  const [name, inner] = variant(kind, 'state', value);
  if (name === 'Down') return { Down: remoteError(kind, 'state.Down', inner) };
  throw malformed(kind, `unknown upstream state ${JSON.stringify(name)}`);
}

function encodeUpstreamState(state) {
  return typeof state === 'string' ? state : { Down: encodeRemoteError(state.Down) };
}

function position(kind, value) {
  if (value === null) return null;
  if (!isArray(value, 2)) throw malformed(kind, `last_seen must be nil or [epoch, seq], got ${describe(value)}`);
  return { epoch: uint(kind, 'last_seen.epoch', value[0], 64), seq: uint(kind, 'last_seen.seq', value[1], 64) };
}

function strings(kind, field, value) {
  if (!Array.isArray(value)) throw malformed(kind, `${field} must be an array of strings, got ${describe(value)}`);
  return value.map((v, i) => str(kind, `${field}[${i}]`, v));
}

function fields(kind, value, length) {
  if (!isArray(value, length)) throw malformed(kind, `expected array(${length}), got ${describe(value)}`);
  return value;
}

function hexToBytes(hex) {
  const bytes = Buffer.from(hex.replace(/-/g, ''), 'hex');
  if (bytes.length !== 16) throw new TypeError(`a UUID must be 16 bytes, got ${bytes.length}`);
  return bytes;
}

// ------------------------------------------------------------------ frame kinds

// For each kind: how its value decodes into fields, and how fields encode into its value.
const KINDS = {
  Hello: {
    decode(v) {
      const f = fields('Hello', v, 5);
      return {
        version: uint('Hello', 'version', f[0], 16),
        peerId: uuid('Hello', 'peer_id', f[1]),
        pid: uint('Hello', 'pid', f[2], 32),
        channels: strings('Hello', 'channels', f[3]),
        token: f[4] === null ? null : str('Hello', 'token', f[4]),
      };
    },
    encode: (f) => [f.version, hexToBytes(f.peerId), f.pid, f.channels, f.token ?? null],
  },
  Welcome: {
    decode(v) {
      const f = fields('Welcome', v, 5);
      return {
        version: uint('Welcome', 'version', f[0], 16),
        leaderId: uuid('Welcome', 'leader_id', f[1]),
        epoch: uint('Welcome', 'epoch', f[2], 64),
        pid: uint('Welcome', 'pid', f[3], 32),
        heartbeatMs: uint('Welcome', 'heartbeat_ms', f[4], 32),
      };
    },
    encode: (f) => [f.version, hexToBytes(f.leaderId), wide(f.epoch), f.pid, f.heartbeatMs],
  },
  Reject: {
    decode(v) {
      const f = fields('Reject', v, 2);
      return { version: uint('Reject', 'version', f[0], 16), error: remoteError('Reject', 'error', f[1]) };
    },
    encode: (f) => [f.version, encodeRemoteError(f.error)],
  },
  Invoke: {
    decode(v) {
      const f = fields('Invoke', v, 5);
      return {
        id: uint('Invoke', 'id', f[0], 64),
        channel: str('Invoke', 'channel', f[1]),
        deadlineMs: uint('Invoke', 'deadline_ms', f[2], 32),
        oneway: bool('Invoke', 'oneway', f[3]),
        payload: bin('Invoke', 'payload', f[4]),
      };
    },
    encode: (f) => [wide(f.id), f.channel, f.deadlineMs, f.oneway, f.payload],
  },
  Response: {
    decode(v) {
      const f = fields('Response', v, 2);
      return {
        id: uint('Response', 'id', f[0], 64),
        result: result('Response', f[1], (ok) => bin('Response', 'result.Ok', ok)),
      };
    },
    encode: (f) => [wide(f.id), encodeResult(f.result, f.result.ok)],
  },
  Cancel: {
    decode: (v) => ({ id: uint('Cancel', 'id', v, 64) }),
    encode: (f) => wide(f.id),
  },
  Subscribe: {
    decode(v) {
      const f = fields('Subscribe', v, 4);
      return {
        id: uint('Subscribe', 'id', f[0], 64),
        channel: str('Subscribe', 'channel', f[1]),
        key: bin('Subscribe', 'key', f[2]),
        lastSeen: position('Subscribe', f[3]),
      };
    },
    encode: (f) => [wide(f.id), f.channel, f.key, f.lastSeen ? [wide(f.lastSeen.epoch), wide(f.lastSeen.seq)] : null],
  },
  Unsubscribe: {
    decode(v) {
      const f = fields('Unsubscribe', v, 3);
      return {
        id: uint('Unsubscribe', 'id', f[0], 64),
        channel: str('Unsubscribe', 'channel', f[1]),
        key: bin('Unsubscribe', 'key', f[2]),
      };
    },
    encode: (f) => [wide(f.id), f.channel, f.key],
  },
  Event: {
    decode(v) {
      if (!Array.isArray(v) || (v.length !== 5 && v.length !== 6)) {
        throw malformed('Event', `expected array(5) or array(6), got ${describe(v)}`);
      }
      return {
        channel: str('Event', 'channel', v[0]),
        key: bin('Event', 'key', v[1]),
        epoch: uint('Event', 'epoch', v[2], 64),
        seq: uint('Event', 'seq', v[3], 64),
        payload: bin('Event', 'payload', v[4]),
        // §4.2: a missing or false 6th element is a live value.
        cached: v.length === 6 ? bool('Event', 'cached', v[5]) : false,
      };
    },
    encode: (f) => {
      const v = [f.channel, f.key, wide(f.epoch), wide(f.seq), f.payload];
      if (f.cached) v.push(true); // a live event is the array(5) form
      return v;
    },
  },
  Publish: {
    decode(v) {
      const f = fields('Publish', v, 3);
      return {
        id: uint('Publish', 'id', f[0], 64),
        channel: str('Publish', 'channel', f[1]),
        payload: bin('Publish', 'payload', f[2]),
      };
    },
    encode: (f) => [wide(f.id), f.channel, f.payload],
  },
  Ack: {
    decode(v) {
      const f = fields('Ack', v, 2);
      return {
        id: uint('Ack', 'id', f[0], 64),
        result: result('Ack', f[1], (ok) => {
          if (ok !== null) throw malformed('Ack', `result.Ok must be nil, got ${describe(ok)}`);
          return null;
        }),
      };
    },
    encode: (f) => [wide(f.id), encodeResult(f.result, null)],
  },
  Status: {
    decode(v) {
      const f = fields('Status', v, 2);
      return { channel: str('Status', 'channel', f[0]), state: upstreamState('Status', f[1]) };
    },
    encode: (f) => [f.channel, encodeUpstreamState(f.state)],
  },
  Ping: {
    decode: (v) => ({ nonce: uint('Ping', 'nonce', v, 64) }),
    encode: (f) => wide(f.nonce),
  },
  Pong: {
    decode: (v) => ({ nonce: uint('Pong', 'nonce', v, 64) }),
    encode: (f) => wide(f.nonce),
  },
  Goodbye: {
    decode: (v) => ({ reason: str('Goodbye', 'reason', v) }),
    encode: (f) => f.reason,
  },
  Open: {
    decode: (v) => ({ channels: strings('Open', 'channels', v) }),
    encode: (f) => f.channels,
  },
  Ended: {
    decode(v) {
      const f = fields('Ended', v, 3);
      return {
        channel: str('Ended', 'channel', f[0]),
        key: bin('Ended', 'key', f[1]),
        error: remoteError('Ended', 'error', f[2]),
      };
    },
    encode: (f) => [f.channel, f.key, encodeRemoteError(f.error)],
  },
};

/** Every frame kind's name. */
const FRAME_KINDS = Object.freeze(Object.keys(KINDS));

// ------------------------------------------------------------------ bodies

/**
 * Decodes one frame body (without its length prefix). Throws `ProtocolError`
 * when the body is not exactly one MessagePack value of a known frame's shape.
 */
function decodeBody(body) {
  return decodeResponse(body) ?? decodeGeneral(body);
}

/** `decodeBody` without the hand-written path for a `Response` (exported for the tests). */
function decodeGeneral(body) {
  let value;
  mapKeysRead = 0;
  try {
    value = frameDecoder.decode(body);
  } catch (error) {
    throw new ProtocolError(`malformed frame: not one MessagePack value (${error.message})`, {
      code: 'malformed',
      cause: error,
    });
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value) || value instanceof Uint8Array) {
    throw new ProtocolError(`malformed frame: the body must be a map of one entry, got ${describe(value)}`, {
      code: 'malformed',
    });
  }
  if (keysIn(value) !== mapKeysRead) {
    throw new ProtocolError('malformed frame: a map repeats a key', { code: 'malformed' });
  }
  const names = Object.keys(value);
  if (names.length !== 1) {
    throw new ProtocolError(`malformed frame: the body must be a map of one entry, got ${names.length}`, {
      code: 'malformed',
    });
  }
  const kind = names[0];
  if (!Object.prototype.hasOwnProperty.call(KINDS, kind)) {
    throw new ProtocolError(`malformed frame: unknown frame kind ${JSON.stringify(kind)}`, { code: 'malformed' });
  }
  currentBody = body;
  try {
    const frame = KINDS[kind].decode(value[kind]);
    frame.kind = kind;
    return frame;
  } finally {
    currentBody = null;
    checkedBody = null;
  }
}

/** Encodes a frame's body (without its length prefix), as a Uint8Array. */
function encodeBody(frame) {
  const kind = KINDS[frame.kind];
  if (!kind) throw new TypeError(`unknown frame kind ${JSON.stringify(frame.kind)}`);
  return frameEncoder.encode({ [frame.kind]: kind.encode(frame) });
}

/**
 * The whole `Invoke` frame (length prefix included), byte for byte what
 * `encodeFrame({ kind: 'Invoke', id, channel, deadlineMs, oneway, payload })`
 * writes, in one buffer with one copy of the payload (`hotpath.js`).
 */
function encodeInvoke(id, channel, deadlineMs, oneway, payload) {
  return encodeInvokeFast(id, channel, deadlineMs, oneway, payload) ??
    encodeFrame({ kind: 'Invoke', id, channel, deadlineMs, oneway, payload });
}

/** Encodes a frame with its 4-byte length prefix, as a Buffer. */
function encodeFrame(frame) {
  const body = encodeBody(frame);
  const out = Buffer.allocUnsafe(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  out.set(body, 4);
  return out;
}

// ------------------------------------------------------------------ payloads

/** The MessagePack of a user value (a request, a key): what a `payload` or `key` bin holds (§11). */
function encodeValue(value) {
  return valueEncoder.encode(value);
}

/**
 * `encodeValue` without the copy: a view into the encoder's buffer, valid
 * only until the next `encodeValue`/`encodeValueShared` (copy it before).
 */
function encodeValueShared(value) {
  return valueEncoder.encodeSharedRef(value);
}

/** A user value from its MessagePack (a response or an event). */
function decodeValue(bytes) {
  return valueDecoder.decode(bytes);
}

module.exports = {
  FRAME_KINDS,
  ERROR_KINDS,
  decodeBody,
  decodeGeneral,
  encodeBody,
  encodeFrame,
  encodeInvoke,
  encodeValue,
  encodeValueShared,
  decodeValue,
};
