'use strict';
// One connection to a leader: the socket, the handshake (PROTOCOL.md §5), the
// heartbeats (§8) and batched writes. It knows nothing of calls or
// subscriptions: it hands each frame the leader sends to `onFrame` and calls
// `onEnd(reason)` once, when the link is over for any reason.
//
//   follower                         leader
//      |-- Hello -------------------->|
//      |<------------------- Welcome --|   (or Reject, then close)
//      |<------------- Status (each) --|
//      |<--- Ping / any frame ---------|   every heartbeat_ms; silence past
//      |---- Ping ------------------->|   peerTimeout ends the link
//
// Writes made together go out in one `write`: frames are queued, and flushed
// by `process.nextTick`, which runs once the current callback and every
// promise continuation it released have run. So the 64 calls re-issued by the
// continuations of 64 answers read in one chunk cost one system call, not 64,
// and a lone call is written before the event loop moves on (`setImmediate`
// would wait for the loop's check phase, and costs a handle toggle per call).

const net = require('node:net');
const { FrameReader } = require('./frame');
const { decodeBody, encodeFrame } = require('./codec');
const { ProtocolError, Rejected, LeaderLost } = require('./errors');

/** The frame kinds a leader may send once the session is established (§4.2, L→F or both). */
const FROM_LEADER = new Set(['Response', 'Ack', 'Event', 'Ended', 'Status', 'Ping', 'Pong', 'Goodbye']);

class Link {
  constructor(socket, maxFrameLength) {
    this.socket = socket;
    this.reader = new FrameReader(maxFrameLength);
    this.out = [];
    this.flushScheduled = false;
    this.ended = false;
    this.onFrame = null;
    this.onEnd = null;
    /** Frames read before `start` (the Status frames that follow Welcome in the same read). */
    this.early = [];
    this.heard = false;
    this.timer = null;
    this.flush = this.flush.bind(this);
  }

  /**
   * Connects to `path`, says `hello` and waits for the answer. Resolves
   * `{ link, welcome }`; rejects with `Rejected` (a `Reject`), `ProtocolError`
   * (anything else, or bad bytes), `LeaderLost` (a close or `Goodbye` first),
   * or the socket's error (`ENOENT`, `ECONNREFUSED`: no leader there).
   */
  static open(path, hello, { handshakeTimeout, maxFrameLength }) {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path });
      socket.setNoDelay?.(true);
      const link = new Link(socket, maxFrameLength);
      let settled = false;
      const fail = (error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        link.ended = true;
        socket.destroy();
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new ProtocolError(`no Welcome within ${handshakeTimeout} ms`, { code: 'handshake' })),
        handshakeTimeout,
      );
      socket.once('connect', () => link.send({ kind: 'Hello', ...hello }));
      socket.on('error', (error) => {
        if (!settled) fail(error);
        else link.end(new LeaderLost(`the link to the leader failed: ${error.message}`, { cause: error }));
      });
      socket.on('close', () => {
        if (!settled) {
          let reason = new LeaderLost('the leader closed the connection during the handshake');
          try {
            link.reader.end();
          } catch (error) {
            reason = error;
          }
          fail(reason);
          return;
        }
        let reason = new LeaderLost('the leader closed the connection');
        try {
          link.reader.end();
        } catch (error) {
          reason = new LeaderLost(`the link to the leader broke: ${error.message}`, { cause: error });
        }
        link.end(reason);
      });
      socket.on('data', (chunk) => {
        if (link.ended) return;
        let bodies;
        try {
          bodies = link.reader.push(chunk);
        } catch (error) {
          if (!settled) fail(error);
          else link.end(new LeaderLost(`bad bytes from the leader: ${error.message}`, { cause: error }));
          return;
        }
        for (const body of bodies) {
          if (link.ended) return;
          let frame;
          try {
            frame = decodeBody(body);
          } catch (error) {
            if (!settled) fail(error);
            else link.end(new LeaderLost(`bad bytes from the leader: ${error.message}`, { cause: error }));
            return;
          }
          if (!settled) {
            if (frame.kind === 'Welcome' && frame.version !== hello.version) {
              // §5.3: the leader speaks the version offered, or rejects it.
              fail(new ProtocolError(`Welcome.version is ${frame.version}, this follower offered ${hello.version}`, { code: 'handshake' }));
            } else if (frame.kind === 'Welcome') {
              settled = true;
              clearTimeout(timer);
              resolve({ link, welcome: frame });
            } else if (frame.kind === 'Reject') {
              fail(new Rejected(frame.error));
            } else if (frame.kind === 'Goodbye') {
              fail(new LeaderLost(`the leader said goodbye during the handshake: ${frame.reason}`));
            } else {
              fail(new ProtocolError(`expected Welcome, got ${frame.kind}`, { code: 'handshake' }));
            }
          } else if (link.onFrame) {
            link.deliver(frame);
          } else {
            link.early.push(frame);
          }
        }
      });
    });
  }

  /**
   * Starts the session: frames go to `onFrame`, the end to `onEnd(reason)`.
   * Pings every `heartbeatMs` and ends the link after `peerTimeout` ms without a frame.
   */
  start({ heartbeatMs, peerTimeout, onFrame, onEnd }) {
    this.onFrame = onFrame;
    this.onEnd = onEnd;
    if (this.ended) {
      // The link ended between the Welcome and now: no session to run.
      onEnd(this.endReason || new LeaderLost('the leader closed the connection'));
      return;
    }
    const heartbeat = Math.max(heartbeatMs, 10);
    // Silence is checked at least four times per peer timeout, whatever
    // heartbeat the leader announced; a ping goes out once per heartbeat
    // (as the Rust follower, follower/src/driver.rs).
    const interval = Math.max(Math.min(heartbeat, peerTimeout / 4), 10);
    let nextPing = Date.now() + heartbeat;
    let lastReceived = Date.now();
    let nonce = 0;
    let writeProgress = Date.now();
    this.socket.on('drain', () => {
      writeProgress = Date.now();
    });
    this.timer = setInterval(() => {
      const now = Date.now();
      // Silence is measured per tick, not per frame: no clock read per frame.
      if (this.heard) {
        this.heard = false;
        lastReceived = now;
      }
      if (now - lastReceived > peerTimeout) {
        this.end(new LeaderLost(`no frame from the leader for ${now - lastReceived} ms`));
        return;
      }
      if (this.socket.writableLength === 0) writeProgress = now;
      else if (now - writeProgress > peerTimeout) {
        this.end(new LeaderLost(`the leader accepted no bytes for ${now - writeProgress} ms`));
        return;
      }
      // The tick nearest the ping's time sends it (a timer may fire a
      // millisecond early by Date.now()).
      if (nextPing - now < interval / 2) {
        nextPing = now + heartbeat;
        nonce += 1;
        this.send({ kind: 'Ping', nonce });
      }
    }, interval);
    this.timer.unref();
    const early = this.early;
    this.early = [];
    for (const frame of early) {
      if (this.ended) return;
      this.deliver(frame);
    }
  }

  deliver(frame) {
    this.heard = true;
    if (!FROM_LEADER.has(frame.kind)) {
      const error = new ProtocolError(`protocol violation: a leader may not send ${frame.kind} now`, {
        code: 'unexpected',
      });
      this.end(new LeaderLost(error.message, { cause: error }));
      return;
    }
    if (frame.kind === 'Ping') {
      this.send({ kind: 'Pong', nonce: frame.nonce });
      return;
    }
    if (frame.kind === 'Pong') return;
    if (frame.kind === 'Goodbye') {
      this.end(new LeaderLost(`the leader said goodbye: ${frame.reason}`));
      return;
    }
    this.onFrame(frame);
  }

  /** Queues a frame; frames queued in one turn of the event loop are written together. */
  send(frame) {
    if (this.ended) return;
    this.out.push(encodeFrame(frame));
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(this.flush);
    }
  }

  /** Queues an already encoded frame (see `codec.encodeFrame`). */
  sendEncoded(bytes) {
    if (this.ended) return;
    this.out.push(bytes);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(this.flush);
    }
  }

  flush() {
    this.flushScheduled = false;
    if (this.ended || this.out.length === 0) return;
    const out = this.out;
    this.out = [];
    this.socket.write(out.length === 1 ? out[0] : Buffer.concat(out));
  }

  /** Ends the link once, with why; `onEnd` is told. */
  end(reason) {
    if (this.ended) return;
    this.ended = true;
    // Before `start` (bad bytes in the same read as the Welcome, say) nobody
    // listens yet: `start` reports it.
    this.endReason = reason;
    clearInterval(this.timer);
    this.out = [];
    this.socket.destroy();
    if (this.onEnd) this.onEnd(reason);
  }

  /**
   * Says Goodbye, flushes, and closes; resolves once the Goodbye and the end
   * of the stream are written (the socket is then destroyed: the leader's own
   * close is not waited for, as the Rust follower), or after `grace` ms.
   */
  close(reason, grace) {
    if (this.ended) return Promise.resolve();
    this.send({ kind: 'Goodbye', reason });
    this.ended = true;
    clearInterval(this.timer);
    const out = this.out;
    this.out = [];
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.socket.destroy();
        resolve();
      }, grace);
      timer.unref();
      const done = () => {
        clearTimeout(timer);
        this.socket.destroy();
        resolve();
      };
      this.socket.once('finish', done);
      this.socket.once('close', done);
      this.socket.end(out.length ? Buffer.concat(out) : undefined);
    });
  }
}

module.exports = { Link };
