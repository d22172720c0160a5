'use strict';
// One follower process of the benchmark, driven by bench.js over the fork()
// IPC channel (control only, never on the measured path). The measured call
// is `config` Get of `app.bench`, whose value is the 133-byte JSON of the
// object cluster-client's benchmark returns ({ key, version, value: {4 fields} }),
// parsed back into an object as cluster-client's transcode does.

const { connect } = require('..');

const now = () => Number(process.hrtime.bigint());
let client;

function sample(arr, max = 100000) {
  if (arr.length <= max) return arr;
  const out = new Array(max);
  const step = arr.length / max;
  for (let i = 0; i < max; i++) out[i] = arr[Math.floor(i * step)];
  return out;
}

async function invokeLoop(c, durationMs) {
  const lats = [];
  let count = 0;
  let errs = 0;
  const t0 = now();
  const end = t0 + durationMs * 1e6;
  async function worker() {
    while (now() < end) {
      const s = now();
      try {
        const r = await client.invoke('config', { Get: 'app.bench' });
        const value = JSON.parse(r.Value[0]);
        if (value.key !== 'app.bench') throw new Error('bad result');
        lats.push(now() - s);
        count++;
      } catch (e) {
        errs++;
        if (errs === 1) process.send({ type: 'log', message: String(e && e.stack) });
      }
    }
  }
  await Promise.all(Array.from({ length: c }, worker));
  return { count, errs, elapsedNs: now() - t0, lats: sample(lats) };
}

process.on('message', async (m) => {
  try {
    if (m.cmd === 'connect') {
      client = await connect({ socket: m.socket, token: m.token, channels: ['config'] });
      process.send({ type: 'connected', epoch: client.epoch });
    } else if (m.cmd === 'invoke') {
      process.send({ type: 'invoke', ...(await invokeLoop(m.c, m.durationMs)) });
    } else if (m.cmd === 'rss') {
      process.send({ type: 'rss', rss: +(process.memoryUsage().rss / 1048576).toFixed(1) });
    } else if (m.cmd === 'exit') {
      await client.close();
      process.exit(0);
    }
  } catch (e) {
    process.send({ type: 'error', message: String(e && e.stack) });
  }
});
process.on('disconnect', () => process.exit(0));
