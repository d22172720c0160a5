//! tandem's bundled upstream: a small, real config center and service registry
//! served over TCP, its async [`RegistryClient`], and the `tandem-registry` CLI.
//!
//! It is the default upstream of tandem's examples and tests, so nothing external
//! is needed, and its [`Stats`] let a test prove that many processes share one
//! connection. **Everything is kept in memory: all keys, history, leases and
//! instances are lost when the server stops.**
//!
//! - Config center: `put` / `get` / `delete` of string keys with byte values, one
//!   global revision (1 when empty, plus one per mutation), watches of a key or a
//!   prefix that can start from an older revision (replayed from a bounded
//!   history, or a [`WatchEvent::Compacted`] snapshot when it is too old).
//! - Service registry: [`Instance`]s registered under a lease with a TTL, renewed
//!   by the client; an instance leaves when its lease expires or its connection
//!   closes. Discover a service, or watch its joins and leaves.
//! - Clients: [`RegistryClient`] is one connection and ends with it; [`Reconnecting`]
//!   reconnects by itself (backoff 20 ms to 2 s, its [`ConnectionState`] in a
//!   watch), resumes followed keys from their last revision (re-reading them
//!   from a server that restarted with less state), follows services and
//!   registers its instances again after every reconnect.
//! - Limits ([`Config`]) with clear errors; a peer that sends bytes that are not
//!   requests gets a `BadRequest` goodbye and is disconnected, and a watcher too
//!   slow to read its events is disconnected, without slowing anyone else.
//!
//! Frames are tandem-protocol's (u32 length prefix, MessagePack body). Every
//! connection opens with the server's hello ([`ServerInfo`]: its incarnation, a
//! UUID drawn at start, and its revision), so a client can tell a restarted,
//! emptier server from the one it knew. Requests are multiplexed by id over one
//! connection:
//!
//! ```text
//! RegistryClient (clones)        driver task                 Server: session          shared state
//!   | put("a", v)             |                             |                       |
//!   |------------------------>| Request{id 1, Put}          |                       |
//!   | watch(Prefix "a")       |---------------------------->| put ----------------->| revision 2
//!   |------------------------>| Request{id 2, Watch}        |                       |
//!   |                         |---------------------------->| add watcher --------->|
//!   |                         |        Reply{id 1, Ok(2)}   |                       |
//!   |<------------------------|<----------------------------|                       |
//!   |                         |  Reply{id 2, Watching},     |                       |
//!   |      Watch (a Stream)   |  Progress{watch 2, rev 2}   |                       |
//!   |<------------------------|<----------------------------|                       |
//!   |                         |      Event{watch 2, Put}    |   another client puts |
//!   |<------------------------|<----------------------------|<----------------------|
//! ```
//!
//! ```no_run
//! use futures::StreamExt;
//! use tandem_registry::{RegistryClient, Config, Server, WatchEvent, WatchSpec};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::bind("127.0.0.1:0", Config::default()).await?.spawn();
//! let client = RegistryClient::connect(server.local_addr()).await?;
//!
//! let revision = client.put("app/db.url", "postgres://db/app").await?;
//! let kv = client.get("app/db.url").await?.expect("just set");
//! assert_eq!((&kv.value[..], kv.mod_revision), (&b"postgres://db/app"[..], revision));
//!
//! let mut watch = client.watch(WatchSpec::prefix("app/"), Some(revision)).await?;
//! while let Some(event) = watch.next().await {
//!     match event? {
//!         WatchEvent::Put { key, value, revision } => println!("{revision} put {key} {value:?}"),
//!         WatchEvent::Delete { key, revision } => println!("{revision} delete {key}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod client;
pub mod code;
mod server;
mod wire;

pub use client::{
    ConnectionState, Error, FollowedKey, FollowedService, HELLO_TIMEOUT, KeyState, Reconnecting, Registration,
    RegistryClient, ServiceWatch, WATCH_BUFFER, Watch,
};
pub use server::{Config, RESERVED_FDS, SMALL_FRAME, Server, ServerHandle, default_max_connections, serve};
pub use wire::{Instance, KeyValue, ServerInfo, ServiceEvent, Stats, WatchEvent, WatchSpec};

// Re-exported so users need not depend on the same versions themselves
// (not inlined: their docs are their crates').
#[doc(no_inline)]
pub use bytes::Bytes;
pub use tandem_protocol::{ErrorKind, RemoteError};
#[doc(no_inline)]
pub use tokio_util::sync::CancellationToken;
