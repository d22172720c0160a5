//! Golden bytes: the wire contract, one frame kind at a time.
//!
//! Every expected byte string below is spelled out by hand (and was cross-checked
//! against an independent MessagePack implementation), never computed by the code
//! under test. If one of these tests fails, the wire format changed: that breaks
//! every peer already deployed, so change the test only together with
//! `PROTOCOL_VERSION` and `PROTOCOL.md`.

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use tandem_protocol::uuid::Uuid;
use tandem_protocol::{
    Ack, ChannelStatus, ErrorCode, ErrorKind, Event, Frame, FrameCodec, Hello, Invoke, Position, Publish, Reject,
    RemoteError, Response, Subscribe, Unsubscribe, UpstreamState, Welcome,
};
use tokio_util::codec::{Decoder, Encoder};

/// Parses hex digits, ignoring whitespace.
fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits in {s:?}");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).expect("hex digit"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Encodes `frame` and compares with `golden`; decodes `golden` and compares with `frame`.
fn assert_golden(frame: Frame, golden: &str) {
    let expected = unhex(golden);
    let body_len = u32::from_be_bytes(expected[..4].try_into().unwrap()) as usize;
    assert_eq!(body_len, expected.len() - 4, "the golden literal's own length prefix is wrong");

    let mut encoded = BytesMut::new();
    FrameCodec::new().encode(frame.clone(), &mut encoded).unwrap();
    assert_eq!(hex(&encoded), hex(&expected), "encoding of {frame:?}");

    let mut src = BytesMut::from(&expected[..]);
    let mut codec = FrameCodec::new();
    assert_eq!(codec.decode(&mut src).unwrap(), Some(frame));
    assert!(src.is_empty(), "decoding left {} bytes", src.len());
    assert_eq!(codec.decode_eof(&mut src).unwrap(), None);
}

const UUID_A: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
const UUID_B: [u8; 16] =
    [0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0];

/// The key `"db.url"` as a payload: MessagePack fixstr, a6 "db.url".
const KEY: &[u8] = b"\xa6db.url";

// ---------------------------------------------------------------- Hello

fn hello() -> Frame {
    Frame::Hello(Hello {
        version: 1,
        peer_id: Uuid::from_bytes(UUID_A),
        pid: 4242,
        channels: vec!["config".into(), "registry".into()],
        token: Some("s3cret".into()),
    })
}

const HELLO: &str = concat!(
    "00000036",                               // body length 54
    "81 a5 48656c6c6f",                       // map(1) { str "Hello":
    "95",                                     //   array(5)
    "01",                                     //   version 1
    "c4 10 00112233445566778899aabbccddeeff", //   peer_id: bin 16
    "cd 1092",                                //   pid 4242 (uint16)
    "92 a6 636f6e666967 a8 7265676973747279", //   channels ["config", "registry"]
    "a6 733363726574",                        //   token Some("s3cret") }
);

fn hello_without_token() -> Frame {
    Frame::Hello(Hello { version: 1, peer_id: Uuid::from_bytes(UUID_A), pid: 4242, channels: vec![], token: None })
}

const HELLO_WITHOUT_TOKEN: &str = concat!(
    "00000020",                               // body length 32
    "81 a5 48656c6c6f 95",                    // {"Hello": [
    "01",                                     //   version 1
    "c4 10 00112233445566778899aabbccddeeff", //   peer_id
    "cd 1092",                                //   pid 4242
    "90",                                     //   channels []
    "c0",                                     //   token None: nil ]}
);

#[test]
fn golden_hello() {
    assert_golden(hello(), HELLO);
}

#[test]
fn golden_hello_without_token() {
    assert_golden(hello_without_token(), HELLO_WITHOUT_TOKEN);
}

// ---------------------------------------------------------------- Welcome

fn welcome() -> Frame {
    Frame::Welcome(Welcome { version: 1, leader_id: Uuid::from_bytes(UUID_B), epoch: 3, pid: 100, heartbeat_ms: 5000 })
}

const WELCOME: &str = concat!(
    "00000022",                               // body length 34
    "81 a7 57656c636f6d65 95",                // {"Welcome": [
    "01",                                     //   version 1
    "c4 10 0f1e2d3c4b5a69788796a5b4c3d2e1f0", //   leader_id: bin 16
    "03",                                     //   epoch 3
    "64",                                     //   pid 100 (positive fixint)
    "cd 1388",                                //   heartbeat_ms 5000 ]}
);

#[test]
fn golden_welcome() {
    assert_golden(welcome(), WELCOME);
}

// ---------------------------------------------------------------- Reject

fn reject() -> Frame {
    Frame::Reject(Reject {
        version: 1,
        error: RemoteError::rejected("missing or wrong token").with_code(ErrorCode::TOKEN),
    })
}

const REJECT: &str = concat!(
    "00000031",                                        // body length 49
    "81 a6 52656a656374 92",                           // {"Reject": [
    "01",                                              //   version 1
    "93",                                              //   error: array(3) [
    "a8 52656a6563746564",                             //     kind "Rejected"
    "a5 746f6b656e",                                   //     code "token"
    "b6 6d697373696e67206f722077726f6e6720746f6b656e", //     message "missing or wrong token" ]]}
);

#[test]
fn golden_reject() {
    assert_golden(reject(), REJECT);
}

// ---------------------------------------------------------------- Invoke

fn invoke() -> Frame {
    Frame::Invoke(Invoke {
        id: 1,
        channel: "config".into(),
        deadline_ms: 3000,
        oneway: false,
        payload: Bytes::from_static(b"\xa3get"),
    })
}

const INVOKE: &str = concat!(
    "0000001b",              // body length 27
    "81 a6 496e766f6b65 95", // {"Invoke": [
    "01",                    //   id 1
    "a6 636f6e666967",       //   channel "config"
    "cd 0bb8",               //   deadline_ms 3000
    "c2",                    //   oneway false
    "c4 04 a3676574",        //   payload: bin 4 holding the MessagePack string "get" ]}
);

fn invoke_oneway() -> Frame {
    Frame::Invoke(Invoke { id: 1 << 32, channel: "config".into(), deadline_ms: 0, oneway: true, payload: Bytes::new() })
}

const INVOKE_ONEWAY: &str = concat!(
    "0000001d",              // body length 29
    "81 a6 496e766f6b65 95", // {"Invoke": [
    "cf 0000000100000000",   //   id 2^32 (uint64)
    "a6 636f6e666967",       //   channel "config"
    "00",                    //   deadline_ms 0
    "c3",                    //   oneway true
    "c4 00",                 //   payload: empty bin ]}
);

#[test]
fn golden_invoke() {
    assert_golden(invoke(), INVOKE);
}

#[test]
fn golden_invoke_oneway() {
    assert_golden(invoke_oneway(), INVOKE_ONEWAY);
}

// ---------------------------------------------------------------- Response

fn response_ok() -> Frame {
    Frame::Response(Response { id: 1, result: Ok(Bytes::from_static(b"\x2a")) })
}

const RESPONSE_OK: &str = concat!(
    "00000013",                  // body length 19
    "81 a8 526573706f6e7365 92", // {"Response": [
    "01",                        //   id 1
    "81 a2 4f6b",                //   result: {"Ok":
    "c4 01 2a",                  //     bin 1 holding the MessagePack integer 42 } ]}
);

fn response_err() -> Frame {
    Frame::Response(Response { id: 2, result: Err(RemoteError::deadline_exceeded("deadline exceeded")) })
}

const RESPONSE_ERR: &str = concat!(
    "00000036",                              // body length 54
    "81 a8 526573706f6e7365 92",             // {"Response": [
    "02",                                    //   id 2
    "81 a3 457272",                          //   result: {"Err":
    "93",                                    //     array(3) [
    "b0 446561646c696e654578636565646564",   //       kind "DeadlineExceeded"
    "a0",                                    //       code ""
    "b1 646561646c696e65206578636565646564", //       message "deadline exceeded" ]}]}
);

#[test]
fn golden_response_ok() {
    assert_golden(response_ok(), RESPONSE_OK);
}

#[test]
fn golden_response_err() {
    assert_golden(response_err(), RESPONSE_ERR);
}

// ---------------------------------------------------------------- Cancel

fn cancel() -> Frame {
    Frame::Cancel(300)
}

const CANCEL: &str = concat!(
    "0000000b",           // body length 11
    "81 a6 43616e63656c", // {"Cancel":
    "cd 012c",            //   300 }  (a newtype variant: the bare id, no array)
);

#[test]
fn golden_cancel() {
    assert_golden(cancel(), CANCEL);
}

// ---------------------------------------------------------------- Subscribe

fn subscribe_resuming() -> Frame {
    Frame::Subscribe(Subscribe {
        id: 5,
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        last_seen: Some(Position { epoch: 2, seq: 7 }),
    })
}

const SUBSCRIBE_RESUMING: &str = concat!(
    "00000020",                    // body length 32
    "81 a9 537562736372696265 94", // {"Subscribe": [
    "05",                          //   id 5
    "a6 636f6e666967",             //   channel "config"
    "c4 07 a664622e75726c",        //   key: bin 7 holding the MessagePack string "db.url"
    "92 02 07",                    //   last_seen Some(Position [epoch 2, seq 7]) ]}
);

fn subscribe_fresh() -> Frame {
    Frame::Subscribe(Subscribe { id: 6, channel: "config".into(), key: Bytes::from_static(KEY), last_seen: None })
}

const SUBSCRIBE_FRESH: &str = concat!(
    "0000001e",                    // body length 30
    "81 a9 537562736372696265 94", // {"Subscribe": [
    "06",                          //   id 6
    "a6 636f6e666967",             //   channel "config"
    "c4 07 a664622e75726c",        //   key
    "c0",                          //   last_seen None: nil ]}
);

#[test]
fn golden_subscribe_with_last_seen() {
    assert_golden(subscribe_resuming(), SUBSCRIBE_RESUMING);
}

#[test]
fn golden_subscribe_without_last_seen() {
    assert_golden(subscribe_fresh(), SUBSCRIBE_FRESH);
}

// ---------------------------------------------------------------- Unsubscribe

fn unsubscribe() -> Frame {
    Frame::Unsubscribe(Unsubscribe { id: 7, channel: "config".into(), key: Bytes::from_static(KEY) })
}

const UNSUBSCRIBE: &str = concat!(
    "0000001f",                        // body length 31
    "81 ab 556e737562736372696265 93", // {"Unsubscribe": [
    "07",                              //   id 7
    "a6 636f6e666967",                 //   channel "config"
    "c4 07 a664622e75726c",            //   key ]}
);

#[test]
fn golden_unsubscribe() {
    assert_golden(unsubscribe(), UNSUBSCRIBE);
}

// ---------------------------------------------------------------- Event

fn event() -> Frame {
    Frame::Event(Event {
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        epoch: 2,
        seq: 8,
        payload: Bytes::from_static(b"\xadpostgres://db"),
        cached: false,
    })
}

const EVENT: &str = concat!(
    "0000002a",                           // body length 42
    "81 a5 4576656e74 95",                // {"Event": [
    "a6 636f6e666967",                    //   channel "config"
    "c4 07 a664622e75726c",               //   key
    "02",                                 //   epoch 2
    "08",                                 //   seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //   payload: the MessagePack string "postgres://db" ]}
);

#[test]
fn golden_event() {
    assert_golden(event(), EVENT);
}

fn cached_event() -> Frame {
    match event() {
        Frame::Event(event) => Frame::Event(Event { cached: true, ..event }),
        other => other,
    }
}

/// A value served from the leader's last-known-good cache: the optional 6th element, `true`.
const CACHED_EVENT: &str = concat!(
    "0000002b",                           // body length 43
    "81 a5 4576656e74 96",                // {"Event": [ (6 elements)
    "a6 636f6e666967",                    //   channel "config"
    "c4 07 a664622e75726c",               //   key
    "02",                                 //   epoch 2
    "08",                                 //   seq 8
    "c4 0e ad706f7374677265733a2f2f6462", //   payload
    "c3",                                 //   cached: true ]}
);

#[test]
fn golden_cached_event() {
    assert_golden(cached_event(), CACHED_EVENT);
}

#[test]
fn an_event_with_an_explicit_false_mark_decodes_as_live() {
    // A writer may send the 6th element as `false`; readers treat it like the 5-element form.
    let golden = CACHED_EVENT.strip_suffix("c3").expect("the cached golden ends with true");
    let bytes = unhex(&format!("{golden}c2"));
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    assert_eq!(FrameCodec::new().decode(&mut buf).unwrap(), Some(event()));
}

// ---------------------------------------------------------------- Publish

fn publish() -> Frame {
    Frame::Publish(Publish { id: 8, channel: "registry".into(), payload: Bytes::from_static(b"\x92\xa3svc\x50") })
}

const PUBLISH: &str = concat!(
    "0000001c",                // body length 28
    "81 a7 5075626c697368 93", // {"Publish": [
    "08",                      //   id 8
    "a8 7265676973747279",     //   channel "registry"
    "c4 06 92a373766350",      //   payload: the MessagePack array ["svc", 80] ]}
);

#[test]
fn golden_publish() {
    assert_golden(publish(), PUBLISH);
}

// ---------------------------------------------------------------- Ack

fn ack_ok() -> Frame {
    Frame::Ack(Ack { id: 5, result: Ok(()) })
}

const ACK_OK: &str = concat!(
    "0000000c",        // body length 12
    "81 a3 41636b 92", // {"Ack": [
    "05",              //   id 5
    "81 a2 4f6b c0",   //   result: {"Ok": nil} ]}
);

fn ack_err() -> Frame {
    Frame::Ack(Ack {
        id: 8,
        result: Err(RemoteError::upstream("registry refused").with_code(ErrorCode::upstream("503"))),
    })
}

const ACK_ERR: &str = concat!(
    "0000002b",                            // body length 43
    "81 a3 41636b 92",                     // {"Ack": [
    "08",                                  //   id 8
    "81 a3 457272 93",                     //   result: {"Err": [
    "a8 557073747265616d",                 //     kind "Upstream"
    "a3 353033",                           //     code "503"
    "b0 72656769737472792072656675736564", //     message "registry refused" ]}]}
);

#[test]
fn golden_ack_ok() {
    assert_golden(ack_ok(), ACK_OK);
}

#[test]
fn golden_ack_err() {
    assert_golden(ack_err(), ACK_ERR);
}

// ---------------------------------------------------------------- Status

fn status(state: UpstreamState) -> Frame {
    Frame::Status(ChannelStatus { channel: "config".into(), state })
}

const STATUS_STARTING: &str = concat!(
    "00000019",              // body length 25
    "81 a6 537461747573 92", // {"Status": [
    "a6 636f6e666967",       //   channel "config"
    "a8 5374617274696e67",   //   state: unit variant, the bare string "Starting" ]}
);

const STATUS_READY: &str = concat!(
    "00000016",              // body length 22
    "81 a6 537461747573 92", // {"Status": [
    "a6 636f6e666967",       //   channel "config"
    "a5 5265616479",         //   state "Ready" ]}
);

const STATUS_DOWN: &str = concat!(
    "0000003e",                                // body length 62
    "81 a6 537461747573 92",                   // {"Status": [
    "a6 636f6e666967",                         //   channel "config"
    "81 a4 446f776e",                          //   state: {"Down":
    "93",                                      //     RemoteError [
    "ab 556e617661696c61626c65",               //       kind "Unavailable"
    "a7 636f6e6e656374",                       //       code "connect"
    "b2 636f6e6e656374696f6e2072656675736564", //       message "connection refused" ]}]}
);

fn status_down() -> Frame {
    status(UpstreamState::Down(
        RemoteError::unavailable("connection refused").with_code(ErrorCode::upstream("connect")),
    ))
}

#[test]
fn golden_status_starting() {
    assert_golden(status(UpstreamState::Starting), STATUS_STARTING);
}

#[test]
fn golden_status_ready() {
    assert_golden(status(UpstreamState::Ready), STATUS_READY);
}

#[test]
fn golden_status_down() {
    assert_golden(status_down(), STATUS_DOWN);
}

// ---------------------------------------------------------------- Ping, Pong, Goodbye

const PING: &str = concat!(
    "00000007",       // body length 7
    "81 a4 50696e67", // {"Ping":
    "07",             //   7 }
);

const PING_U32: &str = concat!(
    "0000000b",       // body length 11
    "81 a4 50696e67", // {"Ping":
    "ce deadbeef",    //   0xdeadbeef (uint32) }
);

const PONG: &str = concat!(
    "0000000f",            // body length 15
    "81 a4 506f6e67",      // {"Pong":
    "cf ffffffffffffffff", //   u64::MAX (uint64) }
);

const GOODBYE: &str = concat!(
    "00000017",                      // body length 23
    "81 a7 476f6f64627965",          // {"Goodbye":
    "ad 7368757474696e6720646f776e", //   "shutting down" }
);

fn goodbye() -> Frame {
    Frame::Goodbye("shutting down".into())
}

// ---------------------------------------------------------------- Open

const OPEN: &str = concat!(
    "0000000d",         // body length 13
    "81 a4 4f70656e",   // {"Open":
    "91 a5 666c616773", //   ["flags"] }
);

fn open() -> Frame {
    Frame::Open(vec!["flags".into()])
}

#[test]
fn golden_open() {
    assert_golden(open(), OPEN);
}

// ---------------------------------------------------------------- Ended

fn ended() -> Frame {
    Frame::Ended(tandem_protocol::Ended {
        channel: "config".into(),
        key: Bytes::from_static(KEY),
        error: RemoteError::rejected("no").with_code(ErrorCode::upstream("limit")),
    })
}

const ENDED: &str = concat!(
    "0000002b",               // body length 43
    "81 a5 456e646564 93",    // {"Ended": [
    "a6 636f6e666967",        //   channel "config"
    "c4 07 a664622e75726c",   //   key
    "93 a8 52656a6563746564", //   error: [kind "Rejected",
    "a5 6c696d6974 a2 6e6f",  //     code "limit", message "no"] ]}
);

#[test]
fn golden_ended() {
    assert_golden(ended(), ENDED);
}

#[test]
fn golden_ping() {
    assert_golden(Frame::Ping(7), PING);
    assert_golden(Frame::Ping(0xdead_beef), PING_U32);
}

#[test]
fn golden_pong() {
    assert_golden(Frame::Pong(u64::MAX), PONG);
}

#[test]
fn golden_goodbye() {
    assert_golden(goodbye(), GOODBYE);
}

/// The goldens above name every frame kind (a new variant needs a golden too).
#[test]
fn goldens_cover_every_frame_kind() {
    let all = [
        hello(),
        welcome(),
        reject(),
        invoke(),
        response_ok(),
        response_err(),
        cancel(),
        subscribe_resuming(),
        subscribe_fresh(),
        unsubscribe(),
        event(),
        publish(),
        ack_ok(),
        ack_err(),
        status(UpstreamState::Ready),
        Frame::Ping(7),
        Frame::Pong(7),
        goodbye(),
        open(),
        ended(),
    ];
    let kinds: BTreeSet<&str> = all.iter().map(Frame::kind).collect();
    let expected: BTreeSet<&str> = [
        "Hello",
        "Welcome",
        "Reject",
        "Invoke",
        "Response",
        "Cancel",
        "Subscribe",
        "Unsubscribe",
        "Event",
        "Publish",
        "Ack",
        "Status",
        "Ping",
        "Pong",
        "Goodbye",
        "Open",
        "Ended",
    ]
    .into();
    assert_eq!(kinds, expected);
}

/// All the goldens, concatenated, decode back in order from one buffer.
#[test]
fn goldens_concatenated_decode_in_order() {
    let cases =
        [(hello(), HELLO), (event(), EVENT), (ack_err(), ACK_ERR), (status_down(), STATUS_DOWN), (cancel(), CANCEL)];
    let mut src = BytesMut::new();
    for (_, golden) in &cases {
        src.extend_from_slice(&unhex(golden));
    }
    let mut codec = FrameCodec::new();
    for (frame, _) in cases {
        assert_eq!(codec.decode(&mut src).unwrap(), Some(frame));
    }
    assert_eq!(codec.decode(&mut src).unwrap(), None);
    assert!(src.is_empty());
}

// ---------------------------------------------------------------- RemoteError

/// Every error kind's golden body: array(3) [kind, code "c", message "m"].
const REMOTE_ERRORS: [(ErrorKind, &str); 7] = [
    (ErrorKind::DeadlineExceeded, "93 b0 446561646c696e654578636565646564 a163 a16d"),
    (ErrorKind::Unavailable, "93 ab 556e617661696c61626c65 a163 a16d"),
    (ErrorKind::Rejected, "93 a8 52656a6563746564 a163 a16d"),
    (ErrorKind::Upstream, "93 a8 557073747265616d a163 a16d"),
    (ErrorKind::BadRequest, "93 aa 42616452657175657374 a163 a16d"),
    (ErrorKind::Cancelled, "93 a9 43616e63656c6c6564 a163 a16d"),
    (ErrorKind::Internal, "93 a8 496e7465726e616c a163 a16d"),
];

#[test]
fn golden_remote_error_of_every_kind() {
    for (kind, golden) in REMOTE_ERRORS {
        let error = RemoteError::new(kind, "m").with_code(ErrorCode::upstream("c"));
        let expected = unhex(golden);
        assert_eq!(hex(&rmp_serde::to_vec(&error).unwrap()), hex(&expected), "{kind}");
        assert_eq!(rmp_serde::from_slice::<RemoteError>(&expected).unwrap(), error, "{kind}");
        // The kind's wire string is its `as_str` name.
        assert_eq!(expected[2..2 + kind.as_str().len()], *kind.as_str().as_bytes());
    }
}

#[test]
fn unknown_error_kind_decodes_as_internal() {
    // array(3) [kind "Bogus", code "c", message "m"]
    let bytes = unhex("93 a5 426f677573 a163 a16d");
    let error: RemoteError = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(error, RemoteError::internal("m").with_code(ErrorCode::upstream("c")));
}

#[test]
fn unknown_error_kind_inside_a_frame_decodes_as_internal() {
    // A newer leader answers with a kind this build does not know.
    let golden = concat!(
        "0000001e",                  // body length 30
        "81 a8 526573706f6e7365 92", // {"Response": [
        "09",                        //   id 9
        "81 a3 457272 93",           //   result: {"Err": [
        "a8 4f7665726c6f6164",       //     kind "Overload" (unknown here)
        "a0",                        //     code ""
        "a1 78",                     //     message "x" ]}]}
    );
    let mut src = BytesMut::from(&unhex(golden)[..]);
    let frame = FrameCodec::new().decode(&mut src).unwrap();
    assert_eq!(frame, Some(Frame::Response(Response { id: 9, result: Err(RemoteError::internal("x")) })));
}
