'use strict';
// The client: calls, subscriptions and publishes over one link to the leader,
// and the reconnect loop that replaces the link when it dies.
//
//   client.invoke ──Invoke──> leader ──Response──> promise settles
//   client.subscribe ──Subscribe{last_seen}──> leader ──Ack, Event...──> iterator
//   link ends ──> every call fails with LeaderLost at once; subscriptions stay,
//                 reconnect (backoff) ──> Welcome{epoch >= seen} ──> resubscribe
//                 with each key's newest position; older or equal values dropped
//
// It mirrors the Rust follower's driver (`follower/src/driver.rs`): the same
// exactly-once, in-order rule for values (a value at or below the last one
// delivered is a replay), the same refusal of a leader with an older epoch,
// the same "value re-announced by a new leader is not delivered twice" rule.

const { EventEmitter } = require('node:events');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { Link } = require('./link');
const { encodeValue, encodeValueShared, encodeInvoke, decodeValue, encodeFrame } = require('./codec');
const { resolveConfig } = require('./config');
const { Subscription } = require('./subscription');
const {
  DeadlineExceeded, LeaderLost, Rejected, RemoteError, Cancelled, Closed, NotReady, TooLarge, Busy,
} = require('./errors');

const PROTOCOL_VERSION = 1;
/** How long to wait before asking again for a subscription the leader refused (its upstream may recover). */
const RESUBSCRIBE_RETRY_MS = 1000;
/** Frame bytes besides a payload or key (kind, id, channel name...): a payload must leave room for them. */
const FRAME_OVERHEAD = 256;
const U32_MAX = 0xffffffff;

/** Whether position a is after position b (lexicographic on (epoch, seq), §7). */
function after(a, b) {
  // `==` and `<`, not `===`: an epoch or seq may be a BigInt beyond 2^53.
  // eslint-disable-next-line eqeqeq
  return a.epoch > b.epoch || (a.epoch == b.epoch && a.seq > b.seq);
}

function sameBytes(a, b) {
  return a.length === b.length && Buffer.compare(a, b) === 0;
}

class Client extends EventEmitter {
  /** @internal use `connect` */
  constructor(config) {
    super();
    this.config = config;
    this.peerId = crypto.randomUUID();
    /** `connecting`, `connected`, `leaderLost`, `rejected` or `closed`. */
    this.state = 'connecting';
    /** The current (or last) leader's epoch, pid and id; null before the first Welcome. */
    this.epoch = null;
    this.leaderPid = null;
    this.leaderId = null;
    /** Why the last link ended (an Error), or null. */
    this.lastError = null;
    this.maxEpoch = -1;
    this.channels = config.channels.slice();
    this.declared = this.channels.length;
    this.statuses = new Map();
    this.link = null;
    this.nextId = 1;
    /** id -> { resolve, reject, deadline, timeoutMs, signal, onAbort } of calls and publishes. */
    this.inFlight = new Map();
    /** id -> topic (a Subscribe awaiting its Ack), or null (an Unsubscribe's Ack, ignored). */
    this.acks = new Map();
    /** `channel\0keyhex` -> topic. */
    this.topics = new Map();
    this.timer = null;
    this.timerAt = Infinity;
    this.onTimer = this.onTimer.bind(this);
    this.retryTimer = null;
    this.rejection = null;
    this.wakeReconnect = null;
    this.closing = null;
    this.reconnects = 0;
    this.everConnected = false;
  }

  // ---------------------------------------------------------------- public API

  /**
   * Calls the channel's upstream with `request` (MessagePack-encoded; a Rust
   * enum is `{ Variant: value }`) and resolves with its decoded response.
   * `timeout` (ms, default `config.timeout`) bounds the call here and at the
   * leader; `signal` (an AbortSignal) cancels it (a `Cancel` is sent);
   * `oneway: true` sends it without waiting for, or getting, an answer;
   * `raw: true` takes and gives the MessagePack bytes undecoded.
   */
  invoke(channel, request, options = {}) {
    return new Promise((resolve, reject) => {
      const { timeout = this.config.timeout, signal, oneway = false, raw = false } = options;
      if (typeof channel !== 'string' || channel === '') throw new TypeError('invoke: channel must be a non-empty string');
      if (signal && signal.aborted) throw new Cancelled({ cause: signal.reason });
      this.usable();
      if (!(timeout > 0)) throw new TypeError(`invoke: timeout must be a positive number of ms, got ${timeout}`);
      if (raw && !(request instanceof Uint8Array)) throw new TypeError('invoke: with raw: true the request must be MessagePack bytes (a Uint8Array)');
      // A view into the encoder's buffer: copied into the frame below, before
      // anything else is encoded.
      const payload = raw ? request : encodeValueShared(request);
      this.checkSize(payload);
      if (!oneway && this.inFlight.size >= this.config.maxInFlight) throw new Busy(this.config.maxInFlight);
      this.open(channel);
      const id = this.nextId++;
      const deadlineMs = Math.min(Math.max(Math.ceil(timeout), 1), U32_MAX);
      const frame = encodeInvoke(id, channel, deadlineMs, oneway, payload);
      if (oneway) {
        this.link.sendEncoded(frame);
        resolve(undefined);
        return;
      }
      const call = { resolve, reject, deadline: Date.now() + timeout, timeoutMs: timeout, raw, signal: null, onAbort: null };
      if (signal) {
        call.signal = signal;
        call.onAbort = () => this.cancel(id, new Cancelled({ cause: signal.reason }));
        signal.addEventListener('abort', call.onAbort, { once: true });
      }
      this.inFlight.set(id, call);
      this.arm(call.deadline);
      this.link.sendEncoded(frame);
    });
  }

  /**
   * Publishes `request` through the channel's upstream and resolves once the
   * leader acknowledged it (`Ack`). `timeout` and `signal` as for `invoke`
   * (cancelling a publish stops waiting; the protocol has no Cancel for it).
   */
  publish(channel, request, options = {}) {
    return new Promise((resolve, reject) => {
      const { timeout = this.config.timeout, signal, raw = false } = options;
      if (typeof channel !== 'string' || channel === '') throw new TypeError('publish: channel must be a non-empty string');
      if (signal && signal.aborted) throw new Cancelled({ cause: signal.reason });
      this.usable();
      if (raw && !(request instanceof Uint8Array)) throw new TypeError('publish: with raw: true the request must be MessagePack bytes (a Uint8Array)');
      const payload = raw ? request : encodeValue(request);
      this.checkSize(payload);
      if (this.inFlight.size >= this.config.maxInFlight) throw new Busy(this.config.maxInFlight);
      this.open(channel);
      const id = this.nextId++;
      const call = { resolve, reject, deadline: Date.now() + timeout, timeoutMs: timeout, raw, publish: true, signal: null, onAbort: null };
      if (signal) {
        call.signal = signal;
        call.onAbort = () => this.cancel(id, new Cancelled({ cause: signal.reason }));
        signal.addEventListener('abort', call.onAbort, { once: true });
      }
      this.inFlight.set(id, call);
      this.arm(call.deadline);
      this.link.send({ kind: 'Publish', id, channel, payload });
    });
  }

  /**
   * Subscribes to `key` (MessagePack-encoded, byte for byte as the Rust side
   * encodes it: a Rust `String` key is a JS string) and returns the
   * subscription at once: an async iterator of `{ value, epoch, seq, source }`
   * starting with the key's current value, if the leader has one.
   * `await sub.ready` to know the leader accepted it; a refusal also makes the
   * iterator throw. `buffer` overrides `config.subscriptionBuffer`.
   */
  subscribe(channel, key, options = {}) {
    if (typeof channel !== 'string' || channel === '') throw new TypeError('subscribe: channel must be a non-empty string');
    const { buffer = this.config.subscriptionBuffer, raw = false } = options;
    const keyBytes = Buffer.from(raw ? key : encodeValue(key));
    const sub = new Subscription(this, channel, key, Math.max(1, buffer));
    let error = null;
    try {
      this.usable();
      this.checkSize(keyBytes);
    } catch (e) {
      error = e;
    }
    if (error) {
      sub.fail(error);
      return sub;
    }
    this.open(channel);
    const topicKey = `${channel}\0${keyBytes.toString('hex')}`;
    let topic = this.topics.get(topicKey);
    if (!topic) {
      topic = {
        id: topicKey, channel, key: keyBytes, last: null, remote: 'unsent', pendingId: null,
        handles: new Set(), resynced: false, raw,
      };
      this.topics.set(topicKey, topic);
    }
    sub.topic = topic;
    topic.handles.add(sub);
    if (topic.remote === 'active') {
      sub.acknowledged(topic.last ? topic.last.update : undefined);
    } else if (topic.remote === 'unsent') {
      this.sendSubscribe(topic);
    }
    return sub;
  }

  /** An upstream's state as the leader last reported it: `'Starting'`, `'Ready'`, `{ Down: { kind, code, message } }`, or undefined. */
  status(channel) {
    return this.statuses.get(channel);
  }

  /**
   * Closes the client: calls still outstanding fail with `Closed`,
   * subscriptions end, the leader is told `Goodbye`. Resolves once the socket
   * is closed. Calling it again is harmless.
   */
  close() {
    if (this.closing) return this.closing;
    this.setState('closed');
    const closed = new Closed();
    clearTimeout(this.timer);
    clearTimeout(this.retryTimer);
    this.failAll(closed);
    for (const topic of this.topics.values()) {
      for (const sub of topic.handles) sub.finish();
    }
    this.topics.clear();
    if (this.wakeReconnect) this.wakeReconnect();
    const link = this.link;
    this.link = null;
    this.closing = link ? link.close('follower closing', this.config.handshakeTimeout) : Promise.resolve();
    return this.closing;
  }

  // ---------------------------------------------------------------- internals

  closedError() {
    return new Closed();
  }

  /** Throws when no call can be made now: closed, rejected, or between leaders (fail fast, as the Rust follower). */
  usable() {
    if (this.state === 'closed') throw new Closed();
    if (this.state === 'rejected') throw this.rejection;
    if (this.state !== 'connected') {
      throw new LeaderLost('no leader right now; reconnecting', this.lastError ? { cause: this.lastError } : undefined);
    }
  }

  checkSize(bytes) {
    if (bytes.length > this.config.maxFrameLength - FRAME_OVERHEAD) {
      throw new TooLarge(`${bytes.length} bytes exceed the ${this.config.maxFrameLength - FRAME_OVERHEAD}-byte limit of one frame`);
    }
  }

  setState(state, detail) {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', state, detail);
  }

  /** Makes `channel` part of the connection: `Open` now, and after each later Welcome (§5.7). */
  open(channel) {
    if (this.channels.includes(channel)) return;
    this.channels.push(channel);
    if (this.link) this.link.send({ kind: 'Open', channels: [channel] });
  }

  // One timer for all the calls' deadlines: armed for the earliest; a call
  // answered early leaves its deadline behind (the timer fires once for nothing).
  arm(deadline) {
    if (deadline >= this.timerAt) return;
    clearTimeout(this.timer);
    this.timerAt = deadline;
    this.timer = setTimeout(this.onTimer, Math.max(0, deadline - Date.now()));
    this.timer.unref();
  }

  onTimer() {
    this.timer = null;
    this.timerAt = Infinity;
    const now = Date.now();
    let next = Infinity;
    for (const [id, call] of this.inFlight) {
      if (call.deadline <= now) {
        this.cancel(id, new DeadlineExceeded(call.timeoutMs));
      } else if (call.deadline < next) {
        next = call.deadline;
      }
    }
    if (next !== Infinity) this.arm(next);
  }

  /** Abandons a call: tells the leader (`Cancel`, for an invoke) and rejects it with `error`. */
  cancel(id, error) {
    const call = this.inFlight.get(id);
    if (!call) return;
    this.inFlight.delete(id);
    if (!call.publish && this.link) this.link.send({ kind: 'Cancel', id });
    this.settle(call, error);
  }

  settle(call, error, value) {
    if (call.signal) call.signal.removeEventListener('abort', call.onAbort);
    if (error) call.reject(error);
    else call.resolve(value);
  }

  failAll(error) {
    const calls = this.inFlight;
    this.inFlight = new Map();
    for (const call of calls.values()) this.settle(call, error);
    this.acks.clear();
  }

  sendSubscribe(topic) {
    if (!this.link) return;
    const id = this.nextId++;
    topic.remote = 'pending';
    topic.pendingId = id;
    const lastSeen = topic.last ? { epoch: topic.last.epoch, seq: topic.last.seq } : null;
    topic.resynced = lastSeen !== null;
    this.acks.set(id, topic);
    this.link.send({ kind: 'Subscribe', id, channel: topic.channel, key: topic.key, lastSeen });
  }

  /** @internal a subscription handle let go of its topic. */
  release(sub) {
    const topic = sub.topic;
    if (!topic || !topic.handles.delete(sub) || topic.handles.size > 0) return;
    if (this.topics.get(topic.id) !== topic) return;
    this.topics.delete(topic.id);
    if (topic.remote !== 'unsent' && this.link) {
      const id = this.nextId++;
      this.acks.set(id, null);
      this.link.send({ kind: 'Unsubscribe', id, channel: topic.channel, key: topic.key });
    }
    topic.remote = 'gone';
  }

  // ---------------------------------------------------------------- frames

  onFrame(frame) {
    switch (frame.kind) {
      case 'Response': {
        const call = this.inFlight.get(frame.id);
        if (!call || call.publish) return; // cancelled (its answer crossed the Cancel), or expired
        this.inFlight.delete(frame.id);
        if (frame.result.err) {
          this.settle(call, new RemoteError(frame.result.err));
          return;
        }
        if (call.raw) {
          this.settle(call, null, Buffer.from(frame.result.ok));
          return;
        }
        let value;
        try {
          value = decodeValue(frame.result.ok);
        } catch (error) {
          this.settle(call, new RemoteError({ kind: 'BadRequest', code: 'decode', message: `the response does not decode: ${error.message}` }));
          return;
        }
        this.settle(call, null, value);
        return;
      }
      case 'Ack': {
        const call = this.inFlight.get(frame.id);
        if (call && call.publish) {
          this.inFlight.delete(frame.id);
          this.settle(call, frame.result.err ? new RemoteError(frame.result.err) : null, undefined);
          return;
        }
        if (!this.acks.has(frame.id)) return;
        const topic = this.acks.get(frame.id);
        this.acks.delete(frame.id);
        if (topic) this.onSubscribed(frame.id, topic, frame.result);
        return;
      }
      case 'Event':
        this.onEvent(frame);
        return;
      case 'Ended':
        this.onEnded(frame);
        return;
      case 'Status':
        if (!this.channels.includes(frame.channel)) return;
        this.statuses.set(frame.channel, frame.state);
        this.emit('status', frame.channel, frame.state);
        return;
      default:
    }
  }

  onSubscribed(id, topic, result) {
    if (topic.remote !== 'pending' || topic.pendingId !== id) return;
    if (!result.err) {
      topic.remote = 'active';
      for (const sub of topic.handles) sub.acknowledged(topic.last ? topic.last.update : undefined);
      return;
    }
    const error = new RemoteError(result.err);
    topic.remote = 'unsent';
    let live = 0;
    for (const sub of [...topic.handles]) {
      if (sub.isReady) live += 1;
      else {
        topic.handles.delete(sub);
        sub.fail(error);
      }
    }
    if (live === 0) {
      this.topics.delete(topic.id);
      topic.remote = 'gone';
      return;
    }
    // Live subscriptions must not stall: ask again shortly.
    this.emit('warning', new RemoteError(result.err), `subscribe of a key on ${topic.channel} refused; retrying`);
    if (!this.retryTimer) {
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        if (this.state !== 'connected') return;
        for (const t of this.topics.values()) if (t.remote === 'unsent') this.sendSubscribe(t);
      }, RESUBSCRIBE_RETRY_MS);
      this.retryTimer.unref();
    }
  }

  onEvent(event) {
    const topic = this.topics.get(`${event.channel}\0${Buffer.from(event.key).toString('hex')}`);
    if (!topic || topic.remote === 'gone') return;
    const position = { epoch: event.epoch, seq: event.seq };
    // Exactly once, in order: anything at or below what was delivered is a replay.
    if (topic.last && !after(position, topic.last)) return;
    const resynced = topic.resynced;
    topic.resynced = false;
    const payload = Buffer.from(event.payload);
    if (resynced && sameBytes(topic.last.payload, payload) && (event.cached || !topic.last.cached)) {
      // The same value, re-announced by a new leader: move the position on, deliver nothing.
      topic.last = { ...topic.last, epoch: event.epoch, seq: event.seq, cached: event.cached };
      return;
    }
    let value;
    if (topic.raw) value = payload;
    else {
      try {
        value = decodeValue(payload);
      } catch (error) {
        this.emit('warning', error, `an undecodable event of a key on ${event.channel} was skipped`);
        return;
      }
    }
    const update = { value, epoch: event.epoch, seq: event.seq, source: event.cached ? 'cache' : 'live' };
    topic.last = { epoch: event.epoch, seq: event.seq, payload, cached: event.cached, update };
    for (const sub of topic.handles) if (sub.isReady) sub.push(update);
  }

  onEnded(ended) {
    const id = `${ended.channel}\0${Buffer.from(ended.key).toString('hex')}`;
    const topic = this.topics.get(id);
    if (!topic || topic.remote !== 'active') return;
    this.topics.delete(id);
    topic.remote = 'gone';
    const error = new RemoteError(ended.error);
    for (const sub of topic.handles) {
      sub.ended = error;
      sub.fail(error);
    }
  }

  // ---------------------------------------------------------------- links

  hello() {
    return {
      version: PROTOCOL_VERSION,
      peerId: this.peerId,
      pid: process.pid,
      channels: this.channels.slice(0, this.declared),
      token: this.config.token,
    };
  }

  /** One attempt: a link and its Welcome, or why not. */
  attempt() {
    return Link.open(this.config.socket, this.hello(), this.config);
  }

  /** Takes a fresh link whose Welcome was accepted. */
  attach(link, welcome) {
    if (welcome.epoch == this.maxEpoch && this.leaderId !== null && this.leaderId !== welcome.leaderId) { // eslint-disable-line eqeqeq
      // A different leader with the same epoch: its positions restart, so
      // ordering against the old ones is meaningless. Accept its values.
      this.emit('warning', null, `a new leader reused epoch ${welcome.epoch}; give each leader a higher epoch`);
      for (const topic of this.topics.values()) topic.last = null;
    }
    this.link = link;
    this.maxEpoch = welcome.epoch;
    this.epoch = welcome.epoch;
    this.leaderPid = welcome.pid;
    this.leaderId = welcome.leaderId;
    this.statuses.clear();
    this.rejection = null;
    link.start({
      heartbeatMs: welcome.heartbeatMs,
      peerTimeout: this.config.peerTimeout,
      onFrame: (frame) => this.onFrame(frame),
      onEnd: (reason) => this.lost(link, reason),
    });
    if (link.ended) return;
    const late = this.channels.slice(this.declared);
    if (late.length > 0) link.send({ kind: 'Open', channels: late });
    for (const topic of this.topics.values()) {
      if (topic.handles.size > 0) this.sendSubscribe(topic);
    }
    this.everConnected = true;
    this.setState('connected');
    this.emit('connected', { epoch: welcome.epoch, leaderPid: welcome.pid, leaderId: welcome.leaderId });
  }

  /** The link died: every outstanding call fails at once; subscriptions are kept for the next leader. */
  lost(link, reason) {
    if (this.link !== link) return;
    this.link = null;
    this.lastError = reason;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const error = reason instanceof LeaderLost ? reason : new LeaderLost(`the leader was lost: ${reason.message}`, { cause: reason });
    this.failAll(error);
    for (const topic of [...this.topics.values()]) {
      topic.remote = 'unsent';
      for (const sub of [...topic.handles]) {
        if (!sub.isReady) {
          topic.handles.delete(sub);
          sub.fail(error);
        }
      }
      if (topic.handles.size === 0) {
        this.topics.delete(topic.id);
        topic.remote = 'gone';
      }
    }
    // Before the first Welcome was taken, `connect` is still trying: it retries.
    if (this.state === 'closed' || !this.everConnected) return;
    this.setState('leaderLost', reason);
    this.emit('disconnected', reason);
    this.reconnect();
  }

  /** Waits `ms`, or less if the client closes meanwhile. */
  pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wakeReconnect = null;
        resolve();
      }, ms);
      this.wakeReconnect = () => {
        clearTimeout(timer);
        this.wakeReconnect = null;
        resolve();
      };
    });
  }

  /** The reconnect loop: backoff with jitter, refuse older epochs, wait out a rejection until the socket changes. */
  async reconnect() {
    let delay = this.config.reconnectInitial;
    let rejectedSocket = null;
    while (this.state !== 'closed') {
      await this.pause(delay * (0.5 + Math.random() / 2));
      delay = Math.min(delay * 2, this.config.reconnectMax);
      if (this.state === 'closed') return;
      if (rejectedSocket !== null) {
        // PROTOCOL.md §5: do not send a rejected Hello again unchanged; wait
        // for a new leader, which binds a new socket at the path.
        if (socketIdentity(this.config.socket) === rejectedSocket) {
          delay = this.config.reconnectMax;
          continue;
        }
        rejectedSocket = null;
      }
      let opened;
      try {
        opened = await this.attempt();
      } catch (error) {
        if (this.state === 'closed') return;
        this.lastError = error;
        if (error instanceof Rejected) {
          rejectedSocket = socketIdentity(this.config.socket);
          this.rejection = error;
          this.setState('rejected', error);
          this.emit('rejected', error);
          delay = this.config.reconnectMax;
        }
        this.emit('reconnectFailed', error);
        continue;
      }
      const { link, welcome } = opened;
      if (this.state === 'closed') {
        link.close('follower closing', this.config.handshakeTimeout);
        return;
      }
      if (welcome.epoch < this.maxEpoch) {
        // Never go back to a leader older than one already followed.
        this.emit('warning', null, `refusing a leader at epoch ${welcome.epoch}, older than ${this.maxEpoch}`);
        link.close('leader older than one already seen', this.config.handshakeTimeout);
        continue;
      }
      this.reconnects += 1;
      this.attach(link, welcome);
      return;
    }
  }
}

/**
 * What identifies the socket file at `path`: a new leader binds a new one.
 * Its inode and creation time (an inode number alone may be reused at once).
 */
function socketIdentity(path) {
  try {
    const stat = fs.statSync(path);
    return `${stat.ino}:${stat.birthtimeMs || stat.ctimeMs}`;
  } catch {
    return 'none';
  }
}

/**
 * Connects to the leader and resolves with a `Client` once the leader said
 * Welcome. Retries (with backoff) while no leader answers, for at most
 * `connectTimeout`; rejects with `Rejected` at once if the leader refuses the
 * Hello (wrong token, version or channel), or `NotReady` after the timeout
 * (its `cause` is the last failure).
 */
async function connect(options = {}) {
  const config = resolveConfig(options);
  const client = new Client(config);
  const until = Date.now() + config.connectTimeout;
  let delay = config.reconnectInitial;
  let lastError = null;
  for (;;) {
    let opened = null;
    try {
      opened = await client.attempt();
    } catch (error) {
      if (error instanceof Rejected) {
        client.setState('closed');
        throw error;
      }
      lastError = error;
    }
    if (opened) {
      client.attach(opened.link, opened.welcome);
      if (client.state === 'connected') return client;
      lastError = client.lastError;
      client.state = 'connecting';
    }
    const left = until - Date.now();
    if (left <= 0) {
      throw new NotReady(
        `no leader answered at ${config.socket} within ${config.connectTimeout} ms` +
          (lastError ? `: ${lastError.message}` : ''),
        { cause: lastError },
      );
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(left, delay * (0.5 + Math.random() / 2))));
    delay = Math.min(delay * 2, config.reconnectMax);
  }
}

module.exports = { connect, Client, PROTOCOL_VERSION, encodeFrame };
