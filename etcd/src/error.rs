//! What can go wrong, from the caller's point of view.

use std::sync::Arc;
use std::time::Duration;

/// A failure cause shared by every call that failed for the same reason.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// The error of an [`EtcdClient`](crate::EtcdClient) call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No etcd member could serve the call: the one in use failed, or none
    /// answered in the last round over every endpoint. Retrying later may work;
    /// the client keeps looking for a member in the background.
    #[error("etcd is unavailable ({endpoints})")]
    Unavailable {
        /// The member(s) concerned.
        endpoints: String,
        /// The last failure seen, if any.
        #[source]
        source: Option<Cause>,
    },
    /// The call did not finish before its deadline.
    #[error("etcd did not answer within {0:?}")]
    DeadlineExceeded(Duration),
    /// etcd answered with an error (a bad request, a permission, a lease that
    /// does not exist, ...).
    #[error("etcd refused the request")]
    Refused(#[source] etcd_client::Error),
    /// A stored value could not be encoded or decoded as JSON.
    #[error("the value of {key} is not the expected JSON")]
    Json {
        /// The key concerned.
        key: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// etcd refused this client's user and password (or credentials were given
    /// to an etcd without auth). The client has stopped: retrying cannot help.
    /// A TLS problem (a member's certificate not signed by the configured CA,
    /// a client certificate the member refuses) is [`Error::Unavailable`] with
    /// the TLS error as its source: the client keeps trying the members.
    #[error("etcd refused the credentials: {reason}")]
    Unauthenticated {
        /// etcd's answer.
        reason: String,
    },
    /// The configuration cannot work (no endpoint, a malformed URL, a TLS
    /// setting that contradicts an endpoint's scheme, an unreadable PEM file).
    #[error("invalid etcd configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn unavailable(endpoints: impl Into<String>, source: Option<Cause>) -> Self {
        Error::Unavailable { endpoints: endpoints.into(), source }
    }

    /// Whether the same call may succeed later (etcd unreachable or slow).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::DeadlineExceeded(_))
    }

    /// Whether the call ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::DeadlineExceeded(_))
    }

    /// Whether no etcd member could serve the call.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// The message with its causes, `a: b: c`, for logs and for errors that
    /// cross a process boundary as text.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// Whether an etcd-client error means the member in use cannot serve us (the
/// connection broke, the member has no raft leader, it is shutting down), as
/// opposed to etcd refusing this particular request.
pub(crate) fn is_connection_error(error: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(status) => {
            matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal
            )
        }
        _ => false,
    }
}
