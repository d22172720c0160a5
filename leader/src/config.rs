//! The leader's settings.

use std::time::Duration;

/// How a leader treats its followers. Every field has a default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long a new connection may take to send its `Hello`; then it is closed
    /// (logged at WARN). The default is 5 seconds.
    pub handshake_timeout: Duration,
    /// The most connections between `accept` and an accepted `Hello` at once,
    /// across the Leader's listeners. When all are taken, the accept loops wait
    /// (new connections stay in the listen backlog) until a handshake finishes
    /// or times out; the wait is logged at WARN, at most once every 10 seconds.
    /// The default is 128.
    pub max_handshakes: usize,
    /// The largest frame body a peer may send before its `Hello` is accepted
    /// (the `Hello` is a few hundred bytes). A first frame that announces more
    /// is refused as soon as its length prefix arrives, with a `Reject` (code
    /// `frame_too_large`), and at most this many bytes (plus the prefix) are read
    /// from a peer before its `Hello` is accepted. With
    /// [`max_handshakes`](Config::max_handshakes), this bounds what
    /// unauthenticated peers can make the Leader hold (about
    /// `max_handshakes × (max_hello_length + 64 KiB)`, 16 MiB by default).
    /// The default is 64 KiB.
    pub max_hello_length: usize,
    /// How often each side pings (announced to followers in `Welcome`). The default is 1 second.
    pub heartbeat_interval: Duration,
    /// A follower that sends nothing (not even a ping) for this long is dropped.
    /// Followers ping on their own timer, independent of calls in flight, so a
    /// long call never looks like a dead peer, and a peer stalled for a few
    /// seconds (a debugger, a CPU spike) is not dropped. The default is 15 seconds.
    pub peer_timeout: Duration,
    /// The most replies and control frames queued to one follower; past it the
    /// follower is disconnected as too slow. Events do not count (see
    /// [`max_queued_events`](Config::max_queued_events)); a mirror's updates
    /// do, at most one per key (a newer one replaces it). The default is 8192.
    pub max_queued_frames: usize,
    /// The most events queued to one follower in publish order, every one
    /// delivered. Past it the follower is behind: further events are conflated
    /// per key (a newer value replaces the key's pending one; the newest value
    /// is never lost), so a follower that stops reading costs at most this many
    /// queued events plus one per key. Counted in `Stats::conflated_events`; an
    /// upstream that can wait uses [`EventSender::ready`](crate::EventSender::ready)
    /// to pace itself instead. The default is 1024.
    pub max_queued_events: usize,
    /// A follower whose socket accepts no bytes for this long is disconnected. The default is 10 seconds.
    pub write_stall_timeout: Duration,
    /// The most calls one follower may have in flight; more are rejected. The default is 4096.
    pub max_in_flight: usize,
    /// The largest frame accepted or sent once a follower is admitted (see
    /// [`max_hello_length`](Config::max_hello_length) before). A larger length
    /// prefix ends the session before anything is buffered; a frame within the
    /// limit is buffered as its bytes arrive, so an admitted follower (a process
    /// of the same user holding the token) can make the Leader hold up to this
    /// much per connection, and the read buffer keeps the capacity of the
    /// largest frame it read. The default is 16 MiB.
    pub max_frame_length: usize,
    /// The longest an upstream subscribe (until it returns its stream) or publish may take before
    /// it counts as failed (a hung upstream must not block a key forever).
    /// The default is 30 seconds.
    pub upstream_timeout: Duration,
    /// The first delay before rebuilding an upstream that failed to build (with
    /// [`LeaderBuilder::channel_with_retry`](crate::LeaderBuilder::channel_with_retry)),
    /// and before retrying an upstream subscribe that failed for subscribers
    /// already acknowledged; it doubles up to `upstream_retry_max`. The default is 100 ms.
    pub upstream_retry_initial: Duration,
    /// The longest of those delays. The default is 5 seconds.
    pub upstream_retry_max: Duration,
    /// On shutdown, how long sessions get to flush their `Goodbye`. The default is 2 seconds.
    pub shutdown_grace: Duration,
    /// Deliver-to-one: the most undelivered events kept per key while no
    /// subscriber of the key has room (none subscribed, or all at their
    /// window). Past it a new event is dropped: logged at WARN and counted in
    /// `Stats::undelivered_dropped`. An upstream that awaits
    /// [`EventSender::ready`](crate::EventSender::ready) waits instead of
    /// losing events. The default is 10 000.
    pub deliver_queue: usize,
    /// Deliver-to-one: how many unsettled deliveries a subscription holds at
    /// once when it does not say. The default is 256.
    pub deliver_window: usize,
    /// Deliver-to-one: the largest window a subscription may ask for (larger
    /// ones are capped). Deliveries count against
    /// [`max_queued_frames`](Config::max_queued_frames) while queued to a
    /// follower. The default is 1024.
    pub deliver_max_window: usize,
    /// Deliver-to-one: how long a delivery may stay unsettled before it is
    /// given to another subscriber, marked redelivered, when the subscription
    /// does not say. The default is 30 seconds.
    pub deliver_ack_timeout: Duration,
    /// How long a key seeded from a mirror ([`LeaderBuilder::seed`](crate::LeaderBuilder::seed))
    /// stays followed upstream with no subscriber: the followers of the old
    /// leader resubscribe meanwhile; a key none of them wants by then is
    /// released. The default is 10 seconds.
    pub seed_hold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 128,
            max_hello_length: 64 * 1024,
            heartbeat_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(15),
            max_queued_frames: 8192,
            max_queued_events: 1024,
            write_stall_timeout: Duration::from_secs(10),
            max_in_flight: 4096,
            max_frame_length: tandem_protocol::DEFAULT_MAX_FRAME_LENGTH,
            upstream_timeout: Duration::from_secs(30),
            upstream_retry_initial: Duration::from_millis(100),
            upstream_retry_max: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            deliver_queue: 10_000,
            deliver_window: 256,
            deliver_max_window: 1024,
            deliver_ack_timeout: Duration::from_secs(30),
            seed_hold: Duration::from_secs(10),
        }
    }
}
