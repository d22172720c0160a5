//! The IPC messages between the master and each child, over an inherited
//! socketpair framed by [`tandem_protocol::Codec`] (u32 length + MessagePack).
//!
//! Lifecycle control and user messages are separate variants: nothing a child
//! puts in a user message (topic or payload) is ever read by the master's
//! lifecycle code, and no child message carries a sender — the master stamps
//! the sender from the channel the message arrived on.
//!
//! ```text
//! master                                     child
//!   | Init{role, id, runtime dir, token, epoch, agent}
//!   |------------------------------------------>|
//!   |                         Ready{Agent{socket} | Worker}
//!   |<------------------------------------------|
//!   |                  Ready{Standby{mirrors}}  |   a standby: its mirror is synced
//!   |<------------------------------------------|
//!   | Promote{epoch, succeeded}                 |   a standby: lead now (the agent died)
//!   |------------------------------------------>|
//!   |                         Ready{Agent{socket}}   the promoted standby serves
//!   |<------------------------------------------|
//!   | ClusterReady, AgentChanged, Stop{grace}   |   control (own queue, sent first)
//!   |------------------------------------------>|
//!   | Ping{seq}  (every ping interval, once ready)
//!   |------------------------------------------>|
//!   |                                 Pong{seq} |   from the child's runtime (see `liveness`)
//!   |<------------------------------------------|
//!   |                                Op{id, op}  |   send / request / status / open link
//!   |<------------------------------------------|
//!   | Outcome{id, outcome}                      |
//!   |------------------------------------------>|
//!   | Deliver{topic, payload, from, request}    |   user messages (bounded data queue)
//!   |------------------------------------------>|
//!   |                Reply{request, result}      |
//!   |<------------------------------------------|
//!   | LinkFrame{link, bytes} <-> LinkFrame      |   relayed, opaque Frame bytes
//!   | LinkCredit{link, n}    <-> LinkCredit     |   relayed: flow control
//! ```

use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tandem_protocol::{Codec, RemoteError};

use crate::identity::{AgentInfo, LinkId, Origin, Target};
use crate::status::StatusTable;
use crate::{ProcessRole, WorkerId};

/// The master's codec: decodes what children send.
pub(crate) type MasterCodec = Codec<FromChild>;

/// A child's codec: decodes what the master sends.
pub(crate) type ChildCodec = Codec<ToChild>;

/// Master → child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ToChild {
    /// Control, always first: who the child is and what it needs.
    Init(Init),
    /// Control: the agent changed (died, or a new one is ready). Workers only.
    AgentChanged(AgentInfo),
    /// Control: every process of the cluster is ready.
    ClusterReady,
    /// Control: stop gracefully within this many milliseconds.
    Stop { grace_ms: u64 },
    /// Control, a standby only: the agent of epoch `succeeded` is gone; lead
    /// at `epoch` (then report `Ready::Agent`). See [`standby`](crate::standby).
    Promote { epoch: u64, succeeded: u64 },
    /// Control: answer with `Pong { seq }` (see [`liveness`](crate::liveness)).
    Ping { seq: u64 },
    /// Control: the outcome of the child's `Op` with this id.
    Outcome { id: u64, outcome: Outcome },
    /// Data: a user message.
    Deliver(Delivery),
    /// Data, agent only: a worker opened a link.
    IncomingLink { link: LinkId, worker_id: WorkerId, pid: u32 },
    /// Data: one relayed frame of a link (the MessagePack body of a `Frame`).
    LinkFrame { link: LinkId, frame: Bytes },
    /// Data: the link ended (the other end closed it or died).
    LinkClosed { link: LinkId, reason: String },
    /// Data: the other end took this many more of this end's frames on the link.
    LinkCredit { link: LinkId, credit: u32 },
}

/// What a child needs to start, sent over IPC (never on the command line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Init {
    /// The cluster's name.
    pub cluster: String,
    /// The child's role.
    pub role: ProcessRole,
    /// The worker's id.
    pub worker_id: Option<WorkerId>,
    /// The master's pid.
    pub master_pid: u32,
    /// The private runtime directory (0700).
    pub runtime_dir: PathBuf,
    /// The cluster's shared secret (hex).
    pub token: String,
    /// The agent's epoch (agents only; 0 for workers).
    pub epoch: u64,
    /// The current agent (workers only).
    pub agent: Option<AgentInfo>,
    /// Whether the cluster was already announced ready.
    pub cluster_ready: bool,
    /// An agent started as the hot standby (it mirrors, and leads once promoted).
    pub standby: bool,
    /// The credit window per link direction: the frames a sender may have
    /// unacknowledged, and so the frames a receiver buffers.
    pub link_capacity: u32,
    /// Messages buffered per topic subscription.
    pub subscription_capacity: u32,
    /// How many listening sockets follow on the descriptor channel (workers).
    pub listeners: u32,
}

/// A user message as delivered, stamped by the master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Delivery {
    pub topic: String,
    pub payload: Bytes,
    /// Who sent it: set by the master from the channel it arrived on.
    pub from: Origin,
    /// When the sender awaits a reply: the master's request id to answer.
    pub request: Option<u64>,
}

/// Child → master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum FromChild {
    /// Lifecycle: the child's start function reported ready.
    Ready(Ready),
    /// Lifecycle: the answer to `Ping { seq }`, sent by the task that reads
    /// the channel: the child's runtime runs.
    Pong { seq: u64 },
    /// An operation the master answers with an `Outcome` of the same id.
    Op { id: u64, op: Op },
    /// The answer to a delivered request.
    Reply { request: u64, result: Result<Bytes, RemoteError> },
    /// One frame of a link, to relay to the other end.
    LinkFrame { link: LinkId, frame: Bytes },
    /// This end closed the link.
    LinkClose { link: LinkId },
    /// This end took this many more frames of the link: credit for the other end.
    LinkCredit { link: LinkId, credit: u32 },
}

/// The readiness report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Ready {
    /// The agent's Leader listens on this socket.
    Agent { socket: PathBuf },
    /// The worker is ready (its Follower is connected).
    Worker,
    /// The standby mirrors the Leader of this epoch (its snapshot is complete).
    Standby { mirrors: u64 },
}

/// What a process (child or the master's own messenger) asks of the master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Op {
    /// Queue a message for the target(s).
    Send { to: Target, topic: String, payload: Bytes },
    /// Queue a request for one target and answer with its reply.
    Request { to: Target, topic: String, payload: Bytes, deadline_ms: u64 },
    /// The cluster's status table.
    Status,
    /// Open a link to the agent (workers only).
    OpenLink,
}

/// The master's answer to an `Op`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// Queued for this many processes; for a random worker, the one picked.
    Sent { count: u32, worker: Option<WorkerId> },
    /// The target's reply.
    Reply(Result<Bytes, RemoteError>),
    /// The status table.
    Status(StatusTable),
    /// The link is open, with this id.
    LinkOpened { link: LinkId },
    /// Refused, and why.
    Refused(Refusal),
}

/// Why the master refused an `Op`: the wire form of the messenger's errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Refusal {
    NotRunning { target: String, state: String },
    NoSuchWorker { id: WorkerId, workers: u32 },
    QueueFull { target: String },
    NoReadyWorker,
    DeadlineExceeded { target: String, deadline_ms: u64 },
    TargetExited { target: String },
    NoHandler { target: String, topic: String },
    AgentUnavailable { state: String },
    NotAWorker,
    InvalidTarget { target: String },
    ShuttingDown,
}

impl From<Refusal> for crate::Error {
    fn from(r: Refusal) -> Self {
        use crate::Error;
        match r {
            Refusal::NotRunning { target, state } => Error::NotRunning { target, state },
            Refusal::NoSuchWorker { id, workers } => Error::NoSuchWorker { id, workers },
            Refusal::QueueFull { target } => Error::QueueFull { target },
            Refusal::NoReadyWorker => Error::NoReadyWorker,
            Refusal::DeadlineExceeded { target, deadline_ms } => {
                Error::DeadlineExceeded { target, deadline: std::time::Duration::from_millis(deadline_ms) }
            }
            Refusal::TargetExited { target } => Error::TargetExited { target },
            Refusal::NoHandler { target, topic } => Error::NoHandler { target, topic },
            Refusal::AgentUnavailable { state } => Error::AgentUnavailable { state },
            Refusal::NotAWorker => Error::NotAWorker { what: "opening a link" },
            Refusal::InvalidTarget { target } => Error::InvalidTarget { target },
            Refusal::ShuttingDown => Error::ShuttingDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn child_messages_round_trip_through_the_codec() {
        let mut codec = MasterCodec::new();
        let mut buf = BytesMut::new();
        let msg = FromChild::Op {
            id: 7,
            op: Op::Send { to: Target::Worker(2), topic: "t".into(), payload: Bytes::from_static(b"x") },
        };
        codec.encode(&msg, &mut buf).unwrap();
        match codec.decode(&mut buf).unwrap() {
            Some(FromChild::Op { id: 7, op: Op::Send { to: Target::Worker(2), topic, payload } }) => {
                assert_eq!(topic, "t");
                assert_eq!(&payload[..], b"x");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A child cannot smuggle a sender into a message: the wire type has no
    /// such field, and a frame with an extra field does not decode.
    #[test]
    fn a_send_with_a_forged_sender_field_does_not_decode() {
        #[derive(Serialize)]
        enum Forged {
            Op { id: u64, op: ForgedOp },
        }
        #[derive(Serialize)]
        enum ForgedOp {
            Send { to: Target, topic: String, payload: Bytes, from: Origin },
        }
        let forged = Forged::Op {
            id: 1,
            op: ForgedOp::Send {
                to: Target::Agent,
                topic: "t".into(),
                payload: Bytes::new(),
                from: Origin::Master { pid: 1 },
            },
        };
        let mut codec = MasterCodec::new();
        let mut buf = BytesMut::new();
        codec.encode(&forged, &mut buf).unwrap();
        assert!(codec.decode(&mut buf).is_err(), "a frame carrying a sender must be refused");
    }
}
