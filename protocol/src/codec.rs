//! Framing: a u32 big-endian length prefix, then one MessagePack value.

use std::io;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use crate::arena::Arena;
use crate::{Frame, SharedFrame, fast};

/// The default limit on a frame's body: 16 MiB.
pub const DEFAULT_MAX_FRAME_LENGTH: usize = 16 * 1024 * 1024;

/// The most the decoder reserves ahead of the bytes that arrived.
const RESERVE_STEP: usize = 64 * 1024;

/// Bytes taken by the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The connection failed.
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    /// A length prefix announced more bytes than the limit (checked before any allocation).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced (or attempted) body length.
        len: u64,
        /// The configured limit.
        max: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({pending} bytes pending)")]
    Truncated {
        /// How many bytes of the unfinished frame had arrived.
        pending: usize,
    },
    /// The body is not a valid MessagePack encoding of the expected type.
    #[error("malformed frame body")]
    Malformed(#[source] rmp_serde::decode::Error),
    /// A value could not be encoded.
    #[error("could not encode frame")]
    Encode(#[source] rmp_serde::encode::Error),
}

/// A tokio-util codec for length-prefixed MessagePack frames.
///
/// Decodes values of type `D`; encodes any `Serialize` value (so one codec serves
/// request/response pairs whose two directions use different types).
#[derive(Debug)]
pub struct Codec<D> {
    max: usize,
    _decodes: PhantomData<fn() -> D>,
}

/// The codec of the Leader/Follower protocol: a [`Codec`] of [`Frame`]s that
/// reads and writes the frames of calls and events without serde (the same
/// bytes, several times faster; the rest goes through serde as in any codec).
///
/// An event's key and payload are copied out of the read buffer into shared
/// 4 KiB chunks (a copy and a reference count each, no allocation); one kept
/// alive keeps its chunk alive, so it holds at most 4 KiB. Those over 512
/// bytes, and the payloads of calls and answers, get their own allocation.
/// The channel names of calls and events are shared too: the codec keeps up
/// to 8 names of up to 128 bytes (a new one replaces the one kept longest),
/// and a frame naming one of them gets a clone of it
/// ([`ChannelName`](crate::ChannelName)), not a new string.
#[derive(Debug, Clone, Default)]
pub struct FrameCodec(Codec<Frame>, Arena);

impl FrameCodec {
    /// A codec with the default 16 MiB frame limit.
    pub fn new() -> Self {
        FrameCodec(Codec::new(), Arena::default())
    }

    /// A codec refusing bodies longer than `max` bytes (clamped to `u32::MAX`).
    pub fn with_max_frame_length(max: usize) -> Self {
        FrameCodec(Codec::with_max_frame_length(max), Arena::default())
    }

    /// The configured limit on a frame's body, in bytes.
    pub fn max_frame_length(&self) -> usize {
        self.0.max
    }

    /// Reads a frame from a body without its length prefix, as
    /// [`Decoder::decode`](https://docs.rs/tokio-util/0.7/tokio_util/codec/trait.Decoder.html#tymethod.decode)
    /// does (events' keys and payloads into this codec's chunks), for
    /// carriers that frame the bytes themselves, like the cluster's relay.
    /// [`Frame::decode_body`] is the same for a one-off body.
    pub fn decode_body(&mut self, body: &[u8]) -> Result<Frame, CodecError> {
        fast::decode(body, Some(&mut self.1)).map_or_else(|| decode_body(body), Ok)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let FrameCodec(codec, arena) = self;
        codec.next_body(src, |body| fast::decode(body, Some(arena)).map_or_else(|| decode_body(body), Ok))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated { pending: src.len() }),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        if !fast::encode(frame, dst) {
            dst.truncate(start);
            return self.0.encode(frame, dst);
        }
        self.0.finish(start, dst)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<SharedFrame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: SharedFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.0.encode(item, dst)
    }
}

impl Encoder<Vec<SharedFrame>> for FrameCodec {
    type Error = CodecError;

    /// Copies each frame's bytes, in order, with one reservation for the run.
    /// A frame over this codec's limit is left out and the others are
    /// written; the error returned then is the first refusal.
    fn encode(&mut self, items: Vec<SharedFrame>, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.reserve(items.iter().map(|item| item.wire().len()).sum());
        let mut refused = None;
        for item in items {
            if let Err(error) = self.0.encode(item, dst) {
                refused.get_or_insert(error);
            }
        }
        refused.map_or(Ok(()), Err)
    }
}

impl<D> Codec<D> {
    /// A codec with the default 16 MiB frame limit.
    pub fn new() -> Self {
        Self::with_max_frame_length(DEFAULT_MAX_FRAME_LENGTH)
    }

    /// A codec refusing bodies longer than `max` bytes (clamped to `u32::MAX`).
    pub fn with_max_frame_length(max: usize) -> Self {
        Codec { max: max.min(u32::MAX as usize), _decodes: PhantomData }
    }

    /// The configured limit on a frame's body, in bytes.
    pub fn max_frame_length(&self) -> usize {
        self.max
    }
}

impl<D> Default for Codec<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D> Clone for Codec<D> {
    fn clone(&self) -> Self {
        Self::with_max_frame_length(self.max)
    }
}

impl<D> Codec<D> {
    /// Decodes the next whole frame's body with `decode` once it has arrived,
    /// then drops it from `src` (decoded or not: the stream stays in step).
    fn next_body<T>(
        &self,
        src: &mut BytesMut,
        decode: impl FnOnce(&[u8]) -> Result<T, CodecError>,
    ) -> Result<Option<T>, CodecError> {
        // Stateless on purpose: the prefix stays in `src` until the whole frame has
        // arrived, so it is checked against the limit before anything is reserved,
        // and `decode_eof` sees a lone prefix as a truncated frame.
        if src.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let len = u64::from((&src[..LENGTH_PREFIX]).get_u32());
        if len > self.max as u64 {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        // `len <= self.max <= u32::MAX`, checked above.
        let len = len as usize;
        let frame_len = len.saturating_add(LENGTH_PREFIX);
        if src.len() < frame_len {
            // Grow with the bytes that actually arrive, not with what the prefix
            // announces: a peer cannot make us hold 16 MiB by sending 4 bytes.
            src.reserve((frame_len - src.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        // Decoded in place: payloads are copied out, so no part of the read
        // buffer is kept alive by a frame and the buffer is reused as it is.
        let item = decode(&src[LENGTH_PREFIX..frame_len]);
        src.advance(frame_len);
        item.map(Some)
    }

    /// Writes the length prefix reserved at `start` for the body after it, or
    /// takes the frame back out if the body is over the limit.
    fn finish(&self, start: usize, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = dst.len() - start - LENGTH_PREFIX;
        if len > self.max {
            dst.truncate(start);
            return Err(CodecError::TooLarge { len: len as u64, max: self.max });
        }
        // `len <= self.max <= u32::MAX`, checked above.
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl<D: DeserializeOwned> Decoder for Codec<D> {
    type Item = D;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        self.next_body(src, decode_body)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated { pending: src.len() }),
        }
    }
}

impl Frame {
    /// The frame's MessagePack body, without a length prefix: the bytes
    /// [`FrameCodec`] writes after the prefix (the fast path for the frames of
    /// calls and events, serde for the others). For carriers that frame the
    /// bytes themselves, like the cluster's relay.
    pub fn encode_body(&self) -> Result<bytes::Bytes, CodecError> {
        let mut body = BytesMut::with_capacity(64);
        if !fast::encode(self, &mut body) {
            rmp_serde::encode::write(&mut (&mut body).writer(), self).map_err(CodecError::Encode)?;
        }
        Ok(body.freeze())
    }

    /// Reads a frame from a body written by [`Frame::encode_body`] (or by
    /// any writer of PROTOCOL.md), as [`FrameCodec`] does.
    pub fn decode_body(body: &[u8]) -> Result<Frame, CodecError> {
        fast::decode(body, None).map_or_else(|| decode_body(body), Ok)
    }
}

/// Decodes a body that must hold exactly one MessagePack value.
fn decode_body<D: DeserializeOwned>(body: &[u8]) -> Result<D, CodecError> {
    let mut de = rmp_serde::Deserializer::new(body);
    let item = D::deserialize(&mut de).map_err(CodecError::Malformed)?;
    let rest = de.into_inner().len();
    if rest != 0 {
        let e = rmp_serde::decode::Error::Syntax(format!("{rest} bytes left after the frame's value"));
        return Err(CodecError::Malformed(e));
    }
    Ok(item)
}

impl<D> Encoder<SharedFrame> for Codec<D> {
    type Error = CodecError;

    /// Copies the bytes encoded once (checked against this codec's limit too).
    fn encode(&mut self, item: SharedFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = item.wire().len().saturating_sub(LENGTH_PREFIX);
        if len > self.max {
            return Err(CodecError::TooLarge { len: len as u64, max: self.max });
        }
        dst.extend_from_slice(item.wire());
        Ok(())
    }
}

impl<D, T: Serialize> Encoder<T> for Codec<D> {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        if let Err(e) = rmp_serde::encode::write(&mut (&mut *dst).writer(), &item) {
            dst.truncate(start);
            return Err(CodecError::Encode(e));
        }
        self.finish(start, dst)
    }
}
