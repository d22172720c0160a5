//! The follower's settings.

use std::time::Duration;

/// How a follower connection behaves. Every field has a default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The deadline of a call made without one. The default is 5 seconds.
    pub default_deadline: Duration,
    /// How long [`Client::ready`](crate::Client::ready) waits for a first leader
    /// whose upstream is ready. The default is 30 seconds.
    pub max_wait: Duration,
    /// The first reconnect delay; it doubles up to `reconnect_max`, with
    /// jitter. Small, so a follower that lost an election finds the new leader
    /// within milliseconds. The default is 1 millisecond.
    pub reconnect_initial: Duration,
    /// The longest reconnect delay. The default is 1 second.
    pub reconnect_max: Duration,
    /// How long the leader may take to answer `Hello`. The default is 5 seconds.
    pub handshake_timeout: Duration,
    /// A leader that sends nothing (not even a ping: it sends one every
    /// heartbeat, 1 second by default) for this long is given up for hung and
    /// the follower reconnects; in standalone mode, a follower then takes the
    /// hung leader's place. Also how long a write to the leader may make no
    /// progress. The default is 5 seconds.
    pub peer_timeout: Duration,
    /// The secret to present in `Hello`, when the leader requires one. The default is none.
    pub token: Option<String>,
    /// Commands queued from handles to the driver before callers wait. The default is 1024.
    pub command_queue: usize,
    /// Values buffered per subscription for a slow local reader; past it the
    /// oldest are skipped (the newest is always kept). The default is 256.
    pub subscription_buffer: usize,
    /// How a call reaches the driver and its answer the caller. Both keep
    /// the same guarantees (deadline, cancel on drop, typed errors) and the
    /// same frames on the wire. The default is [`CallPath::Slots`] (it takes
    /// less CPU per call; measured side by side in `docs/performance.md`).
    pub calls: CallPath,
}

/// How a call reaches the connection's driver, and its answer the caller
/// (see `docs/performance.md`, "Two per-call paths").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CallPath {
    /// Each call is a command on the driver's queue (up to
    /// [`Config::command_queue`] before callers wait), kept in the driver's
    /// table of requests in flight, and answered through a oneshot channel.
    Queue,
    /// Each call takes a slot in a slab shared by the callers and the driver
    /// (the slot's index is the request id, so an answer finds its caller by
    /// indexing), appends itself to the driver's next batch and wakes it once
    /// per batch; the answer is left in the slot and the caller's waker woken.
    /// No queue, oneshot or map per call. Up to [`Config::command_queue`]
    /// calls wait for the driver before callers wait.
    #[default]
    Slots,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_deadline: Duration::from_secs(5),
            max_wait: Duration::from_secs(30),
            reconnect_initial: Duration::from_millis(1),
            reconnect_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(5),
            token: None,
            command_queue: 1024,
            subscription_buffer: 256,
            calls: CallPath::default(),
        }
    }
}
