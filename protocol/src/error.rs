//! The one error that crosses the wire.

use crate::ErrorCode;
use serde::{Deserialize, Serialize};

/// What kind of failure a [`RemoteError`] reports.
///
/// On the wire a kind is its name as a MessagePack string (`"DeadlineExceeded"`, ...).
/// A peer must treat a kind it does not know as [`ErrorKind::Internal`]; the
/// decoder does that for you.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The call's deadline passed before it finished.
    DeadlineExceeded,
    /// The service (leader or upstream) cannot serve now; retrying later may work.
    Unavailable,
    /// The peer refused the request (authentication, version, limits).
    Rejected,
    /// The upstream client returned an error.
    Upstream,
    /// The request was malformed or named something unknown.
    BadRequest,
    /// The call was cancelled by its caller.
    Cancelled,
    /// A bug or an unexpected condition on the remote side.
    #[serde(other)]
    Internal,
}

impl ErrorKind {
    /// The stable name used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::DeadlineExceeded => "DeadlineExceeded",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::Rejected => "Rejected",
            ErrorKind::Upstream => "Upstream",
            ErrorKind::BadRequest => "BadRequest",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::Internal => "Internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plain, serializable error: the only error type that crosses the wire.
///
/// `code` is a short machine-readable string chosen by whoever raised the error
/// (for example `"version"` or an upstream's own error code); it may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}{}", if code.is_empty() { String::new() } else { format!(" (code {code})") })]
pub struct RemoteError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// A machine-readable code; may be empty.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

impl RemoteError {
    /// A new error with an empty code.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RemoteError { kind, code: ErrorCode::NONE, message: message.into() }
    }

    /// Sets the machine-readable code: one of tandem's [`ErrorCode`]
    /// constants, a constant of your own ([`ErrorCode::named`]), or an
    /// upstream's code passed through ([`ErrorCode::upstream`]).
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        self.code = code;
        self
    }

    /// Whether the error carries this code (one of tandem's [`ErrorCode`](crate::ErrorCode)s,
    /// or an upstream's own, as a string).
    pub fn has_code(&self, code: impl AsRef<str>) -> bool {
        self.code == code.as_ref()
    }

    /// Shorthand for [`ErrorKind::DeadlineExceeded`].
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::DeadlineExceeded, message)
    }

    /// Shorthand for [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// Shorthand for [`ErrorKind::Rejected`].
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Rejected, message)
    }

    /// Shorthand for [`ErrorKind::Upstream`].
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Upstream, message)
    }

    /// Shorthand for [`ErrorKind::BadRequest`].
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::DeadlineExceeded)
    }

    /// Whether the error is a deadline expiry.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::DeadlineExceeded
    }
}

/// An error and its causes on one line (`outer: cause: root cause`), for logs
/// and the reasons peers are given.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
