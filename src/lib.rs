//! tandem: many processes on one host share ONE long-lived upstream connection.
//!
//! One process — the Leader — holds the upstream client (a config center, a
//! service registry, any client with a session) and serves a local socket; every
//! other process runs a Follower that invokes and subscribes through it. The
//! same typed [`Client`] works in every process, whatever its role.
//!
//! This crate re-exports the member crates:
//! [`protocol`] (the wire), [`leader`], [`follower`], [`cluster`] (master, agent,
//! workers, messenger) and [`registry`] (the bundled config-center and registry server).
//!
//! ```text
//!                 upstream (etcd / the bundled registry / your service)
//!                            ^  one connection per host
//!                            |
//!  follower ──unix socket──> Leader ──> Upstream<A> (your client, built once)
//!  follower ──unix socket──>   │        N subscribers of a key = 1 upstream subscription
//!  leader's own process ─memory┘        values carry (epoch, seq)
//! ```

pub mod apis;
pub mod cluster_glue;
#[cfg(feature = "etcd")]
pub mod etcd_upstream;
pub mod logging;
pub mod presence;
#[cfg(feature = "redis")]
pub mod redis_upstream;
pub mod registry_upstream;

pub use tandem_cluster as cluster;
pub use tandem_follower as follower;
pub use tandem_leader as leader;
pub use tandem_protocol as protocol;
pub use tandem_registry as registry;

pub use tandem_follower::{
    Client, Connection, Error, LocalConnector, Role, Source, Standalone, State, Status, Subscription, UnixConnector,
    Update,
};
pub use tandem_leader::{CallContext, EventSender, Events, Health, Leader, Upstream, health_from};
pub use tandem_protocol::{Api, ErrorCode, ErrorKind, RemoteError};

/// README.md's Rust examples, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
