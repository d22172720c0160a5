'use strict';
// The follower's settings: every option of `connect`, with its default. The
// defaults are the Rust follower's (`follower/src/config.rs`) where it has the
// same setting.

const { DEFAULT_MAX_FRAME_LENGTH } = require('./frame');

const DEFAULTS = Object.freeze({
  /** The leader's Unix socket. The default is `$TANDEM_LEADER_SOCKET`. */
  socket: undefined,
  /** The secret presented in `Hello`. The default is `$TANDEM_TOKEN`, or none. */
  token: undefined,
  /** Channels named in every `Hello` (the leader refuses the Hello if it serves one not). Others are opened on first use. The default is none. */
  channels: [],
  /** The deadline of a call made without `timeout`, in ms. The default is 5000. */
  timeout: 5000,
  /** How long `connect` keeps trying to reach a first leader, in ms. The default is 30000. */
  connectTimeout: 30000,
  /** How long a leader may take to answer `Hello`, in ms. The default is 5000. */
  handshakeTimeout: 5000,
  /** A leader that sends nothing for this long (ms) is given up and the client reconnects. Also how long a write may make no progress. The default is 5000. */
  peerTimeout: 5000,
  /** The first reconnect delay, in ms; it doubles (with jitter) up to `reconnectMax`. The default is 1. */
  reconnectInitial: 1,
  /** The longest reconnect delay, in ms. The default is 1000. */
  reconnectMax: 1000,
  /** The longest frame body accepted from the leader, and sent to it, in bytes. The default is 16 MiB (PROTOCOL.md §2). */
  maxFrameLength: DEFAULT_MAX_FRAME_LENGTH,
  /** Calls (invoke, publish) outstanding at once; one more fails at once with `Busy`. The default is 4096 (the Rust leader's own per-connection limit). */
  maxInFlight: 4096,
  /** Values queued per subscription for a slow reader; past it the oldest are skipped (the newest is always kept). The default is 256. */
  subscriptionBuffer: 256,
});

function resolveConfig(options = {}) {
  const config = { ...DEFAULTS };
  for (const [name, value] of Object.entries(options)) {
    if (!(name in DEFAULTS)) throw new TypeError(`connect: unknown option ${JSON.stringify(name)}`);
    if (value !== undefined) config[name] = value;
  }
  config.socket = config.socket ?? process.env.TANDEM_LEADER_SOCKET;
  if (!config.socket) {
    throw new TypeError('connect: no leader socket: pass { socket } or set TANDEM_LEADER_SOCKET');
  }
  if (config.token === undefined) config.token = process.env.TANDEM_TOKEN || null;
  if (!Array.isArray(config.channels) || config.channels.some((c) => typeof c !== 'string' || c === '')) {
    throw new TypeError('connect: channels must be an array of non-empty strings');
  }
  for (const name of ['timeout', 'connectTimeout', 'handshakeTimeout', 'peerTimeout', 'reconnectInitial',
    'reconnectMax', 'maxFrameLength', 'maxInFlight', 'subscriptionBuffer']) {
    const value = config[name];
    if (typeof value !== 'number' || !(value > 0) || !Number.isFinite(value)) {
      throw new TypeError(`connect: ${name} must be a positive number, got ${value}`);
    }
  }
  if (config.maxFrameLength > 0xffffffff) throw new TypeError('connect: maxFrameLength is at most 2^32 - 1');
  config.channels = [...new Set(config.channels)];
  return config;
}

module.exports = { DEFAULTS, resolveConfig };
