//! Errors of starting and serving a leader.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the leader could not start serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path or address.
        path: String,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// The socket's directory may be entered by other users.
    #[error("refusing to serve in {path}: its mode {mode:o} lets other users in (want 0700, owned by this user)")]
    InsecureDirectory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A TCP address that is not loopback.
    #[error("refusing to serve on {0}: only loopback addresses are allowed")]
    NotLoopback(SocketAddr),
    /// TCP has no peer credentials, so a token is mandatory.
    #[error("serving over TCP needs a token (peers cannot be identified by uid)")]
    TokenRequired,
}
