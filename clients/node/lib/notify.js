'use strict';
// ready(): tells the supervisor that this program is ready to serve, as
// systemd's sd_notify(0, "READY=1") does. Under `tandem run` (docs/run.md,
// "Readiness") the worker gives the program two sockets: NOTIFY_SOCKET (a
// Unix datagram socket, systemd's) and TANDEM_NOTIFY_STREAM (the same lines
// over a Unix stream socket). Node.js cannot send Unix datagrams, so this
// writes `READY=1\n` to TANDEM_NOTIFY_STREAM.
//
//   const { ready } = require('tandem-follower');
//   server.listen({ fd: 3 }, async () => { await ready(); });
//
// Resolves with how it was sent:
//   'stream'      written to TANDEM_NOTIFY_STREAM (under `tandem run`);
//   'none'        neither variable is set: not supervised, nothing to do;
//   'unsupported' only NOTIFY_SOCKET is set (systemd): Node.js cannot send
//                 its datagram; nothing was sent (use `systemd-notify --ready`
//                 with NotifyAccess=all, or run under `tandem run`).
// Rejects (with the socket's error) when the stream socket cannot be written.

const net = require('node:net');

/** How long the stream socket may take to take the line, in ms. */
const READY_TIMEOUT_MS = 5000;

/**
 * @param {{ env?: Record<string, string | undefined> }} [options] the environment to read (default `process.env`)
 * @returns {Promise<'stream' | 'datagram' | 'none' | 'unsupported'>}
 */
function ready(options = {}) {
  const env = options.env || process.env;
  const stream = env.TANDEM_NOTIFY_STREAM;
  if (!stream) return Promise.resolve(env.NOTIFY_SOCKET ? 'unsupported' : 'none');
  return new Promise((resolve, reject) => {
    const socket = net.connect(stream);
    socket.setTimeout(READY_TIMEOUT_MS, () => {
      socket.destroy(new Error(`TANDEM_NOTIFY_STREAM ${stream}: no answer within ${READY_TIMEOUT_MS} ms`));
    });
    socket.on('error', reject);
    socket.on('close', (hadError) => {
      if (!hadError) resolve('stream');
    });
    socket.end('READY=1\n');
  });
}

module.exports = { ready, READY_TIMEOUT_MS };
