//! One subscribed key as the driver keeps it: its last value, the feed its
//! handles read, how many handles share it, and where its subscription
//! stands at the current leader.

use crate::Error;
use crate::command::{SubscribeReply, SubscriptionParts};
use crate::feed::{Feed, RawUpdate};
use crate::remote::Remote;

#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) last: Option<RawUpdate>,
    /// The newest value and every handle's queue.
    pub(crate) feed: Feed,
    /// Live subscription handles (and callers waiting to get one).
    pub(crate) locals: usize,
    pub(crate) remote: Remote,
    pub(crate) waiters: Vec<SubscribeReply>,
    /// Resubscribed after a reconnect: the leader's first value may be the very
    /// value already delivered, under a new epoch; it is not delivered again.
    pub(crate) resynced: bool,
}

impl Drop for Topic {
    fn drop(&mut self) {
        // Its handles end once they have read what they hold.
        self.feed.close();
    }
}

impl Topic {
    pub(crate) fn parts(&self) -> SubscriptionParts {
        SubscriptionParts { first: self.last.clone(), reader: self.feed.reader() }
    }

    /// Answers the waiters; the ones whose caller gave up release their share.
    pub(crate) fn answer_waiters(&mut self, result: Result<(), Error>) {
        for reply in std::mem::take(&mut self.waiters) {
            let answer = result.clone().map(|()| self.parts());
            let succeeded = answer.is_ok();
            // A refused caller, or one that gave up, holds no share of the topic.
            if reply.send(answer).is_err() || !succeeded {
                self.locals -= 1;
            }
        }
    }
}
