//! A key's values in this process: the newest one, and a queue per
//! subscription handle, behind one lock shared by the driver and the handles.
//!
//! The driver publishes each value once (one lock, a push per handle, a wake
//! per waiting handle); a handle pops its own queue. A queue holds at most
//! `capacity` values: a reader further behind skips the oldest (counted), and
//! the newest is never lost. Queues grow with what is unread, so a key nobody
//! falls behind on costs no buffer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tandem_protocol::{Position, RemoteError};

/// One value of a subscription, still encoded.
#[derive(Debug, Clone)]
pub(crate) struct RawUpdate {
    pub(crate) position: Position,
    pub(crate) payload: Bytes,
    /// Served from the leader's last-known-good cache, not live.
    pub(crate) cached: bool,
}

/// The shared state of one topic (cheap to clone: a handle to it).
#[derive(Debug, Clone)]
pub(crate) struct Feed(Arc<Mutex<Shared>>);

#[derive(Debug)]
struct Shared {
    latest: Option<RawUpdate>,
    /// Why the leader ended the subscription.
    ended: Option<RemoteError>,
    /// The driver let go of the topic: the readers end once drained.
    closed: bool,
    capacity: usize,
    next_reader: u64,
    readers: Vec<Queue>,
}

#[derive(Debug)]
struct Queue {
    id: u64,
    values: VecDeque<RawUpdate>,
    skipped: u64,
    waker: Option<Waker>,
}

impl Feed {
    /// A feed whose readers each hold at most `capacity` unread values.
    pub(crate) fn new(capacity: usize) -> Feed {
        Feed(Arc::new(Mutex::new(Shared {
            latest: None,
            ended: None,
            closed: false,
            capacity: capacity.max(1),
            next_reader: 0,
            readers: Vec::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Every mutation is a single push, pop or assignment: a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new value: the newest, and queued for every reader.
    pub(crate) fn publish(&self, update: RawUpdate) {
        let mut shared = self.lock();
        let shared = &mut *shared;
        for reader in &mut shared.readers {
            if reader.values.len() >= shared.capacity {
                reader.values.pop_front();
                reader.skipped += 1;
            }
            reader.values.push_back(update.clone());
            if let Some(waker) = reader.waker.take() {
                waker.wake();
            }
        }
        shared.latest = Some(update);
    }

    /// Moves the newest value on without delivering it (a value re-announced by a new leader).
    pub(crate) fn set(&self, update: RawUpdate) {
        self.lock().latest = Some(update);
    }

    pub(crate) fn latest(&self) -> Option<RawUpdate> {
        self.lock().latest.clone()
    }

    /// The leader ended the subscription, and why.
    pub(crate) fn end(&self, error: RemoteError) {
        self.lock().ended = Some(error);
    }

    pub(crate) fn ended(&self) -> Option<RemoteError> {
        self.lock().ended.clone()
    }

    /// The driver let go of the topic: every reader ends after what it holds.
    pub(crate) fn close(&self) {
        let mut shared = self.lock();
        shared.closed = true;
        for reader in &mut shared.readers {
            if let Some(waker) = reader.waker.take() {
                waker.wake();
            }
        }
    }

    /// Whether both are the same topic's (a topic the leader ended and one
    /// made again for the same key have different ones).
    pub(crate) fn same(&self, other: &Feed) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A reader of the values published from now on.
    pub(crate) fn reader(&self) -> Reader {
        let mut shared = self.lock();
        let id = shared.next_reader;
        shared.next_reader += 1;
        shared.readers.push(Queue { id, values: VecDeque::new(), skipped: 0, waker: None });
        Reader { feed: self.clone(), id }
    }
}

/// One subscription handle's queue; dropping it removes the queue.
#[derive(Debug)]
pub(crate) struct Reader {
    feed: Feed,
    id: u64,
}

impl Reader {
    pub(crate) fn feed(&self) -> &Feed {
        &self.feed
    }

    /// The next value, `None` once the feed is closed and this queue drained.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<RawUpdate>> {
        let mut shared = self.feed.lock();
        let closed = shared.closed;
        let Some(queue) = shared.readers.iter_mut().find(|q| q.id == self.id) else {
            return Poll::Ready(None);
        };
        match queue.values.pop_front() {
            Some(update) => Poll::Ready(Some(update)),
            None if closed => Poll::Ready(None),
            None => {
                if !queue.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    queue.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// Values this reader skipped because it fell more than the capacity behind.
    pub(crate) fn skipped(&self) -> u64 {
        self.feed.lock().readers.iter().find(|q| q.id == self.id).map_or(0, |q| q.skipped)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.feed.lock().readers.retain(|q| q.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn update(seq: u64) -> RawUpdate {
        RawUpdate { position: Position { epoch: 1, seq }, payload: Bytes::from(seq.to_string()), cached: false }
    }

    fn next(reader: &Reader) -> Poll<Option<u64>> {
        reader.poll_next(&mut Context::from_waker(Waker::noop())).map(|u| u.map(|u| u.position.seq))
    }

    #[test]
    fn each_reader_gets_what_was_published_after_it_came_in_order() {
        let feed = Feed::new(8);
        feed.publish(update(1));
        let (a, b) = (feed.reader(), feed.reader());
        feed.publish(update(2));
        feed.publish(update(3));
        assert_eq!((next(&a), next(&a), next(&a)), (Poll::Ready(Some(2)), Poll::Ready(Some(3)), Poll::Pending));
        assert_eq!(next(&b), Poll::Ready(Some(2)));
        assert_eq!(feed.latest().map(|u| u.position.seq), Some(3));
    }

    #[test]
    fn a_reader_behind_skips_the_oldest_and_keeps_the_newest() {
        let feed = Feed::new(2);
        let reader = feed.reader();
        for seq in 1..=5 {
            feed.publish(update(seq));
        }
        assert_eq!(reader.skipped(), 3);
        assert_eq!((next(&reader), next(&reader)), (Poll::Ready(Some(4)), Poll::Ready(Some(5))));
    }

    #[test]
    fn closed_readers_end_after_what_they_hold_and_dropped_ones_leave() {
        let feed = Feed::new(4);
        let (a, b) = (feed.reader(), feed.reader());
        feed.publish(update(1));
        drop(b);
        assert_eq!(feed.lock().readers.len(), 1);
        feed.close();
        assert_eq!((next(&a), next(&a)), (Poll::Ready(Some(1)), Poll::Ready(None)));
    }
}
