//! tandem: many processes on one host share ONE long-lived upstream connection.
//!
//! One process — the Leader — holds the upstream client (a config center, a
//! service registry, any client with a session) and serves a local socket; every
//! other process runs a Follower that invokes and subscribes through it. The
//! same typed [`Client`] works in every process, whatever its role.
//!
//! ```text
//!                 upstream (etcd / the bundled registry / your service)
//!                            ^  one connection per host
//!                            |
//!  follower ──unix socket──> Leader ──> Upstream<A> (your client, built once)
//!  follower ──unix socket──>   │        N subscribers of a key = 1 upstream subscription
//!  leader's own process ─memory┘        values carry (epoch, seq)
//! ```
//!
//! Where to start:
//!
//! - [`Api`] names a channel and its types; [`Upstream`] wraps your client (it
//!   runs only in the Leader); [`Client`] calls and subscribes, in every process.
//! - Processes that elect their Leader among themselves: [`Standalone`] with a
//!   [`Connection`]. Fixed roles: a [`Leader`] serving a socket, followers with a
//!   [`UnixConnector`].
//! - A supervised master, agent (the Leader) and workers (the Followers):
//!   [`cluster::Cluster::builder`], with [`cluster_glue`] joining it to the
//!   Leader and the Followers.
//! - [`logging::init`] installs the log subscriber: without one, tandem's
//!   warnings and errors go nowhere.
//!
//! The member crates are re-exported whole, each with its own page:
//! [`protocol`] (the wire), [`leader`], [`follower`], [`cluster`] (master,
//! agent, workers, messenger) and, with the `registry` feature, [`registry`]
//! (the bundled config-center and registry server and its client).
//!
//! # Features
//!
//! The default build is the Leader, the Follower and the cluster runtime.
//!
//! | feature | adds |
//! |---|---|
//! | `registry` | the bundled registry's client (`tandem::registry`), its adapter (`tandem::registry_upstream`), the shared channels (`tandem::apis`) and `tandem::presence` |
//! | `axum` | `RoundRobinListener: axum::serve::Listener` ([`cluster::RoundRobinListener`]) |
//! | `metrics` | the master's Prometheus `/metrics` endpoint (`Cluster::builder(..).metrics(addr)`) |
//! | `etcd` | the etcd adapter (`tandem::etcd_upstream`; building it needs `protoc`); turns on `registry` |
//! | `redis` | the Redis adapter (`tandem::redis_upstream`); turns on `registry` |
//! | `cli` | the `tandem` command-line tool (`src/bin/tandem.rs`), `tandem run` included; turns on `registry` and `metrics` |
//!
//! # Example
//!
//! A whole program: a channel, an upstream (a counter standing in for your
//! client), and the same code in every process. Run twice at once, the first
//! process leads and the second follows it over the Unix socket.
//!
//! ```
//! use std::os::unix::fs::PermissionsExt;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! use tandem::{Api, CallContext, Connection, Events, RemoteError, Standalone, Upstream};
//!
//! /// The channel: its name and its types, shared by every process.
//! struct Counter;
//! impl Api for Counter {
//!     const NAME: &'static str = "counter";
//!     type Key = ();
//!     type Event = u64;
//!     type Request = u64; // add this much
//!     type Response = u64; // the new total
//! }
//!
//! /// The upstream: only the Leader runs it.
//! #[derive(Default)]
//! struct Total(AtomicU64);
//! impl Upstream<Counter> for Total {
//!     async fn invoke(&self, add: u64, _ctx: CallContext) -> Result<u64, RemoteError> {
//!         Ok(self.0.fetch_add(add, Ordering::SeqCst) + add)
//!     }
//!     async fn subscribe(&self, _key: ()) -> Result<Events<u64>, RemoteError> {
//!         Err(RemoteError::bad_request("nothing to subscribe to"))
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     tandem::logging::init(); // stderr, `RUST_LOG` (default `info`)
//!     // A private (0700) directory; in real life, e.g. $XDG_RUNTIME_DIR/myapp.
//!     let dir = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o700)).tempdir()?;
//!     let connector = Standalone::new("myapp", dir.path(), |leader| leader.channel(Total::default()));
//!     let connection = Connection::builder().connect(connector).spawn();
//!     let counter = connection.client::<Counter>();
//!     assert_eq!(counter.invoke(2).await?, 2);
//!     assert_eq!(counter.invoke(3).await?, 5);
//!     assert!(connection.is_leader()); // alone, it leads
//!     Ok(())
//! }
//! ```

#[cfg(feature = "registry")]
pub mod apis;
pub mod cluster_glue;
#[cfg(feature = "etcd")]
pub mod etcd_upstream;
pub mod logging;
#[cfg(feature = "registry")]
pub mod presence;
#[cfg(feature = "redis")]
pub mod redis_upstream;
#[cfg(feature = "registry")]
pub mod registry_upstream;

#[doc(inline)]
pub use tandem_cluster as cluster;
#[doc(inline)]
pub use tandem_follower as follower;
#[doc(inline)]
pub use tandem_leader as leader;
#[doc(inline)]
pub use tandem_protocol as protocol;
#[cfg(feature = "registry")]
#[doc(inline)]
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
#[cfg(doctest)]
mod doctests;
