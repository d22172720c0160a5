//! Requests sent to the current leader and not yet answered.

use std::collections::HashMap;

use bytes::Bytes;
use tandem_protocol::RequestId;
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

/// The outstanding requests of one link. When the link dies every caller is
/// answered at once with [`Error::LeaderLost`]: no call outlives its link.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    pending: HashMap<RequestId, Pending>,
}

impl InFlight {
    pub(crate) fn insert(&mut self, id: RequestId, pending: Pending) {
        self.pending.insert(id, pending);
    }

    pub(crate) fn remove(&mut self, id: RequestId) -> Option<Pending> {
        self.pending.remove(&id)
    }

    /// Empties the table, answering every waiting caller with `error`; returns
    /// the subscriptions that were outstanding.
    pub(crate) fn fail_all(&mut self, error: &Error) -> Vec<(&'static str, Bytes)> {
        let mut subscriptions = Vec::new();
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::Invoke(reply) => {
                    let _ = reply.send(Err(error.clone()));
                }
                Pending::Publish(reply) => {
                    let _ = reply.send(Err(error.clone()));
                }
                Pending::Subscribe { channel, key } => subscriptions.push((channel, key)),
                Pending::Unsubscribe => {}
            }
        }
        subscriptions
    }
}
