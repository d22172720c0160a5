//! Golden bytes: the wire contract, one frame kind at a time.
//!
//! Every expected byte string (in `goldens/mod.rs`) is spelled out by hand (and was cross-checked
//! against an independent MessagePack implementation), never computed by the code
//! under test. If one of these tests fails, the wire format changed: that breaks
//! every peer already deployed, so change the test only together with
//! `PROTOCOL_VERSION` and `PROTOCOL.md`.

use std::collections::BTreeSet;

use bytes::BytesMut;
use tandem_protocol::{ErrorCode, ErrorKind, Frame, FrameCodec, RemoteError, Response, UpstreamState};
use tokio_util::codec::{Decoder, Encoder};

// The frames and their bytes, shared with the conformance kit's vectors.
mod goldens;
use goldens::*;

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

#[test]
fn golden_hello() {
    assert_golden(hello(), HELLO);
}

#[test]
fn golden_hello_without_token() {
    assert_golden(hello_without_token(), HELLO_WITHOUT_TOKEN);
}

#[test]
fn golden_welcome() {
    assert_golden(welcome(), WELCOME);
}

#[test]
fn golden_reject() {
    assert_golden(reject(), REJECT);
}

#[test]
fn golden_invoke() {
    assert_golden(invoke(), INVOKE);
}

#[test]
fn golden_invoke_oneway() {
    assert_golden(invoke_oneway(), INVOKE_ONEWAY);
}

#[test]
fn golden_response_ok() {
    assert_golden(response_ok(), RESPONSE_OK);
}

#[test]
fn golden_response_err() {
    assert_golden(response_err(), RESPONSE_ERR);
}

#[test]
fn golden_cancel() {
    assert_golden(cancel(), CANCEL);
}

#[test]
fn golden_subscribe_with_last_seen() {
    assert_golden(subscribe_resuming(), SUBSCRIBE_RESUMING);
}

#[test]
fn golden_subscribe_without_last_seen() {
    assert_golden(subscribe_fresh(), SUBSCRIBE_FRESH);
}

#[test]
fn golden_unsubscribe() {
    assert_golden(unsubscribe(), UNSUBSCRIBE);
}

#[test]
fn golden_event() {
    assert_golden(event(), EVENT);
}

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

#[test]
fn golden_publish() {
    assert_golden(publish(), PUBLISH);
}

#[test]
fn golden_ack_ok() {
    assert_golden(ack_ok(), ACK_OK);
}

#[test]
fn golden_ack_err() {
    assert_golden(ack_err(), ACK_ERR);
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

#[test]
fn golden_open() {
    assert_golden(open(), OPEN);
}

#[test]
fn golden_ended() {
    assert_golden(ended(), ENDED);
}

#[test]
fn golden_subscribe_one() {
    assert_golden(subscribe_one(), SUBSCRIBE_ONE);
}

#[test]
fn golden_delivery() {
    assert_golden(delivery(false), DELIVERY);
    assert_golden(delivery(true), DELIVERY_REDELIVERED);
}

#[test]
fn golden_settle() {
    assert_golden(settle(), SETTLE);
}

#[test]
fn golden_mirror() {
    assert_golden(mirror(), MIRROR);
}

#[test]
fn golden_mirrored() {
    assert_golden(mirrored_snapshot(), MIRRORED_SNAPSHOT);
    assert_golden(mirrored_update(), MIRRORED_UPDATE);
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
        subscribe_one(),
        delivery(true),
        settle(),
        mirror(),
        mirrored_update(),
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
        "SubscribeOne",
        "Delivery",
        "Settle",
        "Mirror",
        "Mirrored",
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
    let mut src = BytesMut::from(&unhex(RESPONSE_ERR_UNKNOWN_KIND)[..]);
    let frame = FrameCodec::new().decode(&mut src).unwrap();
    assert_eq!(frame, Some(Frame::Response(Response { id: 9, result: Err(RemoteError::internal("x")) })));
}

/// The table the conformance kit exports: every entry round-trips, names are unique.
#[test]
fn the_golden_table_round_trips() {
    let all = all();
    let names: BTreeSet<&str> = all.iter().map(|g| g.name).collect();
    assert_eq!(names.len(), all.len(), "golden names are unique");
    for golden in all {
        assert_golden(golden.frame, &golden.hex);
    }
    for golden in decode_only() {
        let mut src = BytesMut::from(&unhex(&golden.hex)[..]);
        assert_eq!(FrameCodec::new().decode(&mut src).unwrap(), Some(golden.frame), "{}", golden.name);
        assert!(src.is_empty(), "{}", golden.name);
    }
}

#[test]
fn a_run_of_shared_events_is_each_event_s_golden_bytes_in_order() {
    use tandem_protocol::{CodecError, SharedFrame};
    let shared = || SharedFrame::encode(event(), 1 << 20).unwrap();
    let mut encoded = BytesMut::new();
    FrameCodec::new().encode(vec![shared(), shared()], &mut encoded).unwrap();
    assert_eq!(hex(&encoded), hex(&[unhex(EVENT), unhex(EVENT)].concat()));

    // A frame over the codec's limit is left out; the others are written, and
    // the refusal is returned.
    let mut big = event();
    if let Frame::Event(event) = &mut big {
        event.payload = vec![0u8; 4096].into();
    }
    let big = SharedFrame::encode(big, 1 << 20).unwrap();
    let mut encoded = BytesMut::new();
    let refused = FrameCodec::with_max_frame_length(1024).encode(vec![shared(), big, shared()], &mut encoded);
    assert!(matches!(refused, Err(CodecError::TooLarge { max: 1024, .. })), "{refused:?}");
    assert_eq!(hex(&encoded), hex(&[unhex(EVENT), unhex(EVENT)].concat()));
}
