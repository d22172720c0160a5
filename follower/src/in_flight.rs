//! Requests sent to the current leader and not yet answered.

use bytes::Bytes;
use tandem_protocol::{PendingTable, RemoteError, RequestId};
use tokio::sync::oneshot;

use crate::Error;

/// What an outstanding request id stands for.
#[derive(Debug)]
pub(crate) enum Pending {
    /// A call; the caller waits on `reply`.
    Invoke(oneshot::Sender<Result<Bytes, Error>>),
    /// A publish; the caller waits on `reply`.
    Publish(oneshot::Sender<Result<(), Error>>),
    /// A (re)subscription of a topic.
    Subscribe { channel: &'static str, key: Bytes },
    /// An unsubscription; nobody waits.
    Unsubscribe,
}

impl Pending {
    /// Answers the caller waiting on it, if any, with `error`; returns the
    /// subscription it was.
    fn fail(self, error: &Error) -> Option<(&'static str, Bytes)> {
        match self {
            Pending::Invoke(reply) => {
                let _ = reply.send(Err(error.clone()));
            }
            Pending::Publish(reply) => {
                let _ = reply.send(Err(error.clone()));
            }
            Pending::Subscribe { channel, key } => return Some((channel, key)),
            Pending::Unsubscribe => {}
        }
        None
    }
}

/// The outstanding requests of one link. When the link dies every caller is
/// answered at once with [`Error::LeaderLost`]: no call outlives its link.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    pending: PendingTable<Pending>,
}

impl InFlight {
    /// Tracks request `id`. An id already in flight (never: ids come from one
    /// counter) keeps its request; this one's caller is answered with an error.
    pub(crate) fn insert(&mut self, id: RequestId, pending: Pending) {
        if let Err(refused) = self.pending.insert(id, pending) {
            tracing::error!(request.id = id, error = %refused, "request not tracked");
            let error = Error::Remote(RemoteError::internal(refused.to_string()));
            refused.into_value().fail(&error);
        }
    }

    pub(crate) fn remove(&mut self, id: RequestId) -> Option<Pending> {
        self.pending.remove(id)
    }

    /// Empties the table, answering every waiting caller with `error`; returns
    /// the subscriptions that were outstanding.
    pub(crate) fn fail_all(&mut self, error: &Error) -> Vec<(&'static str, Bytes)> {
        self.pending.drain().filter_map(|(_, pending)| pending.fail(error)).collect()
    }
}
