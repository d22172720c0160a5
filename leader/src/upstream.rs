//! The trait a user implements once around the real upstream client, and
//! [`Events`], the stream most implementations return from `subscribe`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use tandem_protocol::{Api, RemoteError, UpstreamState};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the leader knows about one call while it runs.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub(crate) deadline: Instant,
    /// Made on first use: a call answered at once (most are) never needs one.
    cancelled: Arc<OnceLock<CancellationToken>>,
}

impl CallContext {
    /// A context with this deadline (for calls an upstream makes on itself, and tests).
    pub fn until(deadline: Instant) -> Self {
        CallContext { deadline, cancelled: Arc::default() }
    }

    /// A context cancelled with `token`.
    pub(crate) fn with_token(deadline: Instant, token: CancellationToken) -> Self {
        CallContext { deadline, cancelled: Arc::new(OnceLock::from(token)) }
    }

    /// When the caller stops waiting (on tokio's clock). The leader drops the call's future at this
    /// instant; an upstream that talks to a server with its own timeout can pass it on.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Cancelled when the caller gave up (Cancel frame, disconnect or deadline).
    /// The call's future is dropped at the same moment, so most upstreams need
    /// not look at this; it is there for work handed off to other tasks.
    pub fn cancelled(&self) -> &CancellationToken {
        self.cancelled.get_or_init(CancellationToken::new)
    }
}

/// The real upstream client of one channel, as the leader runs it.
///
/// Only the leader's process builds and calls it, and every method may be
/// called concurrently. The leader owns the bookkeeping: it subscribes a key
/// once however many followers want it, caches and numbers its values, fans
/// them out, and drops the key's stream when its last subscriber leaves.
///
/// A complete adapter, for a client that keeps each key in a
/// `tokio::sync::watch` channel:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
///
/// use tandem_leader::{CallContext, Events, Leader, Upstream};
/// use tandem_protocol::{Api, RemoteError};
/// use tokio::sync::watch;
///
/// /// The channel every process shares.
/// struct Flags;
/// impl Api for Flags {
///     const NAME: &'static str = "flags";
///     type Key = String;
///     type Event = Option<String>;
///     type Request = (String, Option<String>); // set (Some) or clear (None) a flag
///     type Response = ();
/// }
///
/// /// The "real client": an in-memory store with one watch channel per key.
/// #[derive(Default)]
/// struct Store(Mutex<HashMap<String, watch::Sender<Option<String>>>>);
///
/// impl Store {
///     fn key(&self, key: &str) -> watch::Sender<Option<String>> {
///         let mut keys = self.0.lock().unwrap();
///         keys.entry(key.to_owned()).or_insert_with(|| watch::Sender::new(None)).clone()
///     }
/// }
///
/// impl Upstream<Flags> for Store {
///     async fn invoke(&self, (key, value): (String, Option<String>), _ctx: CallContext) -> Result<(), RemoteError> {
///         if key.is_empty() {
///             return Err(RemoteError::bad_request("the key is empty"));
///         }
///         self.key(&key).send_replace(value);
///         Ok(())
///     }
///
///     async fn subscribe(&self, key: String) -> Result<Events<Option<String>>, RemoteError> {
///         let mut values = self.key(&key).subscribe();
///         // The current value first, then every change, until the leader drops the stream.
///         Ok(Events::spawn(|tx| async move {
///             loop {
///                 let value = values.borrow_and_update().clone();
///                 if !tx.send(value) || values.changed().await.is_err() {
///                     return;
///                 }
///             }
///         }))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let leader = Leader::builder().channel(Store::default()).start();
/// # leader.shutdown().await;
/// # }
/// ```
pub trait Upstream<A: Api>: Send + Sync + 'static {
    /// Performs one call. The leader drops the future at the caller's deadline,
    /// on a Cancel, or when the caller disconnects.
    fn invoke(
        &self,
        request: A::Request,
        ctx: CallContext,
    ) -> impl Future<Output = Result<A::Response, RemoteError>> + Send;

    /// Starts following `key` and returns the stream of its values, the
    /// current value first if there is one.
    ///
    /// - Return once the upstream has accepted the subscription: an error is
    ///   the answer of the follower that asked, at once (say why, e.g. a limit).
    ///   While the upstream is unreachable, accept and let the stream start
    ///   flowing when it is back (report the outage with [`health`](Self::health)).
    /// - The leader calls this once per key however many followers subscribe,
    ///   and drops the stream when the last one leaves: dropping it is the
    ///   unsubscribe. It never subscribes a key again before the key's previous
    ///   stream has been dropped.
    /// - Resuming after a reconnect is the stream's business. A stream that ends
    ///   tells the leader the subscription is lost: it logs that at WARN and
    ///   subscribes the key again, with backoff, while followers want it.
    fn subscribe(&self, key: A::Key) -> impl Future<Output = Result<Events<A::Event>, RemoteError>> + Send;

    /// Starts following `key` again after `revision`, a resume point this
    /// upstream gave earlier ([`revision`](Self::revision)) for a value the
    /// leader already serves: a new leader seeded from a hot standby's mirror
    /// calls it for each seeded key (PROTOCOL.md §7.2). The stream should
    /// hold every change after `revision` (the current value is fine too: a
    /// first value byte for byte the seeded one is dropped by the leader).
    /// The default is [`subscribe`](Self::subscribe), which delivers the
    /// current value and so loses nothing either, as long as the upstream is
    /// reachable; override it where the upstream can resume (a watch from a
    /// revision) to also catch up from an upstream that is not reachable yet.
    fn subscribe_from(
        &self,
        key: A::Key,
        revision: u64,
    ) -> impl Future<Output = Result<Events<A::Event>, RemoteError>> + Send {
        let _ = revision;
        self.subscribe(key)
    }

    /// The resume point of a value of a subscribed key (its revision in the
    /// upstream), when the upstream has one: the leader keeps it with the
    /// key's latest value, a mirror carries it, and a new leader seeded from
    /// the mirror passes it to [`subscribe_from`](Self::subscribe_from). It
    /// is asked for each value and must be quick. The default is `None`.
    fn revision(&self, event: &A::Event) -> Option<u64> {
        let _ = event;
        None
    }

    /// The upstream's health, when it can tell: the leader forwards every change
    /// (`Ready`, `Down(error)`) to the followers, whose `Client::state()` then
    /// shows `UpstreamDown` during an outage. The default is `None` (the channel
    /// is `Ready` once built).
    fn health(&self) -> Option<tokio::sync::watch::Receiver<UpstreamState>> {
        None
    }

    /// Performs a request nobody waits the answer of (a follower's
    /// `Client::publish`), within the leader's `upstream_timeout` (`ctx`). The
    /// default is [`invoke`](Self::invoke), its response dropped; override it to
    /// refuse, or to publish differently.
    fn publish(&self, request: A::Request, ctx: CallContext) -> impl Future<Output = Result<(), RemoteError>> + Send {
        let call = self.invoke(request, ctx);
        async move { call.await.map(drop) }
    }
}

type Follow = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The values of one subscribed key, as [`Upstream::subscribe`] returns them.
///
/// - [`Events::spawn`] runs a future that sends the key's values (a watch
///   loop, with its reconnects) on an [`EventSender`]; the future is polled
///   as part of the stream, in the leader's task for the key, and dropped with it.
/// - [`Events::channel`] gives an [`EventSender`] for a client whose own task
///   or callback produces the values (a connection that multiplexes many
///   keys, an SDK's listener); [`on_drop`](Self::on_drop) tells that task the
///   key is no longer wanted.
/// - [`Events::new`] wraps the receiving half of a tokio channel the client already fills.
/// - [`Events::stream`] takes any stream the client library already offers.
///
/// An `EventSender`'s values (from `spawn` or `channel`) are delivered by the
/// leader as they are sent, with no hop through another task: the fastest way
/// in. Sending never waits; slow followers are the leader's business (it
/// conflates their queued values per key).
///
/// The stream ends once the future has returned (or every sender is gone, or
/// the wrapped stream ended) and every value sent has been taken.
#[must_use = "a stream does nothing unless the leader polls it"]
pub struct Events<E> {
    source: Source<E>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

enum Source<E> {
    Channel(mpsc::UnboundedReceiver<E>),
    Stream(Pin<Box<dyn Stream<Item = E> + Send>>),
    /// An [`EventSender`]'s values, and the future that sends them (for `spawn`).
    Direct {
        slot: Arc<Slot<E>>,
        follow: Option<Follow>,
    },
}

/// Where an [`EventSender`]'s values go: the leader's delivery once it has
/// taken the stream, a queue (read as a stream) until then.
struct Slot<E>(Mutex<SlotState<E>>);

type Deliver<E> = Box<dyn FnMut(E) -> bool + Send>;

/// The leader's answer to "may the key's sender go on": `None` when every
/// subscriber's queue has room, else a future that resolves when one that had
/// none has been taken (the sender then asks again).
pub(crate) type Room = Arc<dyn Fn() -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> + Send + Sync>;

struct SlotState<E> {
    deliver: Option<Deliver<E>>,
    room: Option<Room>,
    queued: VecDeque<E>,
    waker: Option<Waker>,
    senders: usize,
    /// The stream was dropped: the key is no longer wanted.
    dropped: bool,
}

impl<E> Slot<E> {
    fn lock(&self) -> MutexGuard<'_, SlotState<E>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending half of [`Events::channel`]. Cheap to clone; the stream ends
/// when the last clone is dropped.
pub struct EventSender<E> {
    slot: Arc<Slot<E>>,
}

impl<E> std::fmt::Debug for EventSender<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender").field("closed", &self.is_closed()).finish()
    }
}

impl<E> EventSender<E> {
    /// Delivers a value of the key (never waits). False once the leader
    /// dropped the key's stream (nobody wants the key any more).
    pub fn send(&self, value: E) -> bool {
        let mut state = self.slot.lock();
        if state.dropped {
            return false;
        }
        match state.deliver.as_mut() {
            Some(deliver) => {
                if !deliver(value) {
                    state.dropped = true;
                    return false;
                }
            }
            None => {
                state.queued.push_back(value);
                if let Some(waker) = state.waker.take() {
                    waker.wake();
                }
            }
        }
        true
    }

    /// Whether the leader dropped the key's stream.
    pub fn is_closed(&self) -> bool {
        self.slot.lock().dropped
    }

    /// Resolves once every follower subscribed to the key has room in its
    /// event queue (fewer than [`Config::max_queued_events`](crate::Config::max_queued_events)
    /// queued); at once when they have, when the leader has not taken the
    /// stream yet, or when the key was dropped (then `send` returns false).
    ///
    /// `send` never waits, and a follower that falls behind has its queued
    /// values conflated per key. An upstream that can wait (a log it reads at
    /// its own pace, a producer with its own buffer) awaits `ready` before
    /// sending instead: every value then reaches every follower that keeps
    /// reading, at the pace of the slowest. A follower that stops reading does
    /// not hold it for ever: its session ends after
    /// [`Config::write_stall_timeout`](crate::Config::write_stall_timeout)
    /// (or when its peer goes silent), and its queue with it.
    pub async fn ready(&self) {
        loop {
            let Some(room) = self.slot.lock().room.clone() else { return };
            match room() {
                Some(taken) => taken.await,
                None => return,
            }
        }
    }
}

impl<E> Clone for EventSender<E> {
    fn clone(&self) -> Self {
        self.slot.lock().senders += 1;
        EventSender { slot: self.slot.clone() }
    }
}

impl<E> Drop for EventSender<E> {
    fn drop(&mut self) {
        let mut state = self.slot.lock();
        state.senders -= 1;
        if state.senders == 0
            && let Some(waker) = state.waker.take()
        {
            waker.wake();
        }
    }
}

impl<E> std::fmt::Debug for Events<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Channel(values) => f.debug_struct("Events").field("queued", &values.len()).finish(),
            Source::Direct { follow, .. } => f.debug_struct("Events").field("following", &follow.is_some()).finish(),
            Source::Stream(_) => f.debug_struct("Events").finish_non_exhaustive(),
        }
    }
}

impl<E: Send + 'static> Events<E> {
    /// A stream of what `follow` sends on the [`EventSender`] it is given.
    /// The future is polled as part of the stream, in the leader's task for
    /// the key, and each value it sends is delivered at once.
    pub fn spawn<F, Fut>(follow: F) -> Self
    where
        F: FnOnce(EventSender<E>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, mut events) = Events::channel();
        if let Source::Direct { follow: slot, .. } = &mut events.source {
            *slot = Some(Box::pin(follow(tx)));
        }
        events
    }

    /// A stream of what arrives on `values`.
    pub fn new(values: mpsc::UnboundedReceiver<E>) -> Self {
        Events { source: Source::Channel(values), on_drop: None }
    }

    /// The values of `stream`.
    pub fn stream(stream: impl Stream<Item = E> + Send + 'static) -> Self {
        Events { source: Source::Stream(Box::pin(stream)), on_drop: None }
    }

    /// A stream and the sender that feeds it, delivered by the leader as it is
    /// sent (see [`EventSender`]).
    pub fn channel() -> (EventSender<E>, Self) {
        let slot = Arc::new(Slot(Mutex::new(SlotState {
            deliver: None,
            room: None,
            queued: VecDeque::new(),
            waker: None,
            senders: 1,
            dropped: false,
        })));
        (EventSender { slot: slot.clone() }, Events { source: Source::Direct { slot, follow: None }, on_drop: None })
    }

    /// From now on (and for what is queued, first) every value goes to
    /// `deliver` as it is sent, if this stream came from [`Events::channel`],
    /// and [`EventSender::ready`] asks `room`; the stream then yields nothing
    /// and ends with the last sender. False (and nothing done) for the other kinds.
    pub(crate) fn deliver_directly(&mut self, mut deliver: Deliver<E>, room: Room) -> bool {
        let Source::Direct { slot, .. } = &self.source else { return false };
        let mut state = slot.lock();
        state.room = Some(room);
        while let Some(value) = state.queued.pop_front() {
            if !deliver(value) {
                state.dropped = true;
                return true;
            }
        }
        state.deliver = Some(deliver);
        true
    }

    /// Runs `f` when the stream is dropped: the leader no longer wants the key.
    pub fn on_drop(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_drop = Some(Box::new(f));
        self
    }
}

impl<E> Stream for Events<E> {
    type Item = E;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<E>> {
        // Every field is Unpin (the future and the stream are boxed).
        match &mut self.get_mut().source {
            Source::Channel(values) => values.poll_recv(cx),
            Source::Stream(stream) => stream.as_mut().poll_next(cx),
            Source::Direct { slot, follow } => {
                if let Some(running) = follow.as_mut()
                    && running.as_mut().poll(cx).is_ready()
                {
                    // Its sender is dropped with it: the stream ends once drained.
                    *follow = None;
                }
                let mut state = slot.lock();
                if let Some(value) = state.queued.pop_front() {
                    Poll::Ready(Some(value))
                } else if state.senders == 0 {
                    Poll::Ready(None)
                } else {
                    state.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }
}

impl<E> Drop for Events<E> {
    fn drop(&mut self) {
        // The follow future (and what it holds) goes before `on_drop` runs.
        match &mut self.source {
            Source::Channel(_) | Source::Stream(_) => {}
            Source::Direct { slot, follow } => {
                // The follow future (and what it holds) goes first.
                *follow = None;
                let mut state = slot.lock();
                state.dropped = true;
                // What it captured (the leader's side) goes now, not with the last sender.
                let deliver = state.deliver.take();
                let room = state.room.take();
                state.queued.clear();
                drop(state);
                drop((deliver, room));
            }
        }
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_spawned_stream_yields_what_its_future_sends_then_ends() {
        let events = Events::spawn(|tx| async move {
            for n in 0..3 {
                assert!(tx.send(n));
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(events.collect::<Vec<_>>().await, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn dropping_the_stream_drops_its_future_and_runs_on_drop() {
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
        let (told_tx, told) = tokio::sync::oneshot::channel::<()>();
        let mut events = Events::spawn(|tx| async move {
            let _guard = dropped_tx; // dropped with the future
            assert!(tx.send(1));
            std::future::pending::<()>().await;
        })
        .on_drop(move || told_tx.send(()).unwrap());
        assert_eq!(events.next().await, Some(1));
        drop(events);
        assert!(dropped.await.is_err(), "the future's guard is gone");
        assert!(told.await.is_ok(), "on_drop ran");
    }

    #[tokio::test]
    async fn a_wrapped_stream_passes_through() {
        let events = Events::stream(futures::stream::iter([1, 2]));
        assert_eq!(events.collect::<Vec<_>>().await, vec![1, 2]);
    }

    #[tokio::test]
    async fn a_direct_channel_queues_until_delivered_directly_then_ends_with_its_senders() {
        let (tx, mut events) = Events::channel();
        assert!(tx.send(1));
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        assert!(events.deliver_directly(
            Box::new(move |v| {
                sink.lock().unwrap().push(v);
                true
            }),
            Arc::new(|| None),
        ));
        assert!(tx.send(2));
        let second = tx.clone();
        assert!(second.send(3));
        assert_eq!(*got.lock().unwrap(), vec![1, 2, 3], "queued first, then as sent");
        drop((tx, second));
        assert_eq!(events.next().await, None, "ends with the last sender");
    }

    #[tokio::test]
    async fn a_direct_channel_reads_as_a_stream_and_refuses_sends_once_dropped() {
        let (tx, mut events) = Events::channel();
        assert!(tx.send("a"));
        assert_eq!(events.next().await, Some("a"));
        drop(events);
        assert!(!tx.send("b") && tx.is_closed());
    }

    #[tokio::test]
    async fn a_channel_stream_ends_when_every_sender_is_gone() {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Events::new(rx);
        tx.send("a").unwrap();
        tx.send("b").unwrap();
        drop(tx);
        assert_eq!(events.collect::<Vec<_>>().await, vec!["a", "b"]);
    }
}
