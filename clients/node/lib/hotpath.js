'use strict';
// The two frames of every call, written and read by hand: an Invoke out, its
// successful Response in. The general path (`codec.js`, with the MessagePack
// package) costs several microseconds per frame, most of it building and
// walking the intermediate objects; these cost a fraction of that. Each
// produces or accepts exactly the bytes of the general path
// (test/codec.test.js compares them over every integer, string and bin
// width); for anything else they return null and `codec.js` takes the
// general path, which also does all the refusing of malformed bodies.

const { Encoder } = require('@msgpack/msgpack');

// Channel names, encoded as the general path's encoder does (a str of the
// shortest width). Its own encoder: a payload may be a view into codec.js's.
const nameEncoder = new Encoder();

// `{"Response": [` : a map of one entry, the key, an array of 2.
const RESPONSE_HEAD = Buffer.from([0x81, 0xa8, ...Buffer.from('Response'), 0x92]);

/**
 * A `Response` body of the form `{"Response": [id, {"Ok": bin}]}` with an id
 * below 2^32, decoded without the general decoder; null for any other body
 * (which the general path decodes, or refuses, as usual).
 */
function decodeResponse(body) {
  const length = body.length;
  if (length < 17 || body[0] !== 0x81 || body[1] !== 0xa8) return null;
  for (let i = 2; i < 11; i++) if (body[i] !== RESPONSE_HEAD[i]) return null;
  let pos = 11;
  let id;
  const b = body[pos];
  if (b < 0x80) {
    id = b;
    pos += 1;
  } else if (b === 0xcc) {
    id = body[pos + 1];
    pos += 2;
  } else if (b === 0xcd) {
    id = (body[pos + 1] << 8) | body[pos + 2];
    pos += 3;
  } else if (b === 0xce) {
    id = body[pos + 1] * 0x1000000 + ((body[pos + 2] << 16) | (body[pos + 3] << 8) | body[pos + 4]);
    pos += 5;
  } else {
    return null;
  }
  // `{"Ok": ` then a bin header.
  if (body[pos] !== 0x81 || body[pos + 1] !== 0xa2 || body[pos + 2] !== 0x4f || body[pos + 3] !== 0x6b) return null;
  pos += 4;
  const t = body[pos];
  let n;
  if (t === 0xc4) {
    n = body[pos + 1];
    pos += 2;
  } else if (t === 0xc5) {
    n = (body[pos + 1] << 8) | body[pos + 2];
    pos += 3;
  } else if (t === 0xc6) {
    n = body[pos + 1] * 0x1000000 + ((body[pos + 2] << 16) | (body[pos + 3] << 8) | body[pos + 4]);
    pos += 5;
  } else {
    return null;
  }
  if (pos + n !== length) return null;
  return { id, result: { ok: body.subarray(pos, length) }, kind: 'Response' };
}

// `{"Invoke": [` : a map of one entry, the key, an array of 5.
const INVOKE_HEAD = Buffer.from([0x81, 0xa6, ...Buffer.from('Invoke'), 0x95]);
/** A channel name -> its MessagePack str (a few channels per client; bounded all the same). */
const channelStrings = new Map();
const MAX_CACHED_CHANNELS = 256;

function uintLength(n) {
  return n < 0x80 ? 1 : n < 0x100 ? 2 : n < 0x10000 ? 3 : 5;
}

function writeUint(out, pos, n) {
  if (n < 0x80) {
    out[pos] = n;
    return pos + 1;
  }
  if (n < 0x100) {
    out[pos] = 0xcc;
    out[pos + 1] = n;
    return pos + 2;
  }
  if (n < 0x10000) {
    out[pos] = 0xcd;
    out.writeUInt16BE(n, pos + 1);
    return pos + 3;
  }
  out[pos] = 0xce;
  out.writeUInt32BE(n, pos + 1);
  return pos + 5;
}

/**
 * The whole `Invoke` frame (length prefix included), as `codec.encodeFrame`
 * writes `{ kind: 'Invoke', id, channel, deadlineMs, oneway, payload }`, in
 * one buffer with one copy of the payload; null for an id or deadline of
 * 2^32 or more (the general path writes those).
 */
function encodeInvoke(id, channel, deadlineMs, oneway, payload) {
  let name = channelStrings.get(channel);
  if (name === undefined) {
    if (channelStrings.size >= MAX_CACHED_CHANNELS) channelStrings.clear();
    name = Buffer.from(nameEncoder.encode(channel));
    channelStrings.set(channel, name);
  }
  if (typeof id !== 'number' || id >= 0x100000000 || deadlineMs >= 0x100000000) return null;
  const n = payload.length;
  const binHead = n < 0x100 ? 2 : n < 0x10000 ? 3 : 5;
  const bodyLength = INVOKE_HEAD.length + uintLength(id) + name.length + uintLength(deadlineMs) + 1 + binHead + n;
  const out = Buffer.allocUnsafe(4 + bodyLength);
  out.writeUInt32BE(bodyLength, 0);
  INVOKE_HEAD.copy(out, 4);
  let pos = writeUint(out, 4 + INVOKE_HEAD.length, id);
  name.copy(out, pos);
  pos = writeUint(out, pos + name.length, deadlineMs);
  out[pos++] = oneway ? 0xc3 : 0xc2;
  if (n < 0x100) {
    out[pos] = 0xc4;
    out[pos + 1] = n;
  } else if (n < 0x10000) {
    out[pos] = 0xc5;
    out.writeUInt16BE(n, pos + 1);
  } else {
    out[pos] = 0xc6;
    out.writeUInt32BE(n, pos + 1);
  }
  out.set(payload, pos + binHead);
  return out;
}

module.exports = { decodeResponse, encodeInvoke };
