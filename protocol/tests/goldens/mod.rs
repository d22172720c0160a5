//! The golden frames: each frame kind's value and its exact bytes, spelled out
//! by hand (and cross-checked against an independent MessagePack
//! implementation), never computed by the code under test.
//!
//! The single source of the wire vectors: `protocol/tests/golden.rs` checks
//! that each encodes and decodes to its bytes, and the conformance kit
//! (`conformance/tests/vectors.rs`) includes this file to write
//! `conformance/vectors.json` and to check every hex example of `PROTOCOL.md`.
//! Change a golden only together with `PROTOCOL_VERSION` and `PROTOCOL.md`.
// Each including crate uses a different part of the table.
#![allow(dead_code)]

use bytes::Bytes;
use tandem_protocol::uuid::Uuid;
use tandem_protocol::{
    Ack, ChannelStatus, ErrorCode, Event, Frame, Hello, Invoke, Position, Publish, Reject, RemoteError, Response,
    Subscribe, Unsubscribe, UpstreamState, Welcome,
};

/// One golden frame: its name (stable, snake_case), its value and its bytes
/// (hex digits, whitespace ignored, the length prefix included).
#[derive(Debug, Clone)]
pub struct Golden {
    pub name: &'static str,
    pub frame: Frame,
    pub hex: String,
}

fn golden(name: &'static str, frame: Frame, hex: &str) -> Golden {
    Golden { name, frame, hex: hex.to_string() }
}

/// Every golden frame a writer produces: encoding `frame` gives exactly `hex`,
/// and decoding `hex` gives `frame`.
pub fn all() -> Vec<Golden> {
    vec![
        golden("hello", hello(), HELLO),
        golden("hello_without_token", hello_without_token(), HELLO_WITHOUT_TOKEN),
        golden("welcome", welcome(), WELCOME),
        golden("reject", reject(), REJECT),
        golden("invoke", invoke(), INVOKE),
        golden("invoke_oneway", invoke_oneway(), INVOKE_ONEWAY),
        golden("response_ok", response_ok(), RESPONSE_OK),
        golden("response_err", response_err(), RESPONSE_ERR),
        golden("cancel", cancel(), CANCEL),
        golden("subscribe_with_last_seen", subscribe_resuming(), SUBSCRIBE_RESUMING),
        golden("subscribe_without_last_seen", subscribe_fresh(), SUBSCRIBE_FRESH),
        golden("unsubscribe", unsubscribe(), UNSUBSCRIBE),
        golden("event", event(), EVENT),
        golden("event_cached", cached_event(), CACHED_EVENT),
        golden("publish", publish(), PUBLISH),
        golden("ack_ok", ack_ok(), ACK_OK),
        golden("ack_err", ack_err(), ACK_ERR),
        golden("status_starting", status(UpstreamState::Starting), STATUS_STARTING),
        golden("status_ready", status(UpstreamState::Ready), STATUS_READY),
        golden("status_down", status_down(), STATUS_DOWN),
        golden("ping", Frame::Ping(7), PING),
        golden("ping_u32", Frame::Ping(0xdead_beef), PING_U32),
        golden("pong", Frame::Pong(u64::MAX), PONG),
        golden("goodbye", goodbye(), GOODBYE),
        golden("open", open(), OPEN),
        golden("ended", ended(), ENDED),
        golden("subscribe_one", subscribe_one(), SUBSCRIBE_ONE),
        golden("delivery", delivery(false), DELIVERY),
        golden("delivery_redelivered", delivery(true), DELIVERY_REDELIVERED),
        golden("settle", settle(), SETTLE),
        golden("mirror", mirror(), MIRROR),
        golden("mirrored_snapshot", mirrored_snapshot(), MIRRORED_SNAPSHOT),
        golden("mirrored_update", mirrored_update(), MIRRORED_UPDATE),
    ]
}

/// Frames a reader must accept though a writer never produces these bytes:
/// decoding `hex` gives `frame` (encoding `frame` gives other bytes).
pub fn decode_only() -> Vec<Golden> {
    let live_false = CACHED_EVENT.strip_suffix("c3").expect("the cached golden ends with true");
    vec![
        Golden { name: "event_cached_false", frame: event(), hex: format!("{live_false}c2") },
        golden(
            "response_err_unknown_kind",
            Frame::Response(Response { id: 9, result: Err(RemoteError::internal("x")) }),
            RESPONSE_ERR_UNKNOWN_KIND,
        ),
    ]
}

pub const UUID_A: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
pub const UUID_B: [u8; 16] =
    [0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0];

/// The key `"db.url"` as a payload: MessagePack fixstr, a6 "db.url".
pub const KEY: &[u8] = b"\xa6db.url";

// ---------------------------------------------------------------- Hello

pub fn hello() -> Frame {
    Frame::Hello(Hello {
        version: 1,
        peer_id: Uuid::from_bytes(UUID_A),
        pid: 4242,
        channels: vec!["config".into(), "registry".into()],
        token: Some("s3cret".into()),
    })
}

pub const HELLO: &str = concat!(
    "00000036",                               // body length 54
    "81 a5 48656c6c6f",                       // map(1) { str "Hello":
    "95",                                     //   array(5)
    "01",                                     //   version 1
    "c4 10 00112233445566778899aabbccddeeff", //   peer_id: bin 16
    "cd 1092",                                //   pid 4242 (uint16)
    "92 a6 636f6e666967 a8 7265676973747279", //   channels ["config", "registry"]
    "a6 733363726574",                        //   token Some("s3cret") }
);

pub fn hello_without_token() -> Frame {
    Frame::Hello(Hello { version: 1, peer_id: Uuid::from_bytes(UUID_A), pid: 4242, channels: vec![], token: None })
}

pub const HELLO_WITHOUT_TOKEN: &str = concat!(
    "00000020",                               // body length 32
    "81 a5 48656c6c6f 95",                    // {"Hello": [
    "01",                                     //   version 1
    "c4 10 00112233445566778899aabbccddeeff", //   peer_id
    "cd 1092",                                //   pid 4242
    "90",                                     //   channels []
    "c0",                                     //   token None: nil ]}
);

// ---------------------------------------------------------------- Welcome

pub fn welcome() -> Frame {
    Frame::Welcome(Welcome { version: 1, leader_id: Uuid::from_bytes(UUID_B), epoch: 3, pid: 100, heartbeat_ms: 5000 })
}

pub const WELCOME: &str = concat!(
    "00000022",                               // body length 34
    "81 a7 57656c636f6d65 95",                // {"Welcome": [
    "01",                                     //   version 1
    "c4 10 0f1e2d3c4b5a69788796a5b4c3d2e1f0", //   leader_id: bin 16
    "03",                                     //   epoch 3
    "64",                                     //   pid 100 (positive fixint)
    "cd 1388",                                //   heartbeat_ms 5000 ]}
);

// ---------------------------------------------------------------- Reject

pub fn reject() -> Frame {
    Frame::Reject(Reject {
        version: 1,
        error: RemoteError::rejected("missing or wrong token").with_code(ErrorCode::TOKEN),
    })
}

pub const REJECT: &str = concat!(
    "00000031",                                        // body length 49
    "81 a6 52656a656374 92",                           // {"Reject": [
    "01",                                              //   version 1
    "93",                                              //   error: array(3) [
    "a8 52656a6563746564",                             //     kind "Rejected"
    "a5 746f6b656e",                                   //     code "token"
    "b6 6d697373696e67206f722077726f6e6720746f6b656e", //     message "missing or wrong token" ]]}
);

// ---------------------------------------------------------------- Invoke

pub fn invoke() -> Frame {
    Frame::Invoke(Invoke {
        id: 1,
        channel: "config".into(),
        deadline_ms: 3000,
        oneway: false,
        payload: Bytes::from_static(b"\xa3get"),
    })
}

pub const INVOKE: &str = concat!(
    "0000001b",              // body length 27
    "81 a6 496e766f6b65 95", // {"Invoke": [
    "01",                    //   id 1
    "a6 636f6e666967",       //   channel "config"
    "cd 0bb8",               //   deadline_ms 3000
    "c2",                    //   oneway false
    "c4 04 a3676574",        //   payload: bin 4 holding the MessagePack string "get" ]}
);

pub fn invoke_oneway() -> Frame {
    Frame::Invoke(Invoke { id: 1 << 32, channel: "config".into(), deadline_ms: 0, oneway: true, payload: Bytes::new() })
}

pub const INVOKE_ONEWAY: &str = concat!(
    "0000001d",              // body length 29
    "81 a6 496e766f6b65 95", // {"Invoke": [
    "cf 0000000100000000",   //   id 2^32 (uint64)
    "a6 636f6e666967",       //   channel "config"
    "00",                    //   deadline_ms 0
    "c3",                    //   oneway true
    "c4 00",                 //   payload: empty bin ]}
);

// ---------------------------------------------------------------- Response

pub fn response_ok() -> Frame {
    Frame::Response(Response { id: 1, result: Ok(Bytes::from_static(b"\x2a")) })
}

pub const RESPONSE_OK: &str = concat!(
    "00000013",                  // body length 19
    "81 a8 526573706f6e7365 92", // {"Response": [
    "01",                        //   id 1
    "81 a2 4f6b",                //   result: {"Ok":
    "c4 01 2a",                  //     bin 1 holding the MessagePack integer 42 } ]}
);

pub fn response_err() -> Frame {
    Frame::Response(Response { id: 2, result: Err(RemoteError::deadline_exceeded("deadline exceeded")) })
}

pub const RESPONSE_ERR: &str = concat!(
    "00000036",                              // body length 54
    "81 a8 526573706f6e7365 92",             // {"Response": [
    "02",                                    //   id 2
    "81 a3 457272",                          //   result: {"Err":
    "93",                                    //     array(3) [
    "b0 446561646c696e654578636565646564",   //       kind "DeadlineExceeded"
    "a0",                                    //       code ""
    "b1 646561646c696e65206578636565646564", //       message "deadline exceeded" ]}]}
);

// ---------------------------------------------------------------- Cancel

pub fn cancel() -> Frame {
    Frame::Cancel(300)
}

pub const CANCEL: &str = concat!(
    "0000000b",           // body length 11
    "81 a6 43616e63656c", // {"Cancel":
    "cd 012c",            //   300 }  (a newtype variant: the bare id, no array)
);

// ---------------------------------------------------------------- Subscribe

pub fn subscribe_resuming() -> Frame {
    Frame::Subscribe(Subscribe {
        id: 5,
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        last_seen: Some(Position { epoch: 2, seq: 7 }),
    })
}

pub const SUBSCRIBE_RESUMING: &str = concat!(
    "00000020",                    // body length 32
    "81 a9 537562736372696265 94", // {"Subscribe": [
    "05",                          //   id 5
    "a6 636f6e666967",             //   channel "config"
    "c4 07 a664622e75726c",        //   key: bin 7 holding the MessagePack string "db.url"
    "92 02 07",                    //   last_seen Some(Position [epoch 2, seq 7]) ]}
);

pub fn subscribe_fresh() -> Frame {
    Frame::Subscribe(Subscribe { id: 6, channel: "config".into(), key: Bytes::from_static(KEY), last_seen: None })
}

pub const SUBSCRIBE_FRESH: &str = concat!(
    "0000001e",                    // body length 30
    "81 a9 537562736372696265 94", // {"Subscribe": [
    "06",                          //   id 6
    "a6 636f6e666967",             //   channel "config"
    "c4 07 a664622e75726c",        //   key
    "c0",                          //   last_seen None: nil ]}
);

// ---------------------------------------------------------------- Unsubscribe

pub fn unsubscribe() -> Frame {
    Frame::Unsubscribe(Unsubscribe { id: 7, channel: "config".into(), key: Bytes::from_static(KEY) })
}

pub const UNSUBSCRIBE: &str = concat!(
    "0000001f",                        // body length 31
    "81 ab 556e737562736372696265 93", // {"Unsubscribe": [
    "07",                              //   id 7
    "a6 636f6e666967",                 //   channel "config"
    "c4 07 a664622e75726c",            //   key ]}
);

// ---------------------------------------------------------------- Event

pub fn event() -> Frame {
    Frame::Event(Event {
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        epoch: 2,
        seq: 8,
        payload: Bytes::from_static(b"\xadpostgres://db"),
        cached: false,
    })
}

pub const EVENT: &str = concat!(
    "0000002a",                           // body length 42
    "81 a5 4576656e74 95",                // {"Event": [
    "a6 636f6e666967",                    //   channel "config"
    "c4 07 a664622e75726c",               //   key
    "02",                                 //   epoch 2
    "08",                                 //   seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //   payload: the MessagePack string "postgres://db" ]}
);

pub fn cached_event() -> Frame {
    match event() {
        Frame::Event(event) => Frame::Event(Event { cached: true, ..event }),
        other => other,
    }
}

/// A value served from the leader's last-known-good cache: the optional 6th element, `true`.
pub const CACHED_EVENT: &str = concat!(
    "0000002b",                           // body length 43
    "81 a5 4576656e74 96",                // {"Event": [ (6 elements)
    "a6 636f6e666967",                    //   channel "config"
    "c4 07 a664622e75726c",               //   key
    "02",                                 //   epoch 2
    "08",                                 //   seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //   payload
    "c3",                                 //   cached: true ]}
);

// ---------------------------------------------------------------- Publish

pub fn publish() -> Frame {
    Frame::Publish(Publish { id: 8, channel: "registry".into(), payload: Bytes::from_static(b"\x92\xa3svc\x50") })
}

pub const PUBLISH: &str = concat!(
    "0000001c",                // body length 28
    "81 a7 5075626c697368 93", // {"Publish": [
    "08",                      //   id 8
    "a8 7265676973747279",     //   channel "registry"
    "c4 06 92a373766350",      //   payload: the MessagePack array ["svc", 80] ]}
);

// ---------------------------------------------------------------- Ack

pub fn ack_ok() -> Frame {
    Frame::Ack(Ack { id: 5, result: Ok(()) })
}

pub const ACK_OK: &str = concat!(
    "0000000c",        // body length 12
    "81 a3 41636b 92", // {"Ack": [
    "05",              //   id 5
    "81 a2 4f6b c0",   //   result: {"Ok": nil} ]}
);

pub fn ack_err() -> Frame {
    Frame::Ack(Ack {
        id: 8,
        result: Err(RemoteError::upstream("registry refused").with_code(ErrorCode::upstream("503"))),
    })
}

pub const ACK_ERR: &str = concat!(
    "0000002b",                            // body length 43
    "81 a3 41636b 92",                     // {"Ack": [
    "08",                                  //   id 8
    "81 a3 457272 93",                     //   result: {"Err": [
    "a8 557073747265616d",                 //     kind "Upstream"
    "a3 353033",                           //     code "503"
    "b0 72656769737472792072656675736564", //     message "registry refused" ]}]}
);

// ---------------------------------------------------------------- Status

pub fn status(state: UpstreamState) -> Frame {
    Frame::Status(ChannelStatus { channel: "config".into(), state })
}

pub const STATUS_STARTING: &str = concat!(
    "00000019",              // body length 25
    "81 a6 537461747573 92", // {"Status": [
    "a6 636f6e666967",       //   channel "config"
    "a8 5374617274696e67",   //   state: unit variant, the bare string "Starting" ]}
);

pub const STATUS_READY: &str = concat!(
    "00000016",              // body length 22
    "81 a6 537461747573 92", // {"Status": [
    "a6 636f6e666967",       //   channel "config"
    "a5 5265616479",         //   state "Ready" ]}
);

pub const STATUS_DOWN: &str = concat!(
    "0000003e",                                // body length 62
    "81 a6 537461747573 92",                   // {"Status": [
    "a6 636f6e666967",                         //   channel "config"
    "81 a4 446f776e",                          //   state: {"Down":
    "93",                                      //     RemoteError [
    "ab 556e617661696c61626c65",               //       kind "Unavailable"
    "a7 636f6e6e656374",                       //       code "connect"
    "b2 636f6e6e656374696f6e2072656675736564", //       message "connection refused" ]}]}
);

pub fn status_down() -> Frame {
    status(UpstreamState::Down(
        RemoteError::unavailable("connection refused").with_code(ErrorCode::upstream("connect")),
    ))
}

// ---------------------------------------------------------------- Ping, Pong, Goodbye

pub const PING: &str = concat!(
    "00000007",       // body length 7
    "81 a4 50696e67", // {"Ping":
    "07",             //   7 }
);

pub const PING_U32: &str = concat!(
    "0000000b",       // body length 11
    "81 a4 50696e67", // {"Ping":
    "ce deadbeef",    //   0xdeadbeef (uint32) }
);

pub const PONG: &str = concat!(
    "0000000f",            // body length 15
    "81 a4 506f6e67",      // {"Pong":
    "cf ffffffffffffffff", //   u64::MAX (uint64) }
);

pub const GOODBYE: &str = concat!(
    "00000017",                      // body length 23
    "81 a7 476f6f64627965",          // {"Goodbye":
    "ad 7368757474696e6720646f776e", //   "shutting down" }
);

pub fn goodbye() -> Frame {
    Frame::Goodbye("shutting down".into())
}

// ---------------------------------------------------------------- Open

pub const OPEN: &str = concat!(
    "0000000d",         // body length 13
    "81 a4 4f70656e",   // {"Open":
    "91 a5 666c616773", //   ["flags"] }
);

pub fn open() -> Frame {
    Frame::Open(vec!["flags".into()])
}

// ---------------------------------------------------------------- Ended

pub fn ended() -> Frame {
    Frame::Ended(tandem_protocol::Ended {
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        error: RemoteError::rejected("no").with_code(ErrorCode::upstream("limit")),
    })
}

pub const ENDED: &str = concat!(
    "0000002b",               // body length 43
    "81 a5 456e646564 93",    // {"Ended": [
    "a6 636f6e666967",        //   channel "config"
    "c4 07 a664622e75726c",   //   key
    "93 a8 52656a6563746564", //   error: [kind "Rejected",
    "a5 6c696d6974 a2 6e6f",  //     code "limit", message "no"] ]}
);

// ---------------------------------------------------------------- SubscribeOne (version 2)

pub fn subscribe_one() -> Frame {
    Frame::SubscribeOne(tandem_protocol::SubscribeOne {
        id: 9,
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        window: 64,
        ack_timeout_ms: 30_000,
    })
}

pub const SUBSCRIBE_ONE: &str = concat!(
    "00000024",                          // body length 36
    "81 ac 5375627363726962654f6e65 95", // {"SubscribeOne": [
    "09",                                //   id 9
    "a6 636f6e666967",                   //   channel "config"
    "c4 07 a664622e75726c",              //   key
    "40",                                //   window 64
    "cd 7530",                           //   ack_timeout_ms 30000 ]}
);

// ---------------------------------------------------------------- Delivery (version 2)

pub fn delivery(redelivered: bool) -> Frame {
    Frame::Delivery(tandem_protocol::Delivery {
        sub: 9,
        tag: 3,
        epoch: 2,
        seq: 8,
        payload: Bytes::from_static(b"\xadpostgres://db"),
        redelivered,
    })
}

pub const DELIVERY: &str = concat!(
    "00000020",                           // body length 32
    "81 a8 44656c6976657279 96",          // {"Delivery": [
    "09",                                 //   sub 9
    "03",                                 //   tag 3
    "02",                                 //   epoch 2
    "08",                                 //   seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //   payload: the MessagePack string "postgres://db"
    "c2",                                 //   redelivered false ]}
);

pub const DELIVERY_REDELIVERED: &str = concat!(
    "00000020",                           // body length 32
    "81 a8 44656c6976657279 96",          // {"Delivery": [
    "09",                                 //   sub 9
    "03",                                 //   tag 3
    "02",                                 //   epoch 2
    "08",                                 //   seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //   payload
    "c3",                                 //   redelivered true ]}
);

// ---------------------------------------------------------------- Settle (version 2)

pub fn settle() -> Frame {
    Frame::Settle(tandem_protocol::Settle { sub: 9, acked: vec![3, 4], released: vec![5] })
}

pub const SETTLE: &str = concat!(
    "0000000f",              // body length 15
    "81 a6 536574746c65 93", // {"Settle": [
    "09",                    //   sub 9
    "92 03 04",              //   acked [3, 4]
    "91 05",                 //   released [5] ]}
);

// ---------------------------------------------------------------- Mirror (version 3)

pub fn mirror() -> Frame {
    Frame::Mirror(11)
}

pub const MIRROR: &str = concat!(
    "00000009",           // body length 9
    "81 a6 4d6972726f72", // {"Mirror":
    "0b",                 //   id 11 }
);

// ---------------------------------------------------------------- Mirrored (version 3)

/// The key `"db.old"` as a payload: MessagePack fixstr, a6 "db.old".
pub const OLD_KEY: &[u8] = b"\xa6db.old";

fn mirror_entry(revision: Option<u64>) -> tandem_protocol::MirrorEntry {
    tandem_protocol::MirrorEntry {
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        epoch: 2,
        seq: 8,
        payload: Bytes::from_static(b"\xadpostgres://db"),
        revision,
    }
}

/// A snapshot batch that is not the last one, its value without a resume point.
pub fn mirrored_snapshot() -> Frame {
    Frame::Mirrored(tandem_protocol::Mirrored { entries: vec![mirror_entry(None)], removed: vec![], synced: false })
}

pub const MIRRORED_SNAPSHOT: &str = concat!(
    "00000032",                           // body length 50
    "81 a8 4d6972726f726564 93",          // {"Mirrored": [
    "91 96",                              //   entries [ [
    "a6 636f6e666967",                    //     channel "config"
    "c4 07 a664622e75726c",               //     key
    "02",                                 //     epoch 2
    "08",                                 //     seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //     payload: the MessagePack string "postgres://db"
    "c0",                                 //     revision nil ] ]
    "90",                                 //   removed []
    "c2",                                 //   synced false ]}
);

/// An update: a new value with its revision, and a key no longer followed.
pub fn mirrored_update() -> Frame {
    Frame::Mirrored(tandem_protocol::Mirrored {
        entries: vec![mirror_entry(Some(42))],
        removed: vec![tandem_protocol::MirrorKey { channel: "config".into(), key: Bytes::from_static(OLD_KEY) }],
        synced: true,
    })
}

pub const MIRRORED_UPDATE: &str = concat!(
    "00000043",                           // body length 67
    "81 a8 4d6972726f726564 93",          // {"Mirrored": [
    "91 96",                              //   entries [ [
    "a6 636f6e666967",                    //     channel "config"
    "c4 07 a664622e75726c",               //     key
    "02",                                 //     epoch 2
    "08",                                 //     seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //     payload
    "2a",                                 //     revision 42 ] ]
    "91 92",                              //   removed [ [
    "a6 636f6e666967",                    //     channel "config"
    "c4 07 a664622e6f6c64",               //     key "db.old" ] ]
    "c3",                                 //   synced true ]}
);

/// A newer leader answers with an error kind this build does not know: it decodes as `Internal`.
pub const RESPONSE_ERR_UNKNOWN_KIND: &str = concat!(
    "0000001e",                  // body length 30
    "81 a8 526573706f6e7365 92", // {"Response": [
    "09",                        //   id 9
    "81 a3 457272 93",           //   result: {"Err": [
    "a8 4f7665726c6f6164",       //     kind "Overload" (unknown here)
    "a0",                        //     code ""
    "a1 78",                     //     message "x" ]}]}
);
