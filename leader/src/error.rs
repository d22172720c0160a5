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
    /// The last-known-good cache directory may be read or written by others.
    #[error(
        "refusing the cache directory {path}: mode {mode:o}, owner uid {owner}; it must belong to this user with mode 0700 (fix: chmod 700 {path})",
        path = path.display()
    )]
    InsecureCacheDirectory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        owner: u32,
    },
    /// The cache directory could not be created or read.
    #[error("cannot use the cache directory {}", path.display())]
    CacheDirectory {
        /// The directory.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// TCP has no peer credentials, so a token is mandatory.
    #[error("serving over TCP needs a token (peers cannot be identified by uid)")]
    TokenRequired,
}
