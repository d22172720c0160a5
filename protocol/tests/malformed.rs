//! Hostile and unlucky input: truncated, split, oversized and garbage frames, the
//! handshake's refusals, and the codec over a real (trickling) byte stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use proptest::collection::vec;
use proptest::prelude::*;
use tandem_protocol::internal::{check_hello, negotiate};
use tandem_protocol::uuid::Uuid;
use tandem_protocol::{
    Codec, CodecError, DEFAULT_MAX_FRAME_LENGTH, ErrorKind, Event, Frame, FrameCodec, Hello, Invoke, LENGTH_PREFIX,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Reject,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::codec::{Decoder, Encoder, Framed, FramedRead};

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame.clone(), &mut buf).unwrap();
    buf
}

fn event(payload_len: usize) -> Frame {
    Frame::Event(Event {
        channel: "config".into(),
        key: Bytes::from_static(b"\xa6db.url"),
        epoch: 3,
        seq: 41,
        payload: Bytes::from(vec![0x5a; payload_len]),
        cached: false,
    })
}

fn hello(version: u16, token: Option<&str>) -> Hello {
    Hello {
        version,
        peer_id: Uuid::from_bytes([7; 16]),
        pid: 1,
        channels: vec!["config".into()],
        token: token.map(Into::into),
    }
}

/// A handful of frames of different shapes and sizes.
fn samples() -> Vec<Frame> {
    vec![Frame::Ping(7), Frame::Hello(hello(1, Some("s3cret"))), event(0), event(300), Frame::Goodbye("bye".into())]
}

/// Decodes everything `codec` can from `buf`, as a reader does after each read.
fn drain(codec: &mut FrameCodec, buf: &mut BytesMut, out: &mut Vec<Frame>) {
    while let Some(frame) = codec.decode(buf).unwrap() {
        out.push(frame);
    }
}

fn with_prefix(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    buf.extend_from_slice(body);
    buf
}

fn decode_body(body: &[u8]) -> Result<Option<Frame>, CodecError> {
    FrameCodec::new().decode(&mut with_prefix(body))
}

// ---------------------------------------------------------------- truncated

#[test]
fn eof_on_an_empty_buffer_is_a_clean_end() {
    assert_eq!(FrameCodec::new().decode_eof(&mut BytesMut::new()).unwrap(), None);
}

#[test]
fn eof_in_the_middle_of_a_frame_is_truncated() {
    for frame in samples() {
        let wire = encode(&frame);
        for cut in 1..wire.len() {
            // All `cut` bytes arrive at once ...
            let mut buf = BytesMut::from(&wire[..cut]);
            match FrameCodec::new().decode_eof(&mut buf) {
                Err(CodecError::Truncated { pending }) => assert_eq!(pending, cut, "{frame:?} cut at {cut}"),
                other => panic!("{frame:?} cut at {cut}: expected Truncated, got {other:?}"),
            }

            // ... or one byte per read, with a decode after each, as `FramedRead` does.
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            for byte in &wire[..cut] {
                buf.extend_from_slice(&[*byte]);
                assert_eq!(codec.decode(&mut buf).unwrap(), None, "{frame:?} cut at {cut}");
            }
            match codec.decode_eof(&mut buf) {
                Err(CodecError::Truncated { pending }) => assert_eq!(pending, cut, "{frame:?} fed up to {cut}"),
                other => panic!("{frame:?} fed up to {cut}: expected Truncated, got {other:?}"),
            }
        }
    }
}

#[test]
fn eof_after_a_whole_frame_and_part_of_the_next_yields_the_frame_then_truncated() {
    let mut buf = encode(&Frame::Ping(1));
    buf.extend_from_slice(&encode(&Frame::Pong(1))[..6]);
    let mut codec = FrameCodec::new();
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(Frame::Ping(1)));
    assert!(matches!(codec.decode_eof(&mut buf), Err(CodecError::Truncated { pending: 6 })));
}

// ---------------------------------------------------------------- split

#[test]
fn a_frame_split_at_every_byte_boundary_decodes_exactly_once() {
    for frame in samples() {
        let wire = encode(&frame);
        for split in 0..=wire.len() {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            buf.extend_from_slice(&wire[..split]);
            drain(&mut codec, &mut buf, &mut out);
            assert_eq!(out.len(), usize::from(split == wire.len()), "{frame:?} split at {split}");
            buf.extend_from_slice(&wire[split..]);
            drain(&mut codec, &mut buf, &mut out);
            assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
            assert_eq!(out, vec![frame.clone()], "{frame:?} split at {split}");
        }
    }
}

#[test]
fn two_frames_split_at_every_pair_of_boundaries_decode_in_order() {
    let frames = vec![Frame::Ping(1), Frame::Goodbye("done".into())];
    let mut wire = encode(&frames[0]);
    wire.extend_from_slice(&encode(&frames[1]));
    for first in 0..=wire.len() {
        for second in first..=wire.len() {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in [&wire[..first], &wire[first..second], &wire[second..]] {
                buf.extend_from_slice(piece);
                drain(&mut codec, &mut buf, &mut out);
            }
            assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
            assert_eq!(out, frames, "split at {first} and {second}");
        }
    }
}

// ---------------------------------------------------------------- oversized

#[test]
fn a_4_gib_prefix_is_refused_at_once_without_allocating() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0xff; 4]);
    match FrameCodec::new().decode(&mut buf) {
        Err(CodecError::TooLarge { len, max }) => {
            assert_eq!(len, 0xffff_ffff);
            assert_eq!(max, DEFAULT_MAX_FRAME_LENGTH);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(buf.capacity() < 1024, "the decoder reserved {} bytes", buf.capacity());
}

#[test]
fn an_oversized_prefix_arriving_in_pieces_is_refused_once_complete() {
    let prefix = u32::try_from(DEFAULT_MAX_FRAME_LENGTH + 1).unwrap().to_be_bytes();
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    for byte in &prefix[..3] {
        buf.extend_from_slice(&[*byte]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }
    buf.extend_from_slice(&prefix[3..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CodecError::TooLarge { len, max: DEFAULT_MAX_FRAME_LENGTH }) if len == DEFAULT_MAX_FRAME_LENGTH as u64 + 1
    ));
    assert!(buf.capacity() < 1024, "the decoder reserved {} bytes", buf.capacity());
    // At end of stream the verdict is the same: too large, not merely truncated.
    assert!(matches!(codec.decode_eof(&mut buf), Err(CodecError::TooLarge { .. })));
}

#[test]
fn a_prefix_of_exactly_the_limit_waits_for_the_body() {
    let mut buf = BytesMut::from(&u32::try_from(DEFAULT_MAX_FRAME_LENGTH).unwrap().to_be_bytes()[..]);
    assert_eq!(FrameCodec::new().decode(&mut buf).unwrap(), None);
    assert_eq!(buf.len(), 4, "the prefix stays buffered until the body arrives");
}

#[test]
fn the_default_limit_is_16_mib() {
    assert_eq!(DEFAULT_MAX_FRAME_LENGTH, 16 * 1024 * 1024);
    assert_eq!(FrameCodec::new().max_frame_length(), DEFAULT_MAX_FRAME_LENGTH);
    assert_eq!(FrameCodec::default().max_frame_length(), DEFAULT_MAX_FRAME_LENGTH);
}

/// An `Invoke` whose body is exactly `body_len` bytes (for `body_len` >= 65555).
fn invoke_with_body_len(body_len: usize) -> Frame {
    // 81 a6 "Invoke" | 95 | id 01 | channel a1 "c" | deadline 00 | oneway c2 | c6 <u32 len> payload
    const OVERHEAD: usize = 8 + 1 + 1 + 2 + 1 + 1 + 5;
    Frame::Invoke(Invoke {
        id: 1,
        channel: "c".into(),
        deadline_ms: 0,
        oneway: false,
        payload: Bytes::from(vec![0xab; body_len - OVERHEAD]),
    })
}

#[test]
fn a_frame_of_exactly_the_default_limit_round_trips() {
    let frame = invoke_with_body_len(DEFAULT_MAX_FRAME_LENGTH);
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new();
    codec.encode(frame.clone(), &mut buf).unwrap();
    assert_eq!(buf.len(), LENGTH_PREFIX + DEFAULT_MAX_FRAME_LENGTH);
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
}

#[test]
fn encoding_a_frame_over_the_default_limit_fails_and_leaves_the_buffer_unchanged() {
    let mut buf = encode(&Frame::Ping(1));
    let before = buf.clone();
    let result = FrameCodec::new().encode(invoke_with_body_len(DEFAULT_MAX_FRAME_LENGTH + 1), &mut buf);
    assert!(matches!(
        result,
        Err(CodecError::TooLarge { len, max: DEFAULT_MAX_FRAME_LENGTH }) if len == DEFAULT_MAX_FRAME_LENGTH as u64 + 1
    ));
    assert_eq!(buf, before);
}

#[test]
fn a_custom_limit_applies_to_both_directions() {
    // {"Goodbye": str} takes 10 bytes plus the string (under 32 bytes).
    let mut codec = Codec::<Frame>::with_max_frame_length(16);
    assert_eq!(codec.max_frame_length(), 16);
    assert_eq!(codec.clone().max_frame_length(), 16);

    let fits = Frame::Goodbye("abcdef".into());
    let mut buf = BytesMut::new();
    codec.encode(fits.clone(), &mut buf).unwrap();
    assert_eq!(&buf[..4], &[0, 0, 0, 16]);
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(fits));

    // One byte more: refused when encoding, buffer untouched ...
    let mut buf = BytesMut::from(&b"already queued"[..]);
    match codec.encode(Frame::Goodbye("abcdefg".into()), &mut buf) {
        Err(CodecError::TooLarge { len: 17, max: 16 }) => {}
        other => panic!("expected TooLarge {{ 17, 16 }}, got {other:?}"),
    }
    assert_eq!(&buf[..], b"already queued");

    // ... and refused when decoding, as soon as the prefix is in.
    let wire = encode(&Frame::Goodbye("abcdefg".into()));
    let mut buf = BytesMut::from(&wire[..4]);
    assert!(matches!(codec.decode(&mut buf), Err(CodecError::TooLarge { len: 17, max: 16 })));
}

#[test]
fn a_limit_beyond_u32_is_clamped() {
    assert_eq!(Codec::<Frame>::with_max_frame_length(usize::MAX).max_frame_length(), u32::MAX as usize);
}

// ---------------------------------------------------------------- malformed bodies

fn assert_malformed(body: &[u8]) {
    match decode_body(body) {
        Err(CodecError::Malformed(_)) => {}
        other => panic!("body {body:02x?}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn an_unknown_variant_is_malformed() {
    assert_malformed(b"\x81\xa4Nope\x01"); // {"Nope": 1}
}

#[test]
fn bodies_that_are_not_a_frame_are_malformed() {
    assert_malformed(b""); // empty body
    assert_malformed(b"\x80"); // {}
    assert_malformed(b"\x82\xa4Ping\x07\xa4Pong\x08"); // two entries
    assert_malformed(b"\x82\xa4Ping\x07\xa4Ping\x07"); // two entries with the same key (PROTOCOL.md §3)
    // A Response whose result map repeats `Ok`, a Status whose state map repeats `Down`.
    assert_malformed(b"\x81\xa8Response\x92\x01\x82\xa2Ok\xc4\x00\xa2Ok\xc4\x00");
    assert_malformed(b"\x81\xa6Status\x92\xa1c\x82\xa4Down\x93\xa0\xa0\xa0\xa4Down\x93\xa0\xa0\xa0");
    assert_malformed(b"\xa4Ping"); // a bare variant name
    assert_malformed(b"\x92\xa4Ping\x07"); // ["Ping", 7]
    assert_malformed(b"\x81\xa4Ping\xa1x"); // {"Ping": "x"}
    assert_malformed(b"\x81\xa4Ping\xff"); // {"Ping": -1}
    assert_malformed(b"\x81\xa4Ping\x07\xc0"); // a valid frame followed by another value
    assert_malformed(b"\x81\xa7Goodbye\xa2\xff\xfe"); // invalid UTF-8
    // Hello with 4 and with 6 fields.
    assert_malformed(b"\x81\xa5Hello\x94\x01\xc4\x10AAAAAAAAAAAAAAAA\x01\x90");
    assert_malformed(b"\x81\xa5Hello\x96\x01\xc4\x10AAAAAAAAAAAAAAAA\x01\x90\xc0\xc0");
    // Hello with a 15-byte peer_id.
    assert_malformed(b"\x81\xa5Hello\x95\x01\xc4\x0fAAAAAAAAAAAAAAA\x01\x90\xc0");
    // Hello with version 70000 (not a u16).
    assert_malformed(b"\x81\xa5Hello\x95\xce\x00\x01\x11\x70\xc4\x10AAAAAAAAAAAAAAAA\x01\x90\xc0");
}

#[test]
fn the_decoder_reports_malformed_then_moves_past_the_bad_frame() {
    // The bad frame is consumed whole: a caller that chooses to go on reads the next one.
    let mut buf = with_prefix(b"\x81\xa4Nope\x01");
    buf.extend_from_slice(&encode(&Frame::Ping(3)));
    let mut codec = FrameCodec::new();
    assert!(matches!(codec.decode(&mut buf), Err(CodecError::Malformed(_))));
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Ping(3)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Random bytes behind a valid prefix never panic: they are a frame or Malformed.
    #[test]
    fn garbage_bodies_are_a_frame_or_malformed(body in vec(any::<u8>(), 0..300)) {
        let mut buf = with_prefix(&body);
        match FrameCodec::new().decode(&mut buf) {
            Ok(Some(_)) | Err(CodecError::Malformed(_)) => {}
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        prop_assert!(buf.is_empty(), "the body was not consumed");
    }

    /// Valid frames with one byte of the body changed: still a frame or Malformed.
    #[test]
    fn corrupted_frames_are_a_frame_or_malformed(index in any::<prop::sample::Index>(), byte in any::<u8>(), which in 0..5usize) {
        let mut wire = encode(&samples()[which]);
        let at = 4 + index.index(wire.len() - 4);
        wire[at] = byte;
        match FrameCodec::new().decode(&mut wire) {
            Ok(Some(_)) | Err(CodecError::Malformed(_)) => {}
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    /// Any byte stream at all, read to its end, never panics.
    #[test]
    fn arbitrary_streams_never_panic(wire in vec(any::<u8>(), 0..600)) {
        let mut codec = Codec::<Frame>::with_max_frame_length(1024);
        let mut buf = BytesMut::from(&wire[..]);
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    prop_assert!(buf.is_empty());
                    break;
                }
                Err(CodecError::Malformed(_)) => continue,
                Err(CodecError::TooLarge { len, max }) => {
                    prop_assert!(len > max as u64);
                    break;
                }
                Err(CodecError::Truncated { pending }) => {
                    prop_assert_eq!(pending, buf.len());
                    break;
                }
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}

// ---------------------------------------------------------------- handshake

/// The numbers that appear in `text`.
fn numbers_in(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

fn assert_version_reject(reject: &Reject, offered: u16) {
    assert_eq!(reject.version, PROTOCOL_VERSION);
    assert_eq!(reject.error.kind, ErrorKind::Rejected);
    assert_eq!(reject.error.code, "version");
    let numbers = numbers_in(&reject.error.message);
    for version in [offered, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION] {
        assert!(numbers.contains(&u64::from(version)), "{:?} does not name version {version}", reject.error.message);
    }
}

#[test]
fn negotiate_accepts_every_supported_version() {
    for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        assert_eq!(negotiate(version), Ok(version));
    }
}

#[test]
fn negotiate_rejects_versions_outside_the_range_naming_both() {
    for offered in [0, MIN_PROTOCOL_VERSION.wrapping_sub(1), PROTOCOL_VERSION.wrapping_add(1), 77, u16::MAX] {
        if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&offered) {
            continue;
        }
        assert_version_reject(&negotiate(offered).unwrap_err(), offered);
    }
}

#[test]
fn check_hello_rejects_a_wrong_version_before_looking_at_the_token() {
    let offered = PROTOCOL_VERSION.wrapping_add(1);
    let reject = check_hello(&hello(offered, Some("s3cret")), Some("s3cret")).unwrap_err();
    assert_version_reject(&reject, offered);
}

#[test]
fn check_hello_rejects_a_missing_or_wrong_token() {
    for token in [None, Some(""), Some("wrong!"), Some("s3cre"), Some("s3cret "), Some("S3CRET")] {
        let reject = check_hello(&hello(PROTOCOL_VERSION, token), Some("s3cret")).unwrap_err();
        assert_eq!(reject.version, PROTOCOL_VERSION);
        assert_eq!(reject.error.kind, ErrorKind::Rejected, "{token:?}");
        assert_eq!(reject.error.code, "token", "{token:?}");
        assert!(!reject.error.is_retryable());
        assert!(!reject.error.message.contains("s3cret"), "the reject leaks the token");
    }
}

#[test]
fn check_hello_accepts_the_right_token() {
    assert_eq!(check_hello(&hello(PROTOCOL_VERSION, Some("s3cret")), Some("s3cret")), Ok(PROTOCOL_VERSION));
}

#[test]
fn check_hello_ignores_the_token_when_none_is_required() {
    assert_eq!(check_hello(&hello(PROTOCOL_VERSION, None), None), Ok(PROTOCOL_VERSION));
    assert_eq!(check_hello(&hello(PROTOCOL_VERSION, Some("anything")), None), Ok(PROTOCOL_VERSION));
}

// ---------------------------------------------------------------- over a real byte stream

/// Reads at most one byte per `poll_read` and writes at most `max_write` bytes per `poll_write`.
#[derive(Debug)]
struct Trickle<S> {
    inner: S,
    max_write: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Trickle<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut byte = [0u8; 1];
        let mut one = ReadBuf::new(&mut byte);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut one))?;
        buf.put_slice(one.filled());
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Trickle<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = buf.len().min(self.max_write);
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn framed_over_a_trickling_duplex_delivers_every_frame_in_order() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // A 7-byte pipe, 3-byte writes, 1-byte reads: every frame crosses in many pieces.
        let (a, b) = tokio::io::duplex(7);
        let mut left = Framed::new(Trickle { inner: a, max_write: 3 }, FrameCodec::new());
        let mut right = Framed::new(Trickle { inner: b, max_write: 3 }, FrameCodec::new());

        let mut frames = samples();
        frames.push(event(70_000)); // a bin 32 payload
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for frame in sent {
                left.send(frame).await.unwrap();
            }
            // Then read the peer's answer on the same connection.
            let answer = left.next().await.unwrap().unwrap();
            (left, answer)
        });

        for expected in &frames {
            assert_eq!(right.next().await.unwrap().unwrap(), *expected);
        }
        right.send(Frame::Pong(7)).await.unwrap();
        let (left, answer) = writer.await.unwrap();
        assert_eq!(answer, Frame::Pong(7));

        // Closing one side ends the other's stream cleanly, with no error.
        drop(left);
        assert!(right.next().await.is_none());
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_stream_closed_mid_frame_ends_with_truncated() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut frames = FramedRead::new(Trickle { inner: reader, max_write: 1 }, FrameCodec::new());

        let mut wire = encode(&Frame::Ping(1));
        let partial = encode(&Frame::Goodbye("never finished".into()));
        wire.extend_from_slice(&partial[..9]);
        let writing = tokio::spawn(async move {
            for chunk in wire.chunks(5) {
                writer.write_all(chunk).await.unwrap();
                writer.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            writer.shutdown().await.unwrap();
        });

        assert_eq!(frames.next().await.unwrap().unwrap(), Frame::Ping(1));
        match frames.next().await {
            Some(Err(CodecError::Truncated { pending: 9 })) => {}
            other => panic!("expected Truncated {{ pending: 9 }}, got {other:?}"),
        }
        writing.await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_oversized_prefix_on_a_stream_is_an_error_without_waiting_for_the_body() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut frames = FramedRead::new(reader, FrameCodec::new());
        // Only the prefix is ever sent, and the writer stays open: the error cannot
        // come from end-of-stream, only from the prefix itself.
        writer.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        match frames.next().await {
            Some(Err(CodecError::TooLarge { len: 0xffff_ffff, .. })) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        drop(writer);
    })
    .await
    .expect("test timed out");
}
