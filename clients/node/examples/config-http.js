// The Node.js side of `bench/run-node-http.sh`: the anchor's config service
// worker (../shared/anchors/node-http/app.js: GET /config/<key> from an
// in-memory map, an x-worker-pid header), taking its port from `tandem run`
// (fd 3) instead of listening itself, and saying READY=1 on
// TANDEM_NOTIFY_STREAM once it serves.
//
//   tandem run --workers 2 --listen 127.0.0.1:8080 -- node clients/node/examples/config-http.js
//   wrk -t1 -c32 -d10s http://127.0.0.1:8080/config/app.greeting
'use strict';

const http = require('node:http');
const net = require('node:net');

const cfg = { 'app.greeting': 'hello' };
let draining = false;
const server = http.createServer((req, res) => {
  const key = decodeURIComponent(req.url.replace(/^\/config\//, ''));
  const v = cfg[key];
  res.setHeader('x-worker-pid', String(process.pid));
  // Stopping: each keep-alive connection gets one more answer, which closes it.
  if (draining) res.setHeader('connection', 'close');
  if (v === undefined) { res.statusCode = 404; res.end('absent\n'); return; }
  res.end(v + '\n');
});
server.listen({ fd: 3 }, () => {
  const path = process.env.TANDEM_NOTIFY_STREAM;
  if (path) net.connect(path).end('READY=1\n');
});
process.on('SIGTERM', () => {
  // Stop accepting (the socket stays open in tandem's master and the other
  // workers), but keep the open connections: http.Server#close would close the
  // idle keep-alive ones, racing a request a client is sending on one. Exit
  // once every connection has closed after its last answer, or after 4 s.
  draining = true;
  net.Server.prototype.close.call(server, () => process.exit(0));
  setTimeout(() => process.exit(0), 4000).unref();
});
