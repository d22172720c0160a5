'use strict';
// Where one call's time goes, in each follower of bench.js: preload it with
//   SPLIT_OUT=/tmp/split.jsonl NODE_OPTIONS="--require $PWD/clients/node/bench/split.js" \
//     node clients/node/bench/bench.js --n 4 --duration 4
// Each follower process times its calls made while no other call is in flight
// (the concurrency-1 phase): invoke -> the flush that writes the frame, the
// socket write itself, write -> the answer's bytes reaching JavaScript (the
// Leader and the scheduling of both processes), bytes -> the resumed caller.
// At exit it appends one JSON line per follower (medians and means, us) to
// SPLIT_OUT. It wraps the client's methods from outside; the library is unchanged.

const OUT = process.env.SPLIT_OUT;
if (OUT && process.send) {
  const fs = require('node:fs');
  const { Link } = require('../lib/link');
  const { FrameReader } = require('../lib/frame');
  const { Client } = require('../lib/client');
  const now = () => Number(process.hrtime.bigint());
  let inFlight = 0;
  let alone = true;
  let tInvoke = 0;
  let tFlush0 = 0;
  let tFlush1 = 0;
  let tData = 0;
  const rows = [];
  const invoke = Client.prototype.invoke;
  Client.prototype.invoke = function timedInvoke(...args) {
    inFlight += 1;
    alone = inFlight === 1;
    tInvoke = now();
    return invoke.apply(this, args).then((value) => {
      const tDone = now();
      inFlight -= 1;
      if (alone && tData > tFlush1 && tFlush1 > tInvoke) rows.push([tFlush0 - tInvoke, tFlush1 - tFlush0, tData - tFlush1, tDone - tData]);
      return value;
    }, (error) => {
      inFlight -= 1;
      throw error;
    });
  };
  const flush = Link.prototype.flush;
  Link.prototype.flush = function timedFlush() {
    tFlush0 = now();
    flush.call(this);
    tFlush1 = now();
  };
  const push = FrameReader.prototype.push;
  FrameReader.prototype.push = function timedPush(chunk) {
    tData = now();
    return push.call(this, chunk);
  };
  process.on('exit', () => {
    if (rows.length === 0) return;
    const names = ['js_to_write', 'write_syscall', 'write_to_answer', 'answer_to_caller'];
    const median = {};
    const mean = {};
    names.forEach((name, i) => {
      const xs = rows.map((r) => r[i]).sort((a, b) => a - b);
      median[name] = +(xs[xs.length >> 1] / 1e3).toFixed(1);
      mean[name] = +(xs.reduce((a, b) => a + b, 0) / xs.length / 1e3).toFixed(1);
    });
    fs.appendFileSync(OUT, `${JSON.stringify({ pid: process.pid, calls: rows.length, median_us: median, mean_us: mean })}\n`);
  });
}
