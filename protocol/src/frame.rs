//! The frames of the Leader/Follower protocol.
//!
//! Every frame is one variant of [`Frame`]. On the wire a frame is a MessagePack
//! map with one entry: the variant name (a string) mapped to an array of the
//! variant's fields in declaration order. `PROTOCOL.md` spells out every byte.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ChannelName, RemoteError};

/// A request identifier, unique among one connection's outstanding requests.
pub type RequestId = u64;

/// Where a value sits in a subscription's history: the leader epoch that
/// produced it, then its sequence number within that epoch (from 1).
///
/// Positions order lexicographically: every value of a later epoch is newer
/// than every value of an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The epoch of the leader that delivered the value.
    pub epoch: u64,
    /// The value's sequence number within the epoch, starting at 1.
    pub seq: u64,
}

/// Follower → Leader, first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the follower speaks ([`crate::PROTOCOL_VERSION`]).
    pub version: u16,
    /// A random id naming this follower process for its lifetime.
    pub peer_id: Uuid,
    /// The follower's process id (informational; the leader trusts the kernel's).
    pub pid: u32,
    /// The channels (API names) this connection will use.
    pub channels: Vec<String>,
    /// The cluster's shared secret, when the leader requires one.
    pub token: Option<String>,
}

/// Leader → Follower: the handshake succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the leader will speak on this connection.
    pub version: u16,
    /// A random id naming the leader for its lifetime.
    pub leader_id: Uuid,
    /// The leader's epoch: strictly greater than any earlier leader's of the same name.
    pub epoch: u64,
    /// The leader's process id.
    pub pid: u32,
    /// How often, in milliseconds, each side should send a `Ping` when idle.
    pub heartbeat_ms: u32,
}

/// Leader → Follower: the handshake failed; the leader closes the connection next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The newest protocol version the leader speaks.
    pub version: u16,
    /// Why (kind `Rejected`; code `version`, `token`, `uid`, `channel`, ...).
    pub error: RemoteError,
}

/// Follower → Leader: call the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoke {
    /// Matches the `Response`; unused (but still unique) when `oneway`.
    pub id: RequestId,
    /// The channel (API name) the call belongs to.
    pub channel: ChannelName,
    /// Time left for the call, in milliseconds, counted from when the leader reads the frame.
    pub deadline_ms: u32,
    /// When true, the leader sends no `Response`.
    pub oneway: bool,
    /// The request: opaque MessagePack bytes of the channel's request type.
    pub payload: Bytes,
}

/// Leader → Follower: the outcome of an `Invoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The `Invoke`'s id.
    pub id: RequestId,
    /// The response payload (opaque MessagePack bytes), or the error.
    pub result: Result<Bytes, RemoteError>,
}

/// Follower → Leader: start receiving events of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Matches the `Ack`.
    pub id: RequestId,
    /// The channel.
    pub channel: ChannelName,
    /// The key: opaque MessagePack bytes of the channel's key type.
    pub key: Bytes,
    /// The newest position this follower has already seen for the key, if any.
    /// The leader sends its cached value only if it is newer.
    pub last_seen: Option<Position>,
}

/// Follower → Leader: stop receiving events of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribe {
    /// Matches the `Ack`.
    pub id: RequestId,
    /// The channel.
    pub channel: ChannelName,
    /// The key, byte-for-byte as subscribed.
    pub key: Bytes,
}

/// Leader → Follower: a value of a subscribed key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The channel.
    pub channel: ChannelName,
    /// The key, byte-for-byte as subscribed.
    pub key: Bytes,
    /// The leader epoch.
    pub epoch: u64,
    /// The sequence number within the epoch.
    pub seq: u64,
    /// The value: opaque MessagePack bytes of the channel's event type.
    pub payload: Bytes,
    /// True when the leader served this value from its last-known-good cache
    /// on disk because the upstream was unreachable, false for a live value.
    /// On the wire an optional 6th element, written only when true, so a live
    /// event is byte-for-byte the 5-element form (PROTOCOL.md §4).
    #[serde(default, skip_serializing_if = "is_false")]
    pub cached: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Event {
    /// The event's position.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, seq: self.seq }
    }
}

/// Follower → Leader: publish something through the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// Matches the `Ack`.
    pub id: RequestId,
    /// The channel.
    pub channel: ChannelName,
    /// What to publish: opaque MessagePack bytes of the channel's request type.
    pub payload: Bytes,
}

/// Leader → Follower: the outcome of a `Subscribe`, `Unsubscribe` or `Publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The request's id.
    pub id: RequestId,
    /// Success, or why not.
    pub result: Result<(), RemoteError>,
}

/// Leader → Follower: the leader ended this follower's subscription of a key
/// (the upstream refused it after it had been acknowledged as pending). No
/// more `Event`s follow for it; subscribing again is a new `Subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// The channel.
    pub channel: ChannelName,
    /// The key, byte-for-byte as subscribed.
    pub key: Bytes,
    /// Why.
    pub error: RemoteError,
}

/// Follower → Leader (version 2): start a deliver-to-one subscription of a key.
///
/// Each event of the key goes to ONE live deliver-to-one subscriber of it
/// (across every follower of the leader), which settles it (`Settle`). The
/// subscription lasts until the follower sends `Cancel(id)` or the connection
/// ends; its `Delivery` frames name it by `id`. No cached value is replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeOne {
    /// Matches the `Ack`, names the subscription in `Delivery`, `Settle` and `Cancel`.
    pub id: RequestId,
    /// The channel.
    pub channel: ChannelName,
    /// The key: opaque MessagePack bytes of the channel's key type.
    pub key: Bytes,
    /// The most deliveries this subscription holds unsettled at once (0: the
    /// leader's default); the leader caps it at its own maximum.
    pub window: u32,
    /// How long, in milliseconds, a delivery may stay unsettled before the
    /// leader gives it to another subscriber (0: the leader's default).
    pub ack_timeout_ms: u32,
}

/// Leader → Follower (version 2): one event of a deliver-to-one subscription,
/// given to this subscriber only until it is settled or its ack timeout passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The `SubscribeOne` id of the subscription it is for.
    pub sub: RequestId,
    /// Names this delivery in `Settle`; unique within the subscription's key at this leader.
    pub tag: u64,
    /// The leader epoch.
    pub epoch: u64,
    /// The event's sequence number within the epoch (a redelivery keeps it).
    pub seq: u64,
    /// The value: opaque MessagePack bytes of the channel's event type.
    pub payload: Bytes,
    /// True when the event was given to a subscriber before (which did not
    /// settle it in time, released it, or went away): it may have been processed.
    pub redelivered: bool,
}

/// Follower → Leader (version 2): deliveries of one subscription are done with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settle {
    /// The `SubscribeOne` id.
    pub sub: RequestId,
    /// Tags processed: the leader forgets them.
    pub acked: Vec<u64>,
    /// Tags given back unprocessed: the leader redelivers them (to another subscriber when there is one).
    pub released: Vec<u64>,
}

/// One key as a mirror holds it (version 3): what a standby needs to serve
/// the key at once if it takes over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorEntry {
    /// The channel.
    pub channel: ChannelName,
    /// The key: opaque MessagePack bytes of the channel's key type.
    pub key: Bytes,
    /// The epoch of the leader that produced the value.
    pub epoch: u64,
    /// The value's sequence number within the epoch.
    pub seq: u64,
    /// The value: opaque MessagePack bytes of the channel's event type.
    pub payload: Bytes,
    /// The upstream's resume point for the key (its revision of the value),
    /// when the upstream gives one.
    pub revision: Option<u64>,
}

impl MirrorEntry {
    /// The value's position.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, seq: self.seq }
    }
}

/// A key the leader stopped following (version 3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MirrorKey {
    /// The channel.
    pub channel: ChannelName,
    /// The key, byte for byte.
    pub key: Bytes,
}

/// Leader → Follower (version 3): a batch of a mirror's snapshot, or an update.
///
/// After `Ack` of a `Mirror`, the leader sends the snapshot of every key it
/// follows (whoever subscribed it) as `Mirrored` frames of at most
/// [`MIRROR_BATCH_ENTRIES`] entries (and at most [`MIRROR_BATCH_BYTES`]) each,
/// `synced` false except on the last one; from then on each new value of a
/// key, and each key the leader stops following, is one more `Mirrored`
/// (`synced` true). A key appears at most once per frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirrored {
    /// New or current values.
    pub entries: Vec<MirrorEntry>,
    /// Keys the leader no longer follows: the mirror forgets them.
    pub removed: Vec<MirrorKey>,
    /// True once the snapshot is complete (its last frame and every update).
    pub synced: bool,
}

/// The most entries a leader puts in one [`Mirrored`] frame.
pub const MIRROR_BATCH_ENTRIES: usize = 256;

/// The most bytes of entries a leader puts in one [`Mirrored`] frame (1 MiB,
/// or less when its frame limit is lower), counting each entry's channel
/// name, key, payload and a fixed overhead; one larger entry goes alone.
pub const MIRROR_BATCH_BYTES: usize = 1 << 20;

/// The state of a channel's upstream client in the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum UpstreamState {
    /// The upstream client is being built.
    Starting,
    /// The upstream client is ready for calls.
    Ready,
    /// The upstream client failed or is unreachable.
    Down(RemoteError),
}

/// Leader → Follower: a channel's upstream state (sent after `Welcome` and on every change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// The channel.
    pub channel: ChannelName,
    /// Its upstream's state.
    pub state: UpstreamState,
}

/// One message of the Leader/Follower protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Frame {
    /// Follower → Leader: handshake.
    Hello(Hello),
    /// Leader → Follower: handshake accepted.
    Welcome(Welcome),
    /// Leader → Follower: handshake refused.
    Reject(Reject),
    /// Follower → Leader: call.
    Invoke(Invoke),
    /// Leader → Follower: a call's outcome.
    Response(Response),
    /// Follower → Leader: abandon the call with this id (no `Response` follows).
    Cancel(RequestId),
    /// Follower → Leader: subscribe.
    Subscribe(Subscribe),
    /// Follower → Leader: unsubscribe.
    Unsubscribe(Unsubscribe),
    /// Leader → Follower: a subscribed value.
    Event(Event),
    /// Follower → Leader: publish.
    Publish(Publish),
    /// Leader → Follower: outcome of a subscribe, unsubscribe or publish.
    Ack(Ack),
    /// Leader → Follower: a channel's upstream state.
    Status(ChannelStatus),
    /// Either way: liveness probe carrying an opaque nonce.
    Ping(u64),
    /// Either way: answer to `Ping`, echoing its nonce.
    Pong(u64),
    /// Either way: the sender is closing the connection on purpose, and why.
    Goodbye(String),
    /// Follower → Leader: more channels this connection will use, after `Hello`
    /// (a client of another channel was asked for). The leader answers a
    /// `Status` for each: a channel it does not serve is `Down` with code `channel`.
    Open(Vec<String>),
    /// Leader → Follower: a subscription ended by the leader, and why.
    Ended(Ended),
    /// Follower → Leader (version 2): a deliver-to-one subscription.
    SubscribeOne(SubscribeOne),
    /// Leader → Follower (version 2): an event for one deliver-to-one subscriber.
    Delivery(Delivery),
    /// Follower → Leader (version 2): deliveries acked or released.
    Settle(Settle),
    /// Follower → Leader (version 3): mirror every key the leader follows
    /// (a standby); answered by `Ack` with this id, then `Mirrored` frames.
    Mirror(RequestId),
    /// Leader → Follower (version 3): a mirror's snapshot batch or update.
    Mirrored(Mirrored),
}

impl Frame {
    /// About how many bytes the frame takes on the wire, its length prefix
    /// included: its payload, channel and key, and room for the rest (to size
    /// a buffer; not a bound).
    pub(crate) fn size_hint(&self) -> usize {
        const HEAD: usize = 64;
        HEAD + match self {
            Frame::Invoke(invoke) => invoke.channel.len() + invoke.payload.len(),
            Frame::Response(Response { result: Ok(payload), .. }) => payload.len(),
            Frame::Event(event) => event.channel.len() + event.key.len() + event.payload.len(),
            Frame::Delivery(delivery) => delivery.payload.len(),
            Frame::Settle(settle) => 9 * (settle.acked.len() + settle.released.len()),
            Frame::Mirrored(mirrored) => {
                let entries: usize =
                    mirrored.entries.iter().map(|e| 40 + e.channel.len() + e.key.len() + e.payload.len()).sum();
                entries + mirrored.removed.iter().map(|r| 8 + r.channel.len() + r.key.len()).sum::<usize>()
            }
            _ => 0,
        }
    }

    /// The variant name, as written on the wire and in logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Reject(_) => "Reject",
            Frame::Invoke(_) => "Invoke",
            Frame::Response(_) => "Response",
            Frame::Cancel(_) => "Cancel",
            Frame::Subscribe(_) => "Subscribe",
            Frame::Unsubscribe(_) => "Unsubscribe",
            Frame::Event(_) => "Event",
            Frame::Publish(_) => "Publish",
            Frame::Ack(_) => "Ack",
            Frame::Status(_) => "Status",
            Frame::Ping(_) => "Ping",
            Frame::Pong(_) => "Pong",
            Frame::Goodbye(_) => "Goodbye",
            Frame::Open(_) => "Open",
            Frame::Ended(_) => "Ended",
            Frame::SubscribeOne(_) => "SubscribeOne",
            Frame::Delivery(_) => "Delivery",
            Frame::Settle(_) => "Settle",
            Frame::Mirror(_) => "Mirror",
            Frame::Mirrored(_) => "Mirrored",
        }
    }
}
