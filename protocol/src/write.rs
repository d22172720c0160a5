//! The batching write loop every connection's writer task runs.
//!
//! ```text
//!  source.next().await ──> feed ──> source.try_next() ──> feed ... ──> flush
//!        ^                           (nothing queued, or the batch cap)    |
//!        └─────────────────────────────────────────────────────────────────┘
//! ```
//!
//! One item is awaited, then everything already queued is fed without waiting,
//! then the sink is flushed once: a burst of frames goes out in one write. An
//! item the codec refuses ([`CodecError::TooLarge`], [`CodecError::Encode`]:
//! nothing was written, the stream is intact) is handed back to the source,
//! which decides what becomes of it; any other error ends the loop. With a
//! stall bound, each step (one feed, the flush) may wait that long for the
//! peer; a sink with room arms no timer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::sink::{Sink, SinkExt};

use crate::{CodecError, Frame};

/// Where a write loop takes its items from.
pub trait WriteSource {
    /// What the sink is fed.
    type Item;
    /// What [`WriteSource::refused`] needs to know of an item the sink took
    /// and refused (its kind, its request id); taken before each feed, so keep
    /// it cheap (a `Copy` value).
    type Tag;

    /// Waits for the next item; `None` once there will be no more (the loop
    /// then ends with [`WriteEnd::Finished`]).
    fn next(&mut self) -> impl Future<Output = Option<Self::Item>> + Send;

    /// The next item if one is ready now; `None` ends the batch (the sink is
    /// flushed and [`WriteSource::next`] awaited).
    fn try_next(&mut self) -> Option<Self::Item>;

    /// What to remember of `item` in case the codec refuses it.
    fn tag(item: &Self::Item) -> Self::Tag;

    /// The codec refused the item tagged `tag` (nothing was written).
    fn refused(&mut self, tag: Self::Tag, error: CodecError) -> Refused<Self::Item>;
}

/// What becomes of an item the codec refused.
#[derive(Debug)]
pub enum Refused<T> {
    /// Drop it; the loop carries on.
    Skip,
    /// Feed this instead (an error reply in place of one too large). If the
    /// codec refuses the replacement too, the loop ends.
    Replace(T),
    /// End the loop with [`WriteEnd::Failed`].
    Fatal(CodecError),
}

/// How a write loop waits and batches. The default waits as long as the sink
/// needs and flushes once per everything that is queued.
#[derive(Debug, Clone, Copy)]
pub struct WriteLimits {
    stall: Option<Duration>,
    max_batch: usize,
}

impl Default for WriteLimits {
    fn default() -> Self {
        WriteLimits { stall: None, max_batch: usize::MAX }
    }
}

impl WriteLimits {
    /// Ends the loop with [`WriteEnd::Stalled`] when one step (a feed, the
    /// flush) waits longer than `stall` for the peer.
    pub fn stall(mut self, stall: Duration) -> Self {
        self.stall = Some(stall);
        self
    }

    /// Flushes after at most `items` items (at least one).
    pub fn max_batch(mut self, items: usize) -> Self {
        self.max_batch = items.max(1);
        self
    }
}

/// Why a write loop ended. Not `#[non_exhaustive]`: a loop ends for one of
/// these three reasons, and each writer maps every one of them.
#[derive(Debug)]
pub enum WriteEnd {
    /// The source has no more items; everything it gave was flushed.
    Finished,
    /// The sink failed (or the source made a refused item fatal).
    Failed(CodecError),
    /// One step waited longer than the stall bound, given here.
    Stalled(Duration),
}

impl WriteEnd {
    /// `Ok` once the source finished; a stall becomes a `TimedOut` I/O error.
    pub fn into_result(self) -> Result<(), CodecError> {
        match self {
            WriteEnd::Finished => Ok(()),
            WriteEnd::Failed(error) => Err(error),
            WriteEnd::Stalled(stall) => Err(CodecError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer accepted no bytes for {} ms", stall.as_millis()),
            ))),
        }
    }
}

/// Writes what `source` gives to `sink` in batches, one flush per batch, until
/// the source finishes or writing fails. The sink is not closed.
pub async fn write_loop<S, K>(source: &mut S, sink: &mut K, limits: WriteLimits) -> WriteEnd
where
    S: WriteSource,
    K: Sink<S::Item, Error = CodecError> + Unpin,
{
    while let Some(first) = source.next().await {
        if let Err(end) = write_batch(source, sink, first, limits).await {
            return end;
        }
    }
    WriteEnd::Finished
}

async fn write_batch<S, K>(source: &mut S, sink: &mut K, first: S::Item, limits: WriteLimits) -> Result<(), WriteEnd>
where
    S: WriteSource,
    K: Sink<S::Item, Error = CodecError> + Unpin,
{
    write_one(source, sink, first, limits.stall).await?;
    for _ in 1..limits.max_batch {
        let Some(item) = source.try_next() else { break };
        write_one(source, sink, item, limits.stall).await?;
    }
    match limits.stall {
        None => SinkExt::<S::Item>::flush(sink).await.map_err(WriteEnd::Failed),
        Some(stall) => match flush_within(sink, stall).await {
            Ok(result) => result.map_err(WriteEnd::Failed),
            Err(_) => Err(WriteEnd::Stalled(stall)),
        },
    }
}

async fn write_one<S, K>(source: &mut S, sink: &mut K, item: S::Item, stall: Option<Duration>) -> Result<(), WriteEnd>
where
    S: WriteSource,
    K: Sink<S::Item, Error = CodecError> + Unpin,
{
    let tag = S::tag(&item);
    match feed(sink, item, stall).await {
        Err(WriteEnd::Failed(error @ (CodecError::TooLarge { .. } | CodecError::Encode(_)))) => {
            match source.refused(tag, error) {
                Refused::Skip => Ok(()),
                Refused::Replace(item) => feed(sink, item, stall).await,
                Refused::Fatal(error) => Err(WriteEnd::Failed(error)),
            }
        }
        other => other,
    }
}

async fn feed<K, I>(sink: &mut K, item: I, stall: Option<Duration>) -> Result<(), WriteEnd>
where
    K: Sink<I, Error = CodecError> + Unpin,
{
    match stall {
        None => sink.feed(item).await.map_err(WriteEnd::Failed),
        Some(stall) => match feed_within(sink, item, stall).await {
            Ok(result) => result.map_err(WriteEnd::Failed),
            Err(_) => Err(WriteEnd::Stalled(stall)),
        },
    }
}

/// Why [`feed_within`] or [`flush_within`] gave up.
pub type Stalled = tokio::time::error::Elapsed;

/// Feeds `item` to `tx`, waiting at most `stall` for the sink to have room.
///
/// A sink with room takes the item at once, with no timer armed: the common
/// case of a batch of frames going into a socket's write buffer costs no clock
/// read or timer per frame.
pub async fn feed_within<K, I>(tx: &mut K, item: I, stall: Duration) -> Result<Result<(), CodecError>, Stalled>
where
    K: Sink<I, Error = CodecError> + Unpin + ?Sized,
{
    // Polling with a no-op waker is sound: if the sink is not ready, `feed`
    // below polls it again with the task's waker before waiting.
    let ready = Pin::new(&mut *tx).poll_ready(&mut Context::from_waker(Waker::noop()));
    match ready {
        Poll::Ready(Ok(())) => Ok(Pin::new(tx).start_send(item)),
        Poll::Ready(Err(error)) => Ok(Err(error)),
        Poll::Pending => tokio::time::timeout(stall, tx.feed(item)).await,
    }
}

/// Flushes `tx` (a sink of `I`), waiting at most `stall` for the peer to take
/// the bytes; a flush that completes at once arms no timer.
pub async fn flush_within<K, I>(tx: &mut K, stall: Duration) -> Result<Result<(), CodecError>, Stalled>
where
    K: Sink<I, Error = CodecError> + Unpin + ?Sized,
{
    let flushed = Pin::new(&mut *tx).poll_flush(&mut Context::from_waker(Waker::noop()));
    match flushed {
        Poll::Ready(result) => Ok(result),
        Poll::Pending => tokio::time::timeout(stall, SinkExt::<I>::flush(tx)).await,
    }
}

/// Frames already queued (`out.drain(..)`): one batch, then finished. A frame
/// the codec refuses is logged and dropped.
impl WriteSource for std::vec::Drain<'_, Frame> {
    type Item = Frame;
    type Tag = &'static str;

    fn next(&mut self) -> impl Future<Output = Option<Frame>> + Send {
        std::future::ready(Iterator::next(self))
    }

    fn try_next(&mut self) -> Option<Frame> {
        Iterator::next(self)
    }

    fn tag(frame: &Frame) -> &'static str {
        frame.kind()
    }

    fn refused(&mut self, kind: &'static str, error: CodecError) -> Refused<Frame> {
        tracing::error!(%error, frame = kind, "frame not sent");
        Refused::Skip
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures::{FutureExt, StreamExt};
    use tokio_util::codec::{FramedRead, FramedWrite};

    use super::*;
    use crate::FrameCodec;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// What the sink saw, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Op {
        Fed(u32),
        Flush,
    }

    /// A sink that refuses items of 100 and more (as a codec refuses a frame
    /// too large), and is ready or not as told.
    #[derive(Default)]
    struct Recorder {
        ops: Vec<Op>,
        never_ready: bool,
        never_flushed: bool,
    }

    impl Sink<u32> for Recorder {
        type Error = CodecError;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
            if self.never_ready { Poll::Pending } else { Poll::Ready(Ok(())) }
        }

        fn start_send(mut self: Pin<&mut Self>, item: u32) -> Result<(), CodecError> {
            if item >= 100 {
                return Err(CodecError::TooLarge { len: u64::from(item), max: 99 });
            }
            self.ops.push(Op::Fed(item));
            Ok(())
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
            if self.never_flushed {
                return Poll::Pending;
            }
            self.ops.push(Op::Flush);
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Two queues, control before data; each `next` first releases the next
    /// burst of `arrivals` (items that "arrive" while the writer waits).
    struct Queues {
        control: VecDeque<u32>,
        data: VecDeque<u32>,
        arrivals: VecDeque<(Vec<u32>, Vec<u32>)>,
        on_refused: fn(u32, CodecError) -> Refused<u32>,
        refused: Vec<u32>,
    }

    impl Queues {
        fn new(arrivals: Vec<(Vec<u32>, Vec<u32>)>) -> Self {
            Queues {
                control: VecDeque::new(),
                data: VecDeque::new(),
                arrivals: arrivals.into(),
                on_refused: |_, _| Refused::Skip,
                refused: Vec::new(),
            }
        }
    }

    impl WriteSource for Queues {
        type Item = u32;
        type Tag = u32;

        async fn next(&mut self) -> Option<u32> {
            if let Some(item) = self.try_next() {
                return Some(item);
            }
            let (control, data) = self.arrivals.pop_front()?;
            self.control.extend(control);
            self.data.extend(data);
            self.try_next()
        }

        fn try_next(&mut self) -> Option<u32> {
            self.control.pop_front().or_else(|| self.data.pop_front())
        }

        fn tag(item: &u32) -> u32 {
            *item
        }

        fn refused(&mut self, item: u32, error: CodecError) -> Refused<u32> {
            self.refused.push(item);
            (self.on_refused)(item, error)
        }
    }

    async fn run(source: &mut Queues, sink: &mut Recorder, limits: WriteLimits) -> WriteEnd {
        tokio::time::timeout(TEST_TIMEOUT, write_loop(source, sink, limits)).await.expect("the loop ends")
    }

    #[tokio::test]
    async fn control_goes_first_and_each_burst_is_one_flush() {
        let mut source = Queues::new(vec![(vec![1, 2], vec![10, 11]), (vec![], vec![12]), (vec![3], vec![13])]);
        let mut sink = Recorder::default();
        let end = run(&mut source, &mut sink, WriteLimits::default()).await;
        assert!(matches!(end, WriteEnd::Finished), "{end:?}");
        use Op::*;
        assert_eq!(sink.ops, vec![Fed(1), Fed(2), Fed(10), Fed(11), Flush, Fed(12), Flush, Fed(3), Fed(13), Flush]);
    }

    #[tokio::test]
    async fn a_batch_is_capped() {
        let mut source = Queues::new(vec![(vec![1, 2], vec![10, 11, 12])]);
        let mut sink = Recorder::default();
        let end = run(&mut source, &mut sink, WriteLimits::default().max_batch(2)).await;
        assert!(matches!(end, WriteEnd::Finished), "{end:?}");
        use Op::*;
        assert_eq!(sink.ops, vec![Fed(1), Fed(2), Flush, Fed(10), Fed(11), Flush, Fed(12), Flush]);
    }

    #[tokio::test]
    async fn a_refused_item_is_skipped_and_the_loop_goes_on() {
        let mut source = Queues::new(vec![(vec![1, 150], vec![2]), (vec![200], vec![])]);
        let mut sink = Recorder::default();
        let end = run(&mut source, &mut sink, WriteLimits::default().stall(Duration::from_secs(1))).await;
        assert!(matches!(end, WriteEnd::Finished), "{end:?}");
        assert_eq!(source.refused, vec![150, 200]);
        use Op::*;
        // A batch of only a refused item is still flushed (what came before it may be buffered).
        assert_eq!(sink.ops, vec![Fed(1), Fed(2), Flush, Flush]);
    }

    #[tokio::test]
    async fn a_refused_item_can_be_replaced() {
        let mut source = Queues::new(vec![(vec![1, 150, 2], vec![])]);
        source.on_refused = |item, _| Refused::Replace(item - 100);
        let mut sink = Recorder::default();
        let end = run(&mut source, &mut sink, WriteLimits::default()).await;
        assert!(matches!(end, WriteEnd::Finished), "{end:?}");
        use Op::*;
        assert_eq!(sink.ops, vec![Fed(1), Fed(50), Fed(2), Flush]);
    }

    #[tokio::test]
    async fn a_refused_replacement_ends_the_loop() {
        let mut source = Queues::new(vec![(vec![1, 150, 2], vec![])]);
        source.on_refused = |item, _| Refused::Replace(item + 100);
        let mut sink = Recorder::default();
        let end = run(&mut source, &mut sink, WriteLimits::default()).await;
        assert!(matches!(end, WriteEnd::Failed(CodecError::TooLarge { len: 250, .. })), "{end:?}");
        assert_eq!(sink.ops, vec![Op::Fed(1)]);
    }

    #[tokio::test]
    async fn a_fatal_refusal_ends_the_loop_unflushed() {
        let mut source = Queues::new(vec![(vec![1, 150, 2], vec![])]);
        source.on_refused = |_, error| Refused::Fatal(error);
        let mut sink = Recorder::default();
        let end = run(&mut source, &mut sink, WriteLimits::default()).await;
        assert!(matches!(end, WriteEnd::Failed(CodecError::TooLarge { len: 150, max: 99 })), "{end:?}");
        assert_eq!(sink.ops, vec![Op::Fed(1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sink_without_room_ends_the_loop_as_stalled() {
        let stall = Duration::from_millis(1500);
        let mut source = Queues::new(vec![(vec![1], vec![])]);
        let mut sink = Recorder { never_ready: true, ..Recorder::default() };
        let started = tokio::time::Instant::now();
        let end = run(&mut source, &mut sink, WriteLimits::default().stall(stall)).await;
        assert!(matches!(end, WriteEnd::Stalled(d) if d == stall), "{end:?}");
        assert_eq!(started.elapsed(), stall);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_that_never_completes_ends_the_loop_as_stalled() {
        let stall = Duration::from_secs(2);
        let mut source = Queues::new(vec![(vec![1, 2], vec![])]);
        let mut sink = Recorder { never_flushed: true, ..Recorder::default() };
        let end = run(&mut source, &mut sink, WriteLimits::default().stall(stall)).await;
        assert!(matches!(end, WriteEnd::Stalled(d) if d == stall), "{end:?}");
        assert_eq!(sink.ops, vec![Op::Fed(1), Op::Fed(2)]);
        let error = end.into_result().expect_err("a stall is an error");
        assert!(matches!(&error, CodecError::Io(e) if e.kind() == io::ErrorKind::TimedOut), "{error:?}");
    }

    #[test]
    fn a_ready_sink_arms_no_timer() {
        // No tokio runtime at all: creating a timer would panic, and the loop
        // must finish without ever waiting.
        let mut source = Queues::new(vec![(vec![1, 2], vec![3]), (vec![4], vec![])]);
        let mut sink = Recorder::default();
        let limits = WriteLimits::default().stall(Duration::from_secs(1));
        let end = write_loop(&mut source, &mut sink, limits).now_or_never().expect("no waiting");
        assert!(matches!(end, WriteEnd::Finished), "{end:?}");
        assert_eq!(sink.ops.iter().filter(|op| **op == Op::Flush).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_a_socket_stalls_it() {
        let stall = Duration::from_secs(1);
        let (near, far) = tokio::io::duplex(64);
        let mut sink = FramedWrite::new(near, FrameCodec::new());
        let mut frames: Vec<Frame> = (0..64).map(Frame::Ping).collect();
        let end = tokio::time::timeout(
            TEST_TIMEOUT,
            write_loop(&mut frames.drain(..), &mut sink, WriteLimits::default().stall(stall)),
        )
        .await
        .expect("the loop ends");
        assert!(matches!(end, WriteEnd::Stalled(d) if d == stall), "{end:?}");
        drop(far);
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_without_the_refused_one() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let mut sink = FramedWrite::new(near, FrameCodec::with_max_frame_length(64));
        let mut frames = vec![Frame::Ping(1), Frame::Goodbye("x".repeat(100)), Frame::Ping(2)];
        let end =
            tokio::time::timeout(TEST_TIMEOUT, write_loop(&mut frames.drain(..), &mut sink, WriteLimits::default()))
                .await
                .expect("the loop ends");
        assert!(matches!(end, WriteEnd::Finished), "{end:?}");
        assert!(frames.is_empty());
        drop(sink);
        let read: Vec<Frame> = FramedRead::new(far, FrameCodec::new()).map(|f| f.expect("a frame")).collect().await;
        assert_eq!(read, vec![Frame::Ping(1), Frame::Ping(2)]);
    }
}
