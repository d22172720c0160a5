'use strict';
// A subscription: one key's values as an async iterator, each value with its
// position (epoch, seq) and source, never twice, never going back. Leaving
// the loop (`break`, `return()`) unsubscribes; the last handle of a key in
// this process sends the `Unsubscribe`.
//
// Every handle has its own queue of at most `capacity` unread values; a
// reader further behind skips the oldest (counted in `skipped`) and never
// loses the newest, like the Rust follower's `subscription_buffer`.

/**
 * One value of a subscription (the Rust follower's `Update`).
 * @typedef {{ value: unknown, epoch: number|bigint, seq: number|bigint, source: 'live'|'cache' }} Update
 */

class Subscription {
  /** @internal made by `Client.subscribe` */
  constructor(client, channel, key, capacity) {
    this.channel = channel;
    this.key = key;
    /** Values skipped because this reader fell more than the buffer behind. */
    this.skipped = 0;
    /** Why the leader ended the subscription (a `RemoteError`), once it did. */
    this.ended = null;
    this.client = client;
    this.capacity = capacity;
    this.queue = [];
    this.head = 0;
    this.done = false;
    this.failure = null;
    this.waiting = null;
    this.topic = null;
    let settle;
    /** Resolves once the leader acknowledged the subscription; rejects if it refused. */
    this.ready = new Promise((resolve, reject) => {
      settle = { resolve, reject };
    });
    // Nobody need await `ready`: a refusal also surfaces from the iterator.
    this.ready.catch(() => {});
    this.settleReady = settle;
    this.isReady = false;
  }

  /** The newest value of the key known to this process (maybe not yielded yet), or undefined. */
  latest() {
    return this.topic && this.topic.last ? this.topic.last.update : undefined;
  }

  /** @internal the leader acknowledged: `first` is the key's current value, if any. */
  acknowledged(first) {
    if (this.isReady || this.done) return;
    this.isReady = true;
    if (first) this.push(first);
    this.settleReady.resolve();
    this.wake();
  }

  /** @internal a new value. */
  push(update) {
    if (this.done) return;
    if (this.queue.length - this.head >= this.capacity) {
      this.head += 1;
      this.skipped += 1;
    }
    this.queue.push(update);
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    this.wake();
  }

  /** @internal the subscription cannot go on: iteration throws `error` once the queue is drained. */
  fail(error) {
    if (this.done) return;
    this.failure = error;
    if (!this.isReady) this.settleReady.reject(error);
    this.wake();
  }

  /** @internal ends iteration (after what is queued) without an error: the client closed. */
  finish() {
    if (this.done) return;
    this.closing = true;
    if (!this.isReady) {
      this.settleReady.reject(this.client.closedError());
    }
    this.wake();
  }

  wake() {
    const waiting = this.waiting;
    if (waiting) {
      this.waiting = null;
      waiting();
    }
  }

  async next() {
    for (;;) {
      if (this.done) return { value: undefined, done: true };
      if (this.isReady && this.head < this.queue.length) {
        const value = this.queue[this.head];
        this.queue[this.head] = undefined;
        this.head += 1;
        return { value, done: false };
      }
      if (this.failure) {
        const error = this.failure;
        this.release();
        throw error;
      }
      if (this.closing) {
        this.release();
        return { value: undefined, done: true };
      }
      await new Promise((resolve) => {
        this.waiting = resolve;
      });
    }
  }

  /** Stops the subscription (what `break` in `for await` calls). */
  async return() {
    this.release();
    return { value: undefined, done: true };
  }

  /** Stops the subscription; the same as `return()`. */
  close() {
    this.release();
  }

  release() {
    if (this.done) return;
    this.done = true;
    this.queue = [];
    this.head = 0;
    if (!this.isReady) this.settleReady.reject(this.client.closedError());
    this.client.release(this);
    this.wake();
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

module.exports = { Subscription };
