//! The tandem Follower, and the one client handle every process uses.
//!
//! A [`Client<A>`] calls, subscribes and publishes on channel `A`. Behind it a
//! [`Connection`] (one per process, shared by all channels) and its [`Driver`]
//! task own the link to the leader: over the leader's Unix socket, over TCP on
//! loopback, through memory when this process is the leader, or relayed by the
//! cluster master. Calls carry deadlines and are cancelled at the leader when
//! their future is dropped; on a lost leader every call fails at once with
//! [`Error::LeaderLost`]; the driver reconnects with backoff and jitter and
//! resubscribes every key with its last seen (epoch, seq), so subscribers end
//! with the latest value, in order, never twice.
//!
//! ```text
//! Client<A> ──┐                         ┌── Unix socket ──> leader process
//! Client<B> ──┼─> Connection ─> Driver ─┼── memory (this process leads)
//! Subscription <─ a feed per key ───────┘── cluster relay (messenger)
//! ```
//!
//! [`Standalone`] elects a leader among processes that share a name and a
//! directory (flock, no master); [`UnixConnector`] and [`LocalConnector`] give
//! fixed roles (the cluster's workers and agent).
//!
//! ```no_run
//! use futures::StreamExt;
//! use tandem_follower::{Connection, UnixConnector};
//! # use serde::{Deserialize, Serialize};
//! # struct ConfigApi;
//! # impl tandem_protocol::Api for ConfigApi {
//! #     const NAME: &'static str = "config";
//! #     type Key = String; type Event = String; type Request = String; type Response = String;
//! # }
//! # async fn run() -> Result<(), tandem_follower::Error> {
//! let connection = Connection::builder()
//!     .channel::<ConfigApi>()
//!     .connect(UnixConnector::new("/run/user/1000/myapp/leader.sock"))
//!     .spawn();
//! let config = connection.client::<ConfigApi>();
//! config.ready().await?;
//! let value = config.invoke("db.url".to_string()).await?;
//! let mut flags = config.subscribe("feature.flags".to_string()).await?;
//! while let Some(update) = flags.next().await {
//!     println!("{} at {}:{}", update.value, update.epoch, update.seq);
//! }
//! # Ok(()) }
//! ```

mod client;
mod command;
mod config;
mod connection;
mod connector;
mod core;
mod deliveries;
mod driver;
mod election;
mod error;
mod feed;
mod handshake;
mod in_flight;
mod link_end;
mod mirror;
mod one;
mod remote;
mod shared;
mod slots;
mod state;
mod subscription;
mod topic;

pub use client::Client;
pub use config::{CallPath, Config};
pub use connection::{Connection, ConnectionBuilder, NewConnection};
pub use connector::{Connected, Connector, FnConnector, LocalConnector, TcpConnector, UnixConnector};
pub use deliveries::{DeliverOptions, Deliveries, Delivery};
pub use driver::Driver;
pub use election::{MAX_SOCKET_PATH, Role, Standalone};
pub use error::{Error, StartupError, StartupFailure};
pub use mirror::{Mirror, MirrorStatus, MirrorValue};
pub use state::{LinkState, State, Status};
pub use subscription::{Source, Subscription, Update};
