//! tandem's etcd upstream: a typed etcd client for the process that holds the
//! host's one upstream connection (the tandem Leader).
//!
//! [`EtcdClient`] wraps the `etcd-client` crate with what a long-lived, shared
//! connection needs:
//! - **one member at a time, failover across endpoints**: configured with
//!   several endpoints, it talks to one member over one TCP connection and moves
//!   on to the next when it fails; during a total outage calls fail at once with
//!   [`Error::Unavailable`] while it keeps trying in the background;
//! - **watches that never miss an event**: a [`Watch`] resumes from the revision
//!   after the last event it delivered, on whichever member is in use; if etcd
//!   compacted that revision away, it re-reads the range and says so with
//!   [`WatchEvent::Compacted`];
//! - **lease-based registration**: [`EtcdClient::register`] puts a JSON value under
//!   `/tandem/services/<service>/<id>` on a lease kept alive in the background;
//!   it vanishes when the process dies; [`EtcdClient::watch_service`] streams a
//!   service's instance list.
//!
//! The tandem root crate adapts it to the Leader's `Upstream` trait
//! (`tandem::etcd_upstream`, feature `etcd`). This crate does not depend on tandem.
//!
//! ```text
//!  Leader ── EtcdClient ──(one TCP connection)──> etcd member A      (endpoints A, B, C)
//!              │  get / put / delete ──────────>   │
//!              │  Watch from rev N <───events───── │  A dies
//!              │                                   X
//!              └──(next endpoint)──> member B: Watch from the last revision + 1,
//!                                    leases kept alive, calls served again
//! ```
//!
//! ```no_run
//! use futures::StreamExt;
//! use tandem_etcd::{EtcdClient, Config, Keys, Start, WatchEvent};
//!
//! # async fn run() -> Result<(), tandem_etcd::Error> {
//! let etcd = EtcdClient::connect(Config::from_list("http://127.0.0.1:2379,http://127.0.0.1:22379")).await?;
//! let revision = etcd.put("feature.flags", "on").await?;
//! let mut changes = etcd.watch(Keys::exact("feature.flags"), Start::Revision(revision + 1));
//! while let Some(event) = changes.next().await {
//!     match event {
//!         WatchEvent::Put(kv) => println!("{} = {} at {}", kv.key, kv.value_str(), kv.mod_revision),
//!         WatchEvent::Delete { key, .. } => println!("{key} deleted"),
//!         other => println!("re-read after a compaction: {other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```

mod client;
mod config;
mod connections;
mod error;
mod failover;
mod handle;
mod kv;
mod registration;
mod services;
mod watch;

pub use client::EtcdClient;
pub use config::{Config, Credentials, Tls};
pub use connections::{endpoint_addrs, established_connections};
pub use error::{Cause, Error};
pub use failover::ConnectionState;
pub use kv::{KeyValue, Keys, Snapshot};
pub use registration::Registration;
pub use services::ServiceWatch;
pub use watch::{Start, Watch, WatchEvent};
