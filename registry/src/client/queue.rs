//! One watch's buffer between the client's connection task, which feeds it, and
//! the user's stream (a `Watch` or `ServiceWatch`), which drains it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use super::error::Error;

/// Events a watch buffers on the client side before the watch is cancelled with
/// [`Error::Lagged`]: more than the server's default history, so a full replay fits.
pub const WATCH_BUFFER: usize = 16 * 1024;

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
pub(crate) struct Receiver<T> {
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
    pub(crate) fn new(rx: Rx<T>, end: Arc<OnceLock<Error>>) -> Self {
        Receiver { rx, end, done: false }
    }

    pub(crate) fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Item<T>, Error>>> {
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
