//! The frames of the hot path — calls, their answers, events, cancels and
//! pings — read and written without serde.
//!
//! These frames are nearly all of a busy connection's traffic, and serde's
//! generic MessagePack path (variant names matched through visitors, payloads
//! read through `io::Read` into a growing `Vec`, then reallocated into
//! `Bytes`) costs more than the rest of a call together. This module handles
//! exactly the forms that Rust writers produce (PROTOCOL.md §3: shortest
//! headers, unsigned integers, `bin` payloads) and says `None` for anything
//! else, which then goes to the serde decoder: that one stays the authority on
//! what is valid, lenient forms and error messages included. So the fast path
//! never accepts a frame the serde path would refuse, nor reads one
//! differently (the crate's tests check both on arbitrary frames and bytes).
//!
//! The writer produces byte for byte what `rmp_serde` produces for the same
//! frame, and declines (`false`) the frames it does not cover.

use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};
use rmp::encode::{self, ValueWriteError};

use crate::arena::{self, Arena};
use crate::{Ack, Event, Frame, Invoke, Response};

/// Decodes `body` (one frame, without its length prefix) if it is one of the
/// hot frames in its canonical form; `None` sends it to the serde decoder.
/// An event's key and payload are copied into `arena` (each on its own
/// without one): events are the values a follower clones (to each
/// subscription handle and as its latest value) and keeps.
pub(crate) fn decode(body: &[u8], mut arena: Option<&mut Arena>) -> Option<Frame> {
    let mut r = Reader { buf: body, pos: 0 };
    if r.byte()? != 0x81 {
        return None;
    }
    let frame = match r.str()? {
        "Invoke" => {
            r.array(5)?;
            let id = r.uint()?;
            let channel = arena::name(arena.as_deref_mut(), r.str_bytes()?)?;
            let deadline_ms = u32::try_from(r.uint()?).ok()?;
            let oneway = r.bool()?;
            // Calls and answers copy on their own: each is taken once and
            // dropped, never cloned, so a chunk saves one allocation at the
            // price of two atomic counts (in the bench, N=4 x 64 in flight,
            // calls through the arena ran about 10 % slower).
            let payload = Bytes::copy_from_slice(r.bin()?);
            Frame::Invoke(Invoke { id, channel, deadline_ms, oneway, payload })
        }
        "Response" => {
            r.array(2)?;
            let id = r.uint()?;
            r.ok()?;
            let payload = Bytes::copy_from_slice(r.bin()?);
            Frame::Response(Response { id, result: Ok(payload) })
        }
        "Event" => {
            let fields = r.array_len()?;
            if fields != 5 && fields != 6 {
                return None;
            }
            let channel = arena::name(arena.as_deref_mut(), r.str_bytes()?)?;
            let key = arena::copy(arena.as_deref_mut(), r.bin()?);
            let epoch = r.uint()?;
            let seq = r.uint()?;
            let payload = arena::copy(arena, r.bin()?);
            let cached = if fields == 6 { r.bool()? } else { false };
            Frame::Event(Event { channel, key, epoch, seq, payload, cached })
        }
        "Ack" => {
            r.array(2)?;
            let id = r.uint()?;
            r.ok()?;
            if r.byte()? != 0xc0 {
                return None;
            }
            Frame::Ack(Ack { id, result: Ok(()) })
        }
        "Cancel" => Frame::Cancel(r.uint()?),
        "Ping" => Frame::Ping(r.uint()?),
        "Pong" => Frame::Pong(r.uint()?),
        _ => return None,
    };
    // Trailing bytes are malformed: let the serde decoder say so.
    (r.pos == body.len()).then_some(frame)
}

/// Room for a hot frame's head (everything before its payload) on the stack:
/// the variant name, ids, a channel name and a key of ordinary length.
const HEAD: usize = 192;

/// Appends the body of `frame` (no length prefix) if it is a hot frame;
/// `false` (and nothing written) for the others.
///
/// The head is written into a stack buffer and appended with the payload in
/// one reservation: `rmp`'s many one-byte writes then cost a store each,
/// not a buffer check and a copy each.
pub(crate) fn encode(frame: &Frame, dst: &mut BytesMut) -> bool {
    let mut head = [0u8; HEAD];
    let mut room = &mut head[..];
    match write(frame, &mut room) {
        Ok(Some(tail)) => {
            let len = HEAD - room.len();
            dst.reserve(len + tail.payload.len() + 1);
            dst.put_slice(&head[..len]);
            tail.put(dst);
            true
        }
        Ok(None) => false,
        // A head too long for the stack (a long channel name or key).
        Err(_) => {
            let start = dst.len();
            match write(frame, &mut dst.writer()) {
                Ok(Some(tail)) => {
                    tail.put(dst);
                    true
                }
                Ok(None) => false,
                Err(_) => {
                    // Writing into memory does not fail; were it to, serde would say why.
                    dst.truncate(start);
                    false
                }
            }
        }
    }
}

/// What follows a hot frame's head: its payload, then for a cached event the
/// `true` that ends it.
struct Tail<'a> {
    payload: &'a [u8],
    cached: bool,
}

impl Tail<'_> {
    fn put(&self, dst: &mut BytesMut) {
        dst.put_slice(self.payload);
        if self.cached {
            dst.put_u8(0xc3);
        }
    }
}

/// Writes the head of `frame` with the `rmp` functions `rmp_serde` itself
/// writes with (so the same shortest headers), and says what follows it;
/// `Ok(None)` for a frame this module does not cover.
fn write<'f>(frame: &'f Frame, w: &mut impl Write) -> Result<Option<Tail<'f>>, ValueWriteError> {
    let variant = |w: &mut _, name: &str| -> Result<(), ValueWriteError> {
        encode::write_map_len(w, 1)?;
        encode::write_str(w, name)
    };
    let bin = |w: &mut _, payload: &'f [u8], cached: bool| -> Result<Option<Tail<'f>>, ValueWriteError> {
        // `rmp` refuses nothing a frame can hold: a frame is at most u32::MAX bytes.
        encode::write_bin_len(w, u32::try_from(payload.len()).unwrap_or(u32::MAX))?;
        Ok(Some(Tail { payload, cached }))
    };
    let none = Tail { payload: &[], cached: false };
    match frame {
        Frame::Invoke(Invoke { id, channel, deadline_ms, oneway, payload }) => {
            variant(w, "Invoke")?;
            encode::write_array_len(w, 5)?;
            encode::write_uint(w, *id)?;
            encode::write_str(w, channel)?;
            encode::write_uint(w, u64::from(*deadline_ms))?;
            encode::write_bool(w, *oneway).map_err(ValueWriteError::InvalidMarkerWrite)?;
            bin(w, payload, false)
        }
        Frame::Response(Response { id, result: Ok(payload) }) => {
            variant(w, "Response")?;
            encode::write_array_len(w, 2)?;
            encode::write_uint(w, *id)?;
            variant(w, "Ok")?;
            bin(w, payload, false)
        }
        Frame::Event(Event { channel, key, epoch, seq, payload, cached }) => {
            variant(w, "Event")?;
            // The 6th element is written only when true (PROTOCOL.md §4).
            encode::write_array_len(w, if *cached { 6 } else { 5 })?;
            encode::write_str(w, channel)?;
            encode::write_bin(w, key)?;
            encode::write_uint(w, *epoch)?;
            encode::write_uint(w, *seq)?;
            bin(w, payload, *cached)
        }
        Frame::Ack(Ack { id, result: Ok(()) }) => {
            variant(w, "Ack")?;
            encode::write_array_len(w, 2)?;
            encode::write_uint(w, *id)?;
            variant(w, "Ok")?;
            encode::write_nil(w).map_err(ValueWriteError::InvalidMarkerWrite)?;
            Ok(Some(none))
        }
        Frame::Cancel(id) => {
            variant(w, "Cancel")?;
            encode::write_uint(w, *id)?;
            Ok(Some(none))
        }
        Frame::Ping(nonce) => {
            variant(w, "Ping")?;
            encode::write_uint(w, *nonce)?;
            Ok(Some(none))
        }
        Frame::Pong(nonce) => {
            variant(w, "Pong")?;
            encode::write_uint(w, *nonce)?;
            Ok(Some(none))
        }
        _ => Ok(None),
    }
}

/// A cursor over a frame body; every read says `None` at the first surprise.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let slice = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(self.take(n)?.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// An unsigned integer in any width (signed forms go to serde).
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.str_bytes()?).ok()
    }

    /// A string's bytes, not yet checked to be UTF-8.
    fn str_bytes(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b - 0xa0),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => usize::try_from(self.be(4)?).ok()?,
            _ => return None,
        };
        self.take(len)
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            0xc4 => self.be(1)?,
            0xc5 => self.be(2)?,
            0xc6 => self.be(4)?,
            _ => return None,
        };
        self.take(usize::try_from(len).ok()?)
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    fn array_len(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(u64::from(b - 0x90)),
            0xdc => self.be(2),
            0xdd => self.be(4),
            _ => None,
        }
    }

    fn array(&mut self, len: u64) -> Option<()> {
        (self.array_len()? == len).then_some(())
    }

    /// `{"Ok": ...}`: a result's success, whose value follows.
    fn ok(&mut self) -> Option<()> {
        (self.byte()? == 0x81 && self.str()? == "Ok").then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_body(frame: &Frame) -> Vec<u8> {
        rmp_serde::to_vec(frame).unwrap()
    }

    fn hot_frames() -> Vec<Frame> {
        let payload = Bytes::from(vec![7u8; 300]);
        vec![
            Frame::Invoke(Invoke {
                id: 0,
                channel: "config".into(),
                deadline_ms: 3000,
                oneway: false,
                payload: payload.clone(),
            }),
            Frame::Invoke(Invoke {
                id: u64::MAX,
                channel: "c".repeat(40).into(),
                deadline_ms: u32::MAX,
                oneway: true,
                payload: Bytes::new(),
            }),
            Frame::Response(Response { id: 200, result: Ok(payload.clone()) }),
            Frame::Response(Response { id: 70_000, result: Ok(Bytes::from(vec![1u8; 70_000])) }),
            Frame::Event(Event {
                channel: "config".into(),
                key: Bytes::from_static(b"\xa1k"),
                epoch: 1,
                seq: 1 << 33,
                payload: payload.clone(),
                cached: false,
            }),
            Frame::Event(Event {
                channel: String::new().into(),
                key: Bytes::new(),
                epoch: 0,
                seq: 0,
                payload: payload.clone(),
                cached: true,
            }),
            // Heads longer than the stack buffer: written through the fallback.
            Frame::Invoke(Invoke {
                id: 9,
                channel: "long".repeat(HEAD).into(),
                deadline_ms: 10,
                oneway: false,
                payload: payload.clone(),
            }),
            Frame::Event(Event {
                channel: "config".into(),
                key: Bytes::from(vec![b'k'; HEAD]),
                epoch: 2,
                seq: 3,
                payload,
                cached: true,
            }),
            Frame::Ack(Ack { id: 255, result: Ok(()) }),
            Frame::Cancel(65_535),
            Frame::Ping(0x1_0000),
            Frame::Pong(127),
        ]
    }

    #[test]
    fn writes_what_serde_writes_and_reads_it_back() {
        for frame in hot_frames() {
            let mut fast = BytesMut::new();
            assert!(encode(&frame, &mut fast), "{frame:?}");
            assert_eq!(&fast[..], &serde_body(&frame)[..], "{}", frame.kind());
            assert_eq!(decode(&fast, None), Some(frame.clone()));
            assert_eq!(decode(&fast, Some(&mut Arena::default())), Some(frame));
        }
    }

    #[test]
    fn other_forms_are_left_to_serde() {
        // A signed id, a str payload, a map-shaped struct, trailing bytes, a short array: all None.
        let bodies: [&[u8]; 5] = [
            b"\x81\xa4Ping\xd0\x07",
            b"\x81\xa8Response\x92\x01\x81\xa2Ok\xa1x",
            b"\x81\xa6Cancel\x01\x00",
            b"\x81\xa3Ack\x91\x01",
            b"\x81\xa6Invoke\x95\x01\xa1c\xce\x00\x00\x00\x05\xc2",
        ];
        for body in bodies {
            assert_eq!(decode(body, None), None, "{body:?}");
        }
        let error = Frame::Response(Response { id: 1, result: Err(crate::RemoteError::internal("x")) });
        assert!(!encode(&error, &mut BytesMut::new()));
        assert_eq!(decode(&serde_body(&error), None), None);
    }

    #[test]
    fn a_deadline_beyond_u32_is_not_read_as_one() {
        let body = b"\x81\xa6Invoke\x95\x01\xa1c\xcf\x00\x00\x00\x01\x00\x00\x00\x00\xc2\xc4\x00";
        assert_eq!(decode(body, None), None);
    }
}
