// The `tandem run` demo for Node.js: every worker follows `app.greeting`
// through the agent's Leader (ONE registry connection for all of them), prints
// each value it receives, and serves the latest over HTTP on the shared port.
//
//   (cd clients/node && npm ci)      # once: the follower's one dependency
//   tandem run --workers 2 --listen 127.0.0.1:8080 --subscribe app.greeting \
//     --put app.greeting=hello -- node clients/node/examples/greeting.js
//   curl localhost:8080/                       # hello (x-worker-id: 1 or 2)
//   curl -X PUT --data hi localhost:8080/      # both workers print value=hi
//
// What tandem hands this process (docs/run.md): the port as fd 3 (LISTEN_FDS,
// LISTEN_PID), the Leader's socket and token (TANDEM_LEADER_SOCKET,
// TANDEM_TOKEN, read by `connect`), TANDEM_WORKER_ID, TANDEM_SUBSCRIBE, and
// where to say it is ready: Node cannot send the Unix datagram of
// NOTIFY_SOCKET, so it writes `READY=1` to TANDEM_NOTIFY_STREAM instead.
'use strict';

const http = require('node:http');
const net = require('node:net');
const { connect } = require('..');

const worker = process.env.TANDEM_WORKER_ID || '?';
const key = (process.env.TANDEM_SUBSCRIBE || 'app.greeting').split(',')[0];

/** Tells tandem this worker serves: its successor in a reload waits for this. */
function ready() {
  const path = process.env.TANDEM_NOTIFY_STREAM;
  if (!path) return Promise.resolve();
  return new Promise((resolve, reject) => {
    net.connect(path).on('error', reject).end('READY=1\n', resolve);
  });
}

async function main() {
  if (process.env.LISTEN_PID !== String(process.pid) || Number(process.env.LISTEN_FDS) < 1) {
    throw new Error('run me under `tandem run --listen ...`: no listening socket was passed (LISTEN_FDS)');
  }
  const client = await connect({ channels: ['config'] });
  const subscription = client.subscribe('config', key);
  await subscription.ready;
  let greeting = null;
  (async () => {
    // Each value the Leader delivers: [value or null, revision].
    for await (const update of subscription) {
      greeting = update.value[0];
      console.log(`worker=${worker} pid=${process.pid} key=${key} value=${greeting} epoch=${update.epoch} seq=${update.seq}`);
    }
  })().catch((error) => console.error(`worker=${worker}: subscription ended: ${error.message}`));

  let draining = false;
  const server = http.createServer((req, res) => {
    res.setHeader('x-worker-id', worker);
    // Stopping: each keep-alive connection gets one more answer, which closes it.
    if (draining) res.setHeader('connection', 'close');
    res.setHeader('x-worker-pid', String(process.pid));
    if (req.method === 'PUT') {
      let body = '';
      req.on('data', (chunk) => { body += chunk; });
      req.on('end', () => {
        client.invoke('config', { Put: [key, body] }).then(
          () => res.end(`${key}=${body}\n`),
          (error) => { res.statusCode = 502; res.end(`${error.message}\n`); },
        );
      });
      return;
    }
    res.end(`${greeting === null ? '(no value)' : greeting}\n`);
  });
  server.listen({ fd: 3 }, () => ready().catch((error) => console.error(`ready: ${error.message}`)));

  process.on('SIGTERM', () => {
    // Stop accepting but keep the open connections (http.Server#close would
    // close the idle keep-alive ones, racing a request sent on one); leave once
    // each has closed after its last answer, or after 4 s.
    draining = true;
    const leave = () => client.close().finally(() => process.exit(0));
    net.Server.prototype.close.call(server, leave);
    setTimeout(leave, 4000).unref();
  });
}

main().catch((error) => {
  console.error(`worker=${worker}: ${error.message}`);
  process.exit(1);
});
