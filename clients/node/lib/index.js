'use strict';
// tandem-follower: a Node.js follower of a tandem Leader (protocol/PROTOCOL.md).
//
//   const { connect } = require('tandem-follower');
//   const client = await connect({ channels: ['config'] }); // $TANDEM_LEADER_SOCKET, $TANDEM_TOKEN
//   const answer = await client.invoke('config', { Get: 'app.greeting' }, { timeout: 1000 });
//   for await (const { value, epoch, seq, source } of client.subscribe('config', 'app.greeting')) { ... }
//   await client.close();
//   await ready(); // READY=1 to `tandem run` (TANDEM_NOTIFY_STREAM); 'none' when not supervised

const { connect, Client, PROTOCOL_VERSION } = require('./client');
const errors = require('./errors');
const { DEFAULTS } = require('./config');
const codec = require('./codec');
const { FrameReader, DEFAULT_MAX_FRAME_LENGTH } = require('./frame');
const { ready } = require('./notify');

module.exports = {
  connect,
  ready,
  Client,
  PROTOCOL_VERSION,
  DEFAULTS,
  ...errors,
  // The wire layer, for tests and conformance drivers: frames <-> bytes.
  codec: {
    encodeFrame: codec.encodeFrame,
    encodeBody: codec.encodeBody,
    decodeBody: codec.decodeBody,
    encodeValue: codec.encodeValue,
    decodeValue: codec.decodeValue,
    FRAME_KINDS: codec.FRAME_KINDS,
    FrameReader,
    DEFAULT_MAX_FRAME_LENGTH,
  },
};
