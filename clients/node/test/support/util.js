'use strict';
// Small helpers for tests: bounded waits (no sleeps), reading a subscription.

const { once } = require('node:events');

/** `promise`, or a rejection naming `what` after `ms`. */
function within(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** The next value of a subscription, within `ms`. */
async function nextValue(sub, ms = 10000) {
  const { value, done } = await within(sub.next(), ms, 'a subscription value');
  if (done) throw new Error('the subscription ended');
  return value;
}

/** Reads values until one satisfies `predicate`; returns all read, in order. */
async function readUntil(sub, predicate, ms = 15000) {
  const deadline = Date.now() + ms;
  const seen = [];
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`no matching value within ${ms} ms; saw ${JSON.stringify(seen, big)}`);
    const update = await nextValue(sub, left);
    seen.push(update);
    if (predicate(update)) return seen;
  }
}

/** Waits for `client` to emit `event` with arguments satisfying `predicate`. */
async function waitEvent(emitter, event, predicate = () => true, ms = 15000) {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), ms);
  try {
    for (;;) {
      const args = await once(emitter, event, { signal: ac.signal });
      if (predicate(...args)) return args;
    }
  } catch (error) {
    if (ac.signal.aborted) throw new Error(`no '${event}' event within ${ms} ms`);
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

function big(_, v) {
  return typeof v === 'bigint' ? `${v}n` : v;
}

module.exports = { within, nextValue, readUntil, waitEvent };
