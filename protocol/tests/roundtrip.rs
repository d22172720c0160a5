//! Property tests: any frame survives encode → decode through `FrameCodec`, alone
//! or concatenated with others and fed to the decoder in arbitrary chunks.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use tandem_protocol::uuid::Uuid;
use tandem_protocol::{
    Ack, ChannelStatus, Codec, ErrorCode, ErrorKind, Event, Frame, FrameCodec, Hello, Invoke, LENGTH_PREFIX, Position,
    Publish, Reject, RemoteError, Response, Subscribe, Unsubscribe, UpstreamState, Welcome, payload,
};
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------- strategies

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, including the empty string and multi-byte characters.
    any::<String>()
}

fn bytes() -> impl Strategy<Value = Bytes> {
    // Sizes on both sides of MessagePack's bin 8 / bin 16 boundary (255 / 256).
    prop_oneof![vec(any::<u8>(), 0..40), vec(any::<u8>(), 250..300)].prop_map(Bytes::from)
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid::from_bytes)
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::DeadlineExceeded),
        Just(ErrorKind::Unavailable),
        Just(ErrorKind::Rejected),
        Just(ErrorKind::Upstream),
        Just(ErrorKind::BadRequest),
        Just(ErrorKind::Cancelled),
        Just(ErrorKind::Internal),
    ]
}

fn remote_error() -> impl Strategy<Value = RemoteError> {
    (error_kind(), text(), text())
        .prop_map(|(kind, code, message)| RemoteError::new(kind, message).with_code(ErrorCode::upstream(code)))
}

fn position() -> impl Strategy<Value = Position> {
    (any::<u64>(), any::<u64>()).prop_map(|(epoch, seq)| Position { epoch, seq })
}

fn upstream_state() -> impl Strategy<Value = UpstreamState> {
    prop_oneof![Just(UpstreamState::Starting), Just(UpstreamState::Ready), remote_error().prop_map(UpstreamState::Down)]
}

fn hello() -> impl Strategy<Value = Frame> {
    (any::<u16>(), uuid(), any::<u32>(), vec(text(), 0..5), option::of(text())).prop_map(
        |(version, peer_id, pid, channels, token)| Frame::Hello(Hello { version, peer_id, pid, channels, token }),
    )
}

fn welcome() -> impl Strategy<Value = Frame> {
    (any::<u16>(), uuid(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
        |(version, leader_id, epoch, pid, heartbeat_ms)| {
            Frame::Welcome(Welcome { version, leader_id, epoch, pid, heartbeat_ms })
        },
    )
}

fn reject() -> impl Strategy<Value = Frame> {
    (any::<u16>(), remote_error()).prop_map(|(version, error)| Frame::Reject(Reject { version, error }))
}

fn invoke() -> impl Strategy<Value = Frame> {
    (any::<u64>(), text(), any::<u32>(), any::<bool>(), bytes()).prop_map(
        |(id, channel, deadline_ms, oneway, payload)| {
            Frame::Invoke(Invoke { id, channel: channel.into(), deadline_ms, oneway, payload })
        },
    )
}

fn response() -> impl Strategy<Value = Frame> {
    let result = prop_oneof![bytes().prop_map(Ok), remote_error().prop_map(Err)];
    (any::<u64>(), result).prop_map(|(id, result)| Frame::Response(Response { id, result }))
}

fn subscribe() -> impl Strategy<Value = Frame> {
    (any::<u64>(), text(), bytes(), option::of(position())).prop_map(|(id, channel, key, last_seen)| {
        Frame::Subscribe(Subscribe { id, channel: channel.into(), key, last_seen })
    })
}

fn unsubscribe() -> impl Strategy<Value = Frame> {
    (any::<u64>(), text(), bytes())
        .prop_map(|(id, channel, key)| Frame::Unsubscribe(Unsubscribe { id, channel: channel.into(), key }))
}

fn event() -> impl Strategy<Value = Frame> {
    (text(), bytes(), any::<u64>(), any::<u64>(), bytes(), any::<bool>()).prop_map(
        |(channel, key, epoch, seq, payload, cached)| {
            Frame::Event(Event { channel: channel.into(), key, epoch, seq, payload, cached })
        },
    )
}

fn publish() -> impl Strategy<Value = Frame> {
    (any::<u64>(), text(), bytes())
        .prop_map(|(id, channel, payload)| Frame::Publish(Publish { id, channel: channel.into(), payload }))
}

fn ack() -> impl Strategy<Value = Frame> {
    let result = prop_oneof![Just(Ok(())), remote_error().prop_map(Err)];
    (any::<u64>(), result).prop_map(|(id, result)| Frame::Ack(Ack { id, result }))
}

fn status() -> impl Strategy<Value = Frame> {
    (text(), upstream_state())
        .prop_map(|(channel, state)| Frame::Status(ChannelStatus { channel: channel.into(), state }))
}

/// Any frame, every kind equally likely.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello(),
        welcome(),
        reject(),
        invoke(),
        response(),
        any::<u64>().prop_map(Frame::Cancel),
        subscribe(),
        unsubscribe(),
        event(),
        publish(),
        ack(),
        status(),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        text().prop_map(Frame::Goodbye),
    ]
}

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame.clone(), &mut buf).expect("a small frame encodes");
    buf
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_round_trips(frame in frame()) {
        let mut buf = encode(&frame);
        let announced = u32::from_be_bytes(buf[..LENGTH_PREFIX].try_into().unwrap()) as usize;
        prop_assert_eq!(announced, buf.len() - LENGTH_PREFIX);
        // The body is a one-entry map keyed by the variant name.
        prop_assert_eq!(buf[LENGTH_PREFIX], 0x81);
        prop_assert_eq!(&buf[LENGTH_PREFIX + 2..LENGTH_PREFIX + 2 + frame.kind().len()], frame.kind().as_bytes());

        let mut codec = FrameCodec::new();
        prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn concatenated_frames_decode_in_order_whatever_the_chunking(
        frames in vec(frame(), 0..12),
        chunks in vec(1..48usize, 1..16),
    ) {
        let mut wire = BytesMut::new();
        let mut encoder = FrameCodec::new();
        for frame in &frames {
            encoder.encode(frame.clone(), &mut wire).unwrap();
        }

        // Feed the wire bytes in chunks of the given sizes (cycled), decoding
        // after every chunk as a `FramedRead` would after every read.
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut rest = &wire[..];
        for size in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            buf.extend_from_slice(chunk);
            rest = tail;
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                decoded.push(frame);
            }
        }
        prop_assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, frames);
    }

    /// `FrameCodec` reads and writes the hot frames without serde: its bytes are
    /// serde's bytes, for every frame.
    #[test]
    fn frame_codec_writes_what_serde_writes(frame in frame()) {
        let mut serde_only = BytesMut::new();
        Codec::<Frame>::new().encode(&frame, &mut serde_only).unwrap();
        prop_assert_eq!(&encode(&frame)[..], &serde_only[..]);
        // The body alone (the cluster relay's form) is the same bytes after the prefix.
        let body = frame.encode_body().unwrap();
        prop_assert_eq!(&body[..], &serde_only[LENGTH_PREFIX..]);
        prop_assert_eq!(Frame::decode_body(&body).unwrap(), frame.clone());
        // A relay's codec reads it the same, and keeps what it read intact as it reads on.
        let mut relay = FrameCodec::new();
        let first = relay.decode_body(&body).unwrap();
        prop_assert_eq!(relay.decode_body(&body).unwrap(), frame.clone());
        prop_assert_eq!(first, frame);
    }

    /// ... and it reads any bytes exactly as serde does: the same frame, or an
    /// error where serde has one. The bodies are valid frames with a byte
    /// changed, so most of them get past the first bytes of the fast path.
    #[test]
    fn frame_codec_reads_what_serde_reads(frame in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let mut body = encode(&frame).split_off(LENGTH_PREFIX).to_vec();
        let i = at.index(body.len());
        if cut { body.truncate(i) } else { body[i] = byte }
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
        wire.extend_from_slice(&body);
        // A warm codec: it has read the frame as sent (so it keeps its channel
        // name and has a chunk in use), then reads the changed bytes.
        let mut codec = FrameCodec::new();
        prop_assert_eq!(codec.decode(&mut encode(&frame)).unwrap(), Some(frame.clone()));
        let fast = codec.decode(&mut wire.clone());
        let serde_only = Codec::<Frame>::new().decode(&mut wire);
        match (fast, serde_only) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "fast {:?} vs serde {:?} for {:02x?}", a, b, body),
        }
    }

    #[test]
    fn remote_errors_round_trip(error in remote_error()) {
        let bytes = rmp_serde::to_vec(&error).unwrap();
        prop_assert_eq!(rmp_serde::from_slice::<RemoteError>(&bytes).unwrap(), error);
    }

    #[test]
    fn payload_helpers_round_trip(value in (text(), any::<u64>(), vec(any::<i32>(), 0..8), option::of(any::<bool>()))) {
        let bytes = payload::encode(&value).unwrap();
        prop_assert_eq!(payload::decode::<(String, u64, Vec<i32>, Option<bool>)>(&bytes).unwrap(), value);
    }
}

#[test]
fn payload_decode_of_the_wrong_type_is_a_bad_request() {
    let bytes = payload::encode("not a number").unwrap();
    let error = payload::decode::<u64>(&bytes).unwrap_err();
    assert_eq!(error.kind, ErrorKind::BadRequest);
    assert_eq!(error.code, "decode");
}
