//! The client's error type.

use std::io;
use std::sync::Arc;

use tandem_protocol::{CodecError, RemoteError};

/// Why a call to the registry, or a watch, failed.
///
/// Cheap to clone: a lost connection ends every in-flight call and every watch
/// with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry could not be reached.
    #[error("could not connect to the registry at {addr}")]
    Connect {
        /// The address that was tried.
        addr: String,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// The connection closed or failed; the call's outcome is unknown. Connect
    /// again (and resume watches from their last revision).
    #[error("the connection to the registry was lost")]
    ConnectionLost {
        /// What ended it, when known: an I/O or framing error, or the registry's
        /// goodbye ([`RemoteError`]).
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The registry refused the request.
    #[error("the registry refused the request")]
    Remote(#[source] RemoteError),
    /// The request could not be encoded within the frame limit; nothing was sent.
    #[error("the request does not fit in one frame")]
    RequestTooLarge(#[source] Arc<CodecError>),
    /// The watch's consumer fell more than [`crate::WATCH_BUFFER`] events behind, so
    /// the watch was cancelled. Watch again from the watch's last revision + 1.
    #[error("the watch fell behind and was cancelled")]
    Lagged,
    /// The registry answered with something that does not match the request.
    #[error("the registry sent an unexpected reply to `{op}`")]
    UnexpectedReply {
        /// The request's operation.
        op: &'static str,
    },
}

impl Error {
    /// Whether trying again (after reconnecting, for a lost connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectionLost { .. } | Error::Lagged => true,
            Error::Remote(e) => e.is_retryable(),
            Error::RequestTooLarge(_) | Error::UnexpectedReply { .. } => false,
        }
    }

    /// Whether the registry reported a deadline expiry.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Remote(e) if e.is_timeout())
    }

    /// Whether the connection is gone (every later call on the same client fails too).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::ConnectionLost { .. })
    }

    /// The registry's error, for [`Error::Remote`].
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn lost(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::ConnectionLost { source: Some(Arc::new(source)) }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Self {
        Error::Remote(e)
    }
}
