//! The registry's messages, as framed by [`tandem_protocol::Codec`], and the
//! data they carry ([`KeyValue`], [`WatchSpec`], [`WatchEvent`], [`Instance`],
//! [`ServiceEvent`], [`Stats`]): what the client and the server share. Nothing in
//! here knows either of them.
//!
//! The client sends [`Request`]s, each with an id unique on its connection (never
//! 0), and may have many in flight. The server answers each with one
//! [`ServerMessage::Reply`] carrying the same id, in the order it read them, and
//! pushes watch traffic tagged with the watch's id, which is the id of the request
//! that started the watch. A peer that breaks the protocol gets one
//! [`ServerMessage::Goodbye`] (kind `BadRequest`) and is disconnected.
//!
//! The first message on every connection is the server's
//! [`ServerMessage::Hello`]: its incarnation (a random id drawn when the server
//! process started) and its current revision. A client that sees a different
//! incarnation than before, or a revision below one it has seen, is talking to a
//! server that lost state (a restart): revisions it remembers mean nothing there.
//!
//! ```text
//! client                                          server
//!   |         Hello{incarnation: "5f0c…", revision: 52}
//!   |<------------------------------------------------|
//!   | Request{id: 7, Watch{Prefix("app/"), from: Some(40)}}
//!   |------------------------------------------------>|
//!   |                  Reply{id: 7, Ok(Watching)}     |
//!   |      Event{watch_id: 7, Put{.., revision: 40}}  |  replay from the history
//!   |                Progress{watch_id: 7, rev: 52}   |  live from here on
//!   |<------------------------------------------------|
//!   | Request{id: 8, Put{"app/x", value}}             |
//!   |------------------------------------------------>|
//!   |                 Reply{id: 8, Ok(Revision(53))}  |
//!   |      Event{watch_id: 7, Put{"app/x", .., 53}}   |
//!   |<------------------------------------------------|
//! ```

mod keys;
mod services;
mod stats;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tandem_protocol::RemoteError;

pub use keys::{KeyValue, WatchEvent, WatchSpec};
pub(crate) use services::LeaseId;
pub use services::{Instance, ServiceEvent};
pub use stats::Stats;

/// A request's id: unique among a connection's outstanding requests, never 0.
pub(crate) type RequestId = u64;

/// The id reserved for messages about the connection as a whole.
pub(crate) const CONNECTION_ID: RequestId = 0;

/// Client → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) id: RequestId,
    pub(crate) op: Op,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Op {
    /// → `Value`.
    Get { key: String },
    /// → `Revision` (of the put).
    Put { key: String, value: Bytes },
    /// → `Deleted`.
    Delete { key: String },
    /// → `Revision` (the current one).
    Revision,
    /// → `Watching`; then `Event`s and one `Progress` tagged with this request's id.
    Watch { spec: WatchSpec, from_revision: Option<u64> },
    /// → `Watching`; then one `ServiceSnapshot` and `ServiceEvent`s tagged with this request's id.
    WatchService { service: String },
    /// → `Done`; no message of the watch follows the reply.
    CancelWatch { watch_id: RequestId },
    /// → `Lease`.
    Register { instance: Instance, ttl_ms: u64 },
    /// → `KeptAlive`.
    KeepAlive { lease: LeaseId },
    /// → `Done`.
    Deregister { lease: LeaseId },
    /// → `Instances`.
    Discover { service: String },
    /// → `Stats`.
    Stats,
}

impl Op {
    /// The operation's name, for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Get { .. } => "get",
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Revision => "revision",
            Op::Watch { .. } => "watch",
            Op::WatchService { .. } => "watch_service",
            Op::CancelWatch { .. } => "cancel_watch",
            Op::Register { .. } => "register",
            Op::KeepAlive { .. } => "keep_alive",
            Op::Deregister { .. } => "deregister",
            Op::Discover { .. } => "discover",
            Op::Stats => "stats",
        }
    }
}

/// A successful outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Response {
    Value { kv: Option<KeyValue>, revision: u64 },
    Revision(u64),
    Deleted(Option<u64>),
    Watching,
    Lease { lease: LeaseId, ttl_ms: u64 },
    KeptAlive { ttl_ms: u64 },
    Instances(Vec<Instance>),
    Stats(Stats),
    Done,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) id: RequestId,
    pub(crate) result: Result<Response, RemoteError>,
}

/// What the server announces first on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServerInfo {
    /// Drawn at random (a UUID v4) when the server process starts: a different
    /// value means a different server state, whatever the revisions say.
    pub incarnation: String,
    /// The store's revision when the connection was accepted.
    pub revision: u64,
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ServerMessage {
    /// The first message of every connection, sent before any request is read.
    Hello(ServerInfo),
    Reply(Reply),
    /// A change seen by a key or prefix watch.
    Event {
        watch_id: RequestId,
        event: WatchEvent,
    },
    /// The watch has been sent every change up to `revision` and is live from here on.
    Progress {
        watch_id: RequestId,
        revision: u64,
    },
    /// The instances of a watched service when the watch went live.
    ServiceSnapshot {
        watch_id: RequestId,
        instances: Vec<Instance>,
    },
    /// A join or leave seen by a service watch.
    ServiceEvent {
        watch_id: RequestId,
        event: ServiceEvent,
    },
    /// The server closes the connection after this message, for this reason.
    Goodbye(RemoteError),
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tandem_protocol::Codec;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(value: T) -> Vec<u8> {
        let mut codec = Codec::<T>::new();
        let mut buf = BytesMut::new();
        codec.encode(&value, &mut buf).expect("encodes");
        let bytes = buf.to_vec();
        assert_eq!(codec.decode(&mut buf).expect("decodes"), Some(value));
        bytes
    }

    #[test]
    fn golden_request() {
        let bytes = round_trip(Request { id: 1, op: Op::Get { key: "a".into() } });
        // [1, {"Get": ["a"]}]
        assert_eq!(bytes, b"\x00\x00\x00\x0a\x92\x01\x81\xa3Get\x91\xa1a");
        let bytes = round_trip(Request { id: 2, op: Op::Stats });
        assert_eq!(bytes, b"\x00\x00\x00\x08\x92\x02\xa5Stats");
        // [1, {"Watch": [{"Prefix": ""}, nil]}] (also written by hand in tests/robustness.rs)
        let bytes = round_trip(Request { id: 1, op: Op::Watch { spec: WatchSpec::prefix(""), from_revision: None } });
        assert_eq!(bytes, b"\x00\x00\x00\x14\x92\x01\x81\xa5Watch\x92\x81\xa6Prefix\xa0\xc0");
    }

    #[test]
    fn golden_hello() {
        let bytes = round_trip(ServerMessage::Hello(ServerInfo { incarnation: "i".into(), revision: 3 }));
        // {"Hello": ["i", 3]}
        assert_eq!(bytes, b"\x00\x00\x00\x0b\x81\xa5Hello\x92\xa1i\x03");
    }

    #[test]
    fn golden_goodbye() {
        let bytes = round_trip(ServerMessage::Goodbye(RemoteError::bad_request("x")));
        // {"Goodbye": ["BadRequest", "", "x"]}
        assert_eq!(bytes, b"\x00\x00\x00\x18\x81\xa7Goodbye\x93\xaaBadRequest\xa0\xa1x");
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Request { id: 3, op: Op::Put { key: "k".into(), value: Bytes::from_static(b"\x00\xff") } });
        round_trip(Request {
            id: 4,
            op: Op::Register { instance: Instance::new("s", "i", "a").with_metadata("z", "1"), ttl_ms: 3000 },
        });
        round_trip(Request { id: 5, op: Op::Watch { spec: WatchSpec::prefix("p/"), from_revision: Some(9) } });
        round_trip(ServerMessage::Event {
            watch_id: 5,
            event: WatchEvent::Put { key: "p/a".into(), value: Bytes::from_static(b"v"), revision: 9 },
        });
        round_trip(ServerMessage::Reply(Reply { id: 3, result: Ok(Response::Revision(2)) }));
        round_trip(ServerMessage::Hello(ServerInfo { incarnation: "x".into(), revision: 7 }));
        round_trip(ServerMessage::Reply(Reply { id: 3, result: Err(RemoteError::bad_request("too big")) }));
    }
}
