//! What can go wrong for a caller.

use std::time::Duration;

use tandem_protocol::{ErrorKind, RemoteError};

/// Why a call, subscription or publish did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The deadline passed first; the call was cancelled at the leader.
    #[error("no answer within the {0:?} deadline")]
    DeadlineExceeded(Duration),
    /// There is no leader right now (it died, or is being replaced); retry later.
    #[error("the leader was lost")]
    LeaderLost,
    /// No leader with a ready upstream appeared within the wait.
    #[error("no ready leader within {0:?}")]
    NotReady(Duration),
    /// The leader or its upstream answered with an error.
    #[error("the leader answered with an error")]
    Remote(#[source] RemoteError),
    /// The handle was closed.
    #[error("the client is closed")]
    Closed,
}

impl Error {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::DeadlineExceeded(_) | Error::LeaderLost | Error::NotReady(_) => true,
            Error::Remote(e) => e.is_retryable(),
            Error::Closed => false,
        }
    }

    /// Whether the error is a deadline expiry (here or at the leader).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::DeadlineExceeded(_) => true,
            Error::Remote(e) => e.kind == ErrorKind::DeadlineExceeded,
            _ => false,
        }
    }

    /// The remote error, if the leader sent one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Self {
        Error::Remote(e)
    }
}
