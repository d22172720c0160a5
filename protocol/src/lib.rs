//! The wire format of tandem.
//!
//! Every connection — follower to leader, worker to master, client to the bundled
//! registry — carries frames: a u32 big-endian length, then that many bytes of
//! MessagePack. This crate owns the Leader/Follower [`Frame`]s, the [`Codec`] that
//! reads and writes them with a size limit checked before any allocation, the
//! handshake rules, and [`RemoteError`], the one error type that crosses the wire,
//! with its typed [`ErrorCode`]; [`Link`], a connection as a stream and a sink of
//! frames (what a custom `Connector` of the follower returns); and
//! [`unix::split`], the Unix-socket halves every tandem link uses, which ask the
//! kernel for writability only while a write waits for room (no wake-up each
//! time the peer reads).
//!
//! What tandem's own crates share beyond that (the batching writer every
//! connection runs, the table of requests not yet answered, backoff,
//! accept-error handling) lives in a module that is not part of the API.
//! `PROTOCOL.md` beside this crate is the byte-level specification.
//!
//! ```text
//! follower                                   leader
//!    | Hello{version, peer_id, pid, channels, token}
//!    |----------------------------------------->|
//!    |       Welcome{version, leader_id, epoch} |  or Reject{version, error}, then close
//!    |<-----------------------------------------|
//!    |       Status{channel, Ready}             |
//!    |<-----------------------------------------|
//!    | Invoke{id, channel, deadline_ms, ...}    |
//!    |----------------------------------------->|
//!    |                Response{id, Ok | Err}   |
//!    |<-----------------------------------------|
//!    | Subscribe{id, channel, key, last_seen}   |
//!    |----------------------------------------->|
//!    |  Ack{id}, Event{channel, key, epoch, seq, payload} ...
//!    |<-----------------------------------------|
//! ```
//!
//! ```
//! use bytes::BytesMut;
//! use tandem_protocol::{Frame, FrameCodec};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = FrameCodec::new();
//! let mut buf = BytesMut::new();
//! codec.encode(Frame::Ping(7), &mut buf).unwrap();
//! assert_eq!(&buf[..], b"\x00\x00\x00\x07\x81\xa4Ping\x07");
//! assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Ping(7)));
//! ```

mod accept;
mod api;
mod arena;
mod backoff;
mod code;
mod codec;
mod error;
mod fast;
mod frame;
mod handshake;
mod link;
mod name;
pub mod payload;
mod pending;
mod shared;
pub mod unix;
mod write;

pub use api::{Api, Message};
pub use code::ErrorCode;
pub use codec::{Codec, CodecError, DEFAULT_MAX_FRAME_LENGTH, FrameCodec, LENGTH_PREFIX};
pub use error::{ErrorKind, RemoteError};
pub use frame::{
    Ack, ChannelStatus, Delivery, Ended, Event, Frame, Hello, Invoke, MIRROR_BATCH_BYTES, MIRROR_BATCH_ENTRIES,
    MirrorEntry, MirrorKey, Mirrored, Position, Publish, Reject, RequestId, Response, Settle, Subscribe, SubscribeOne,
    Unsubscribe, UpstreamState, Welcome,
};
pub use handshake::{DELIVER_ONE_VERSION, MIN_PROTOCOL_VERSION, MIRROR_VERSION, PROTOCOL_VERSION};
pub use link::{FrameSink, Link, LinkSink};
pub use name::ChannelName;
pub use shared::SharedFrame;

/// Machinery tandem's own crates share (the Leader, the Follower, the
/// cluster, the registry, the conformance kit): writing with stall limits,
/// tables of pending requests, backoff, accept-error handling, handshake
/// checks. **Not part of the API**: it is not re-exported by `tandem` and may
/// change in any release.
#[doc(hidden)]
pub mod internal {
    pub use crate::accept::{
        ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, AcceptErrors, Throttle, WARN_EVERY, is_resource_exhaustion,
    };
    pub use crate::backoff::{Backoff, Jitter};
    pub use crate::error::error_chain;
    pub use crate::handshake::{check_hello, negotiate};
    pub use crate::pending::{Expires, InsertError, PendingTable};
    pub use crate::write::{
        Refused, Stalled, WriteEnd, WriteLimits, WriteSource, feed_within, flush_within, write_loop,
    };
}

// Re-exported so users of the codec need not depend on the same versions themselves.
pub use bytes;
pub use uuid;
