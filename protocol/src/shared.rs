//! A frame encoded once, to be written to many links (the leader's fan-out).
//!
//! An event goes to every subscriber of its key: encoding it once and copying
//! the bytes into each socket's buffer costs far less than serializing it per
//! follower. The bytes are exactly what [`FrameCodec`](crate::FrameCodec)
//! writes for the frame; links that carry frames rather than bytes (in-process,
//! relayed) take the frame itself.

use std::sync::Arc;

use bytes::BytesMut;
use tokio_util::codec::Encoder;

use crate::{CodecError, Frame, FrameCodec};

/// A frame with its wire bytes (length prefix included). Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedFrame(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    frame: Frame,
    /// Kept as written: the `Arc` already shares it, so no `Bytes` counter is needed.
    wire: BytesMut,
}

impl SharedFrame {
    /// Encodes `frame` once, refusing a body longer than `max` bytes.
    pub fn encode(frame: Frame, max: usize) -> Result<SharedFrame, CodecError> {
        // Room for the whole frame at once: one allocation, no regrowth.
        let mut wire = BytesMut::with_capacity(frame.size_hint());
        FrameCodec::with_max_frame_length(max).encode(&frame, &mut wire)?;
        Ok(SharedFrame(Arc::new(Inner { frame, wire })))
    }

    /// The frame.
    pub fn frame(&self) -> &Frame {
        &self.0.frame
    }

    /// The bytes on the wire: the u32 length prefix, then the MessagePack body.
    pub fn wire(&self) -> &[u8] {
        &self.0.wire
    }
}

impl PartialEq for SharedFrame {
    fn eq(&self, other: &Self) -> bool {
        self.0.frame == other.0.frame
    }
}
