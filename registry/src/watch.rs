//! Watches: what to watch, the events a watch yields, and the client-side
//! streams ([`Watch`], [`ServiceWatch`]) that cancel the server-side watch on drop.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::task::AtomicWaker;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::Error;
use crate::services::ServiceEvent;
use crate::wire::RequestId;

/// Events a watch buffers on the client side before the watch is cancelled with
/// [`Error::Lagged`]: more than the server's default history, so a full replay fits.
pub const WATCH_BUFFER: usize = 16 * 1024;

/// Which keys a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WatchSpec {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this prefix (the empty prefix matches every key).
    Prefix(String),
}

impl WatchSpec {
    /// Watch exactly `key`.
    pub fn key(key: impl Into<String>) -> Self {
        WatchSpec::Key(key.into())
    }

    /// Watch every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        WatchSpec::Prefix(prefix.into())
    }

    /// Whether a change of `key` belongs to this watch.
    pub fn matches(&self, key: &str) -> bool {
        match self {
            WatchSpec::Key(k) => k == key,
            WatchSpec::Prefix(p) => key.starts_with(p.as_str()),
        }
    }

    /// The key or prefix.
    pub fn as_str(&self) -> &str {
        match self {
            WatchSpec::Key(s) | WatchSpec::Prefix(s) => s,
        }
    }
}

/// A change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WatchEvent {
    /// `key` was set to `value` by the mutation with this revision.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Bytes,
        /// The revision of the mutation (for snapshot entries, the key's mod revision).
        revision: u64,
    },
    /// `key` was deleted by the mutation with this revision.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: u64,
    },
    /// The watch asked for changes older than the server's history keeps, or
    /// started beyond the server's next revision (then `compact_revision` is the
    /// start minus one and is above `revision`: the watcher's revisions come from
    /// an earlier incarnation of a server that restarted with less state).
    ///
    /// Changes up to `compact_revision` are gone. What follows is a snapshot: one
    /// `Put` per matching key with its value as of `revision` (drop any state you
    /// hold for the watched keys and rebuild it from these), then the changes after
    /// `revision`, as usual.
    Compacted {
        /// The newest revision the history no longer holds.
        compact_revision: u64,
        /// The revision of the snapshot that follows.
        revision: u64,
    },
}

impl WatchEvent {
    /// The event's revision (for `Compacted`, the snapshot's revision).
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Compacted { revision, .. } => *revision,
        }
    }

    /// The changed key (empty for `Compacted`).
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
            WatchEvent::Compacted { .. } => "",
        }
    }
}

/// What the connection's reader hands to one watch.
#[derive(Debug)]
pub(crate) enum Item<T> {
    /// An event for the user.
    Event(T),
    /// Every change up to this revision has been delivered (sent when the watch goes live).
    Progress(u64),
}

/// One watch's buffer between the connection's reader and the user's stream.
///
/// Not a tokio channel: those allocate a block of slots up front, and a Leader
/// may hold 100 000 idle watches. This queue allocates only while it holds items.
#[derive(Debug)]
pub(crate) struct Queue<T> {
    state: Mutex<QueueState<T>>,
    waker: AtomicWaker,
}

#[derive(Debug)]
struct QueueState<T> {
    items: VecDeque<Item<T>>,
    /// The reader is done with this watch (the stream yields what is left, then ends).
    fed: bool,
    /// The user dropped the stream.
    dropped: bool,
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        // No code panics while holding it; a poisoned queue is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The reader's end of one watch's buffer.
#[derive(Debug)]
pub(crate) struct Feed<T> {
    queue: Arc<Queue<T>>,
    end: Arc<OnceLock<Error>>,
}

/// Why an item could not be handed to a watch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// The buffer is full: the user does not keep up.
    Full,
    /// The stream was dropped.
    Dropped,
}

impl<T> Feed<T> {
    /// Queues an item; never waits (a full buffer is the caller's to handle).
    pub(crate) fn push(&self, item: Item<T>) -> Result<(), Undelivered> {
        {
            let mut state = self.queue.lock();
            if state.dropped {
                return Err(Undelivered::Dropped);
            }
            if state.items.len() >= WATCH_BUFFER {
                return Err(Undelivered::Full);
            }
            state.items.push_back(item);
        }
        self.queue.waker.wake();
        Ok(())
    }

    /// Ends the stream: it yields what is buffered, then `error` (if any), then `None`.
    pub(crate) fn finish(self, error: Option<Error>) {
        if let Some(error) = error {
            let _ = self.end.set(error);
        }
    }
}

impl<T> Drop for Feed<T> {
    fn drop(&mut self) {
        self.queue.lock().fed = true;
        self.queue.waker.wake();
    }
}

/// The user's end of one watch's buffer.
#[derive(Debug)]
pub(crate) struct Rx<T> {
    queue: Arc<Queue<T>>,
}

impl<T> Drop for Rx<T> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.dropped = true;
        state.items = VecDeque::new();
    }
}

impl<T> Rx<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item<T>>> {
        // Register first, then look: a push in between wakes the new waker.
        self.queue.waker.register(cx.waker());
        let mut state = self.queue.lock();
        match state.items.pop_front() {
            Some(item) => {
                if state.items.is_empty() && state.items.capacity() > 64 {
                    // A burst is over: give its memory back.
                    state.items = VecDeque::new();
                }
                Poll::Ready(Some(item))
            }
            None if state.fed => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// The user's end of one watch's buffer, with how it ended.
#[derive(Debug)]
struct Receiver<T> {
    rx: Rx<T>,
    end: Arc<OnceLock<Error>>,
    done: bool,
}

pub(crate) fn channel<T>() -> (Feed<T>, Rx<T>, Arc<OnceLock<Error>>) {
    // Full: the reader ends this watch with `Error::Lagged` and cancels it on the server.
    let queue = Arc::new(Queue {
        state: Mutex::new(QueueState { items: VecDeque::new(), fed: false, dropped: false }),
        waker: AtomicWaker::new(),
    });
    let end = Arc::new(OnceLock::new());
    (Feed { queue: queue.clone(), end: end.clone() }, Rx { queue }, end)
}

impl<T> Receiver<T> {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Item<T>, Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(self.end.get().cloned().map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Cancels a server-side watch when its stream goes away.
#[derive(Debug)]
struct CancelOnDrop {
    client: Client,
    id: RequestId,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.client.end_watch(self.id);
    }
}

/// A stream of the changes of a key or prefix, from [`Client::watch`].
///
/// Yields `Ok(event)` in revision order. When the connection is lost (or the
/// watch falls behind by more than [`WATCH_BUFFER`] events) it yields one `Err`,
/// then ends; watch again from [`Watch::revision`]` + 1` to resume without a gap.
/// Dropping it cancels the watch on the server.
#[derive(Debug)]
#[must_use = "a watch does nothing unless polled"]
pub struct Watch {
    receiver: Receiver<WatchEvent>,
    revision: u64,
    /// Inside a snapshot taken at this revision (after a `Compacted`).
    snapshot_at: Option<u64>,
    _cancel: CancelOnDrop,
}

impl Watch {
    pub(crate) fn new(
        client: Client,
        id: RequestId,
        rx: Rx<WatchEvent>,
        end: Arc<OnceLock<Error>>,
        from_revision: Option<u64>,
    ) -> Self {
        Watch {
            receiver: Receiver { rx, end, done: false },
            revision: from_revision.map_or(0, |r| r.saturating_sub(1)),
            snapshot_at: None,
            _cancel: CancelOnDrop { client, id },
        }
    }

    /// Every matching change up to this revision has been yielded: to resume after
    /// an error, watch again from `revision() + 1`.
    ///
    /// Before the server reported where a live-only watch starts, this is 0.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn observe(&mut self, event: &WatchEvent) {
        match (event, self.snapshot_at) {
            (WatchEvent::Compacted { revision, .. }, _) => {
                // The snapshot replaces what came before, even a higher revision from
                // another incarnation of the server.
                self.snapshot_at = Some(*revision);
                self.revision = *revision;
            }
            (_, Some(at)) if event.revision() <= at => {}
            _ => {
                self.snapshot_at = None;
                self.revision = self.revision.max(event.revision());
            }
        }
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match this.receiver.poll_item(cx) {
                Poll::Ready(Some(Ok(Item::Progress(revision)))) => {
                    this.snapshot_at = None;
                    this.revision = this.revision.max(revision);
                    continue;
                }
                Poll::Ready(Some(Ok(Item::Event(event)))) => {
                    this.observe(&event);
                    Poll::Ready(Some(Ok(event)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// A stream of the instances joining and leaving a service, from [`Client::watch_service`].
///
/// Starts with one [`ServiceEvent::Join`] per current instance. Ends like a
/// [`Watch`]: one `Err` when the connection is lost, then `None`. Dropping it
/// cancels the watch on the server.
#[derive(Debug)]
#[must_use = "a watch does nothing unless polled"]
pub struct ServiceWatch {
    receiver: Receiver<ServiceEvent>,
    _cancel: CancelOnDrop,
}

impl ServiceWatch {
    pub(crate) fn new(client: Client, id: RequestId, rx: Rx<ServiceEvent>, end: Arc<OnceLock<Error>>) -> Self {
        ServiceWatch { receiver: Receiver { rx, end, done: false }, _cancel: CancelOnDrop { client, id } }
    }
}

impl Stream for ServiceWatch {
    type Item = Result<ServiceEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match this.receiver.poll_item(cx) {
                Poll::Ready(Some(Ok(Item::Progress(_)))) => continue,
                Poll::Ready(Some(Ok(Item::Event(event)))) => Poll::Ready(Some(Ok(event))),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}
