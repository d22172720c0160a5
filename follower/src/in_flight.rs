//! Requests sent to the current leader and not yet answered.

use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::internal::{Expires, PendingTable};
use tandem_protocol::{RemoteError, RequestId};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::Error;

/// What an outstanding request id stands for.
#[derive(Debug)]
pub(crate) enum Pending {
    /// A call; the caller waits on `reply` until `deadline`, when the driver
    /// answers it with [`Error::DeadlineExceeded`] (carrying `budget`, the
    /// time the caller gave it).
    Invoke { reply: oneshot::Sender<Result<Bytes, Error>>, deadline: Instant, budget: Duration },
    /// A publish; the caller waits on `reply`.
    Publish(oneshot::Sender<Result<(), Error>>),
    /// A (re)subscription of a topic.
    Subscribe { channel: &'static str, key: Bytes },
    /// An unsubscription; nobody waits.
    Unsubscribe,
    /// A deliver-to-one (re)subscription of the handle `local`.
    SubscribeOne { local: u64 },
    /// The connection's `Mirror` (its callers wait in the core's mirror).
    Mirror,
}

impl Pending {
    /// Answers the caller waiting on it, if any, with `error`; returns the
    /// subscription it was.
    fn fail(self, error: &Error) -> Option<(&'static str, Bytes)> {
        match self {
            Pending::Invoke { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            Pending::Publish(reply) => {
                let _ = reply.send(Err(error.clone()));
            }
            Pending::Subscribe { channel, key } => return Some((channel, key)),
            Pending::Unsubscribe | Pending::SubscribeOne { .. } | Pending::Mirror => {}
        }
        None
    }
}

impl Expires for Pending {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Pending::Invoke { deadline, .. } => Some(*deadline),
            _ => None,
        }
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
        if let Err(refused) = self.pending.insert_expiring(id, pending) {
            tracing::error!(request.id = id, error = %refused, "request not tracked");
            let error = Error::Remote(RemoteError::internal(refused.to_string()));
            refused.into_value().fail(&error);
        }
    }

    pub(crate) fn remove(&mut self, id: RequestId) -> Option<Pending> {
        self.pending.remove(id)
    }

    /// When the earliest call in flight expires.
    pub(crate) fn earliest_deadline(&mut self) -> Option<Instant> {
        self.pending.earliest_deadline()
    }

    /// Answers the calls whose deadline is at or before `now` with
    /// [`Error::DeadlineExceeded`]; `expired` gets their ids (to cancel them at
    /// the leader).
    pub(crate) fn expire(&mut self, now: Instant, expired: &mut Vec<RequestId>) {
        for (id, pending) in self.pending.take_expired(now) {
            if let Pending::Invoke { reply, budget, .. } = pending {
                let _ = reply.send(Err(Error::DeadlineExceeded(budget)));
            }
            expired.push(id);
        }
    }

    /// Empties the table, answering every waiting caller with `error`; returns
    /// the subscriptions that were outstanding.
    pub(crate) fn fail_all(&mut self, error: &Error) -> Vec<(&'static str, Bytes)> {
        self.pending.drain().filter_map(|(_, pending)| pending.fail(error)).collect()
    }
}
