//! The wire format of tandem.
//!
//! Every connection — follower to leader, worker to master, client to the bundled
//! registry — carries frames: a u32 big-endian length, then that many bytes of
//! MessagePack. This crate owns the Leader/Follower [`Frame`]s, the [`Codec`] that
//! reads and writes them with a size limit checked before any allocation, the
//! handshake rules, and [`RemoteError`], the one error type that crosses the wire.
//! It also holds what tandem's servers share about accepting connections:
//! [`AcceptErrors`] (a failed `accept` is logged, rate-limited, and paused on)
//! and [`Throttle`] (rate-limited warnings); what tandem's clients share:
//! [`PendingTable`], the requests sent and not yet answered; and the one
//! batching [`write_loop`] every connection's writer runs; and [`unix::split`],
//! the Unix-socket halves every tandem link uses, which ask the kernel for
//! writability only while a write waits for room (no wake-up each time the
//! peer reads).
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

pub use accept::{ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, AcceptErrors, Throttle, WARN_EVERY, is_resource_exhaustion};
pub use api::{Api, Message};
pub use backoff::Backoff;
pub use code::ErrorCode;
pub use codec::{Codec, CodecError, DEFAULT_MAX_FRAME_LENGTH, FrameCodec, LENGTH_PREFIX};
pub use error::{ErrorKind, RemoteError, error_chain};
pub use frame::{
    Ack, ChannelStatus, Delivery, Ended, Event, Frame, Hello, Invoke, Position, Publish, Reject, RequestId, Response,
    Settle, Subscribe, SubscribeOne, Unsubscribe, UpstreamState, Welcome,
};
pub use handshake::{DELIVER_ONE_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, check_hello, negotiate};
pub use link::{FrameSink, Link, LinkSink};
pub use name::ChannelName;
pub use pending::{Expires, InsertError, PendingTable};
pub use shared::SharedFrame;
pub use write::{Refused, Stalled, WriteEnd, WriteLimits, WriteSource, feed_within, flush_within, write_loop};

// Re-exported so users of the codec need not depend on the same versions themselves.
pub use bytes;
pub use uuid;
