'use strict';
// What can go wrong for a caller. Every error is a `TandemError`; match on the
// class (`err instanceof LeaderLost`) or on `err.name`, which is the same
// string in the Python follower. Only `RemoteError` and `Rejected` crossed the
// wire (PROTOCOL.md §4.1: `{ kind, code, message }`); the others are local.

/** The base class of every error this package raises. */
class TandemError extends Error {
  constructor(message, options) {
    super(message, options && options.cause !== undefined ? { cause: options.cause } : undefined);
    this.name = new.target.name;
  }

  /** Whether retrying later may succeed. */
  get retryable() {
    return false;
  }

  /** Whether the error is a deadline expiry (here, or at the leader). */
  get timeout() {
    return false;
  }
}

/** The call's deadline passed before its answer arrived; it was cancelled at the leader. */
class DeadlineExceeded extends TandemError {
  constructor(timeoutMs) {
    super(`no answer within the ${timeoutMs} ms deadline`);
    this.timeoutMs = timeoutMs;
  }

  get retryable() {
    return true;
  }

  get timeout() {
    return true;
  }
}

/**
 * The link to the leader ended while the call was outstanding, or there is no
 * leader right now; the client is reconnecting. `cause` says why the link ended
 * (a `ProtocolError` for bytes the leader should not have sent).
 */
class LeaderLost extends TandemError {
  constructor(message = 'the leader was lost', options) {
    super(message, options);
  }

  get retryable() {
    return true;
  }
}

/**
 * The leader refused this follower's `Hello` (PROTOCOL.md §5): `code` is
 * `token`, `version`, `channel` or `protocol`. The same `Hello` is not sent to
 * that leader again; a new leader (a new socket at the path) is tried.
 */
class Rejected extends TandemError {
  constructor({ kind = 'Rejected', code = '', message = '' } = {}) {
    super(`the leader rejected this follower: ${message}${code ? ` (${code})` : ''}`);
    this.kind = kind;
    this.code = code;
    this.reason = message;
  }
}

/**
 * The leader, or the upstream behind it, answered with an error:
 * `{ kind, code, message }` as on the wire. `kind` is one of
 * `DeadlineExceeded`, `Unavailable`, `Rejected`, `Upstream`, `BadRequest`,
 * `Cancelled`, `Internal` (an unknown kind reads as `Internal`).
 */
class RemoteError extends TandemError {
  constructor({ kind, code = '', message = '' }) {
    super(`${kind}${code ? ` (${code})` : ''}: ${message}`);
    this.kind = kind;
    this.code = code;
    this.reason = message;
  }

  get retryable() {
    return this.kind === 'DeadlineExceeded' || this.kind === 'Unavailable';
  }

  get timeout() {
    return this.kind === 'DeadlineExceeded';
  }

  /** The wire form. */
  toJSON() {
    return { kind: this.kind, code: this.code, message: this.reason };
  }
}

/**
 * The leader sent bytes that break PROTOCOL.md (a malformed, oversized or
 * truncated frame, a frame it may not send, a bad handshake). The link is
 * dropped and the client reconnects; calls outstanding on it fail with
 * `LeaderLost` whose `cause` is this error. `code`: `malformed`, `too_large`,
 * `truncated`, `unexpected`, `handshake`.
 */
class ProtocolError extends TandemError {
  constructor(message, { code = 'malformed', cause } = {}) {
    super(message, { cause });
    this.code = code;
  }
}

/** The call was cancelled by its caller (its AbortSignal fired); `cause` is the signal's reason. */
class Cancelled extends TandemError {
  constructor(options) {
    super('the call was cancelled', options);
  }
}

/** `close()` was called: the client serves no more calls. */
class Closed extends TandemError {
  constructor() {
    super('the client is closed');
  }
}

/** No leader answered within `connectTimeout` (the first `connect`). */
class NotReady extends TandemError {
  constructor(message, options) {
    super(message, options);
  }

  get retryable() {
    return true;
  }
}

/** A request or key whose frame would exceed the frame limit (`maxFrameLength`); nothing was sent. */
class TooLarge extends TandemError {
  constructor(message) {
    super(message);
  }
}

/** This client already has `maxInFlight` calls outstanding; the call was not sent. Retry later. */
class Busy extends TandemError {
  constructor(limit) {
    super(`${limit} calls are already in flight (maxInFlight)`);
    this.limit = limit;
  }

  get retryable() {
    return true;
  }
}

module.exports = {
  TandemError,
  DeadlineExceeded,
  LeaderLost,
  Rejected,
  RemoteError,
  ProtocolError,
  Cancelled,
  Closed,
  NotReady,
  TooLarge,
  Busy,
};
