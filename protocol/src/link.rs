//! A link: a bidirectional stream of frames, whatever carries it.
//!
//! The leader serves links and the follower's driver talks over one. A link may
//! be a socket (framed with [`FrameCodec`](crate::FrameCodec)), an in-process
//! channel pair (the leader's own process: no socket, no encoding), or a relay
//! through the cluster master (the messenger transport).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::channel::mpsc as fmpsc;
use futures::sink::{Sink, SinkExt};
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{CodecError, Frame, FrameCodec, SharedFrame};

/// What the sending half of a link accepts: frames, frames encoded once for
/// many links ([`SharedFrame`]; a socket copies its bytes, other links take
/// the frame), and runs of those (`Vec<SharedFrame>`: a socket copies them
/// all in one step, with one readiness check for the run; other links take
/// the frames one by one as the peer has room).
pub trait FrameSink:
    Sink<Frame, Error = CodecError>
    + Sink<SharedFrame, Error = CodecError>
    + Sink<Vec<SharedFrame>, Error = CodecError>
    + Send
{
}

impl<T> FrameSink for T where
    T: Sink<Frame, Error = CodecError>
        + Sink<SharedFrame, Error = CodecError>
        + Sink<Vec<SharedFrame>, Error = CodecError>
        + Send
        + ?Sized
{
}

/// The boxed sending half of a link.
pub type LinkSink = Pin<Box<dyn FrameSink>>;

/// How many encoded bytes a socket link buffers before it writes: a batch of
/// small frames goes out in one write.
const WRITE_BUFFER: usize = 64 * 1024;

/// The receiving and sending halves of one connection.
pub struct Link {
    /// Frames from the peer; ends (or yields an error) when the connection does.
    pub rx: BoxStream<'static, Result<Frame, CodecError>>,
    /// Frames to the peer. Use `feed` for each frame and `flush` once per batch.
    pub tx: LinkSink,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    /// A link over a byte stream split in two halves, framed with `codec`.
    pub fn from_io<R, W>(read: R, write: W, codec: FrameCodec) -> Link
    where
        R: AsyncRead + Send + 'static,
        W: AsyncWrite + Send + 'static,
    {
        let mut tx = FramedWrite::new(write, codec.clone());
        tx.set_backpressure_boundary(WRITE_BUFFER);
        Link { rx: FramedRead::with_capacity(read, codec, 64 * 1024).boxed(), tx: Box::pin(tx) }
    }

    /// A link from any stream and sink of frames.
    pub fn new<S, K>(rx: S, tx: K) -> Link
    where
        S: Stream<Item = Result<Frame, CodecError>> + Send + 'static,
        K: Sink<Frame, Error = CodecError> + Send + 'static,
    {
        Link { rx: rx.boxed(), tx: Box::pin(Unshare { inner: Box::pin(tx), pending: VecDeque::new() }) }
    }

    /// Two in-memory links connected to each other, each direction bounded to
    /// `capacity` frames (a full direction makes its sender wait).
    pub fn pair(capacity: usize) -> (Link, Link) {
        let (a_tx, b_rx) = fmpsc::channel::<Frame>(capacity);
        let (b_tx, a_rx) = fmpsc::channel::<Frame>(capacity);
        (Link::from_channels(a_tx, a_rx), Link::from_channels(b_tx, b_rx))
    }

    fn from_channels(tx: fmpsc::Sender<Frame>, rx: fmpsc::Receiver<Frame>) -> Link {
        let tx = tx.sink_map_err(|_| CodecError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "peer closed the link")));
        Link::new(rx.map(Ok), tx)
    }

    /// A link over tokio mpsc channels (as the cluster's messenger relay hands out).
    pub fn from_mpsc(tx: tokio::sync::mpsc::Sender<Frame>, rx: tokio::sync::mpsc::Receiver<Frame>) -> Link {
        let tx = tokio_util::sync::PollSender::new(tx)
            .sink_map_err(|_| CodecError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "peer closed the link")));
        let rx = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (Ok(f), rx)) });
        Link::new(rx, tx)
    }
}

/// A sink of frames that also takes shared frames, as the frames they hold.
/// A run of shared frames is held in `pending` and handed to the inner sink
/// frame by frame as it has room, before anything else is: `poll_ready` and
/// `poll_flush` are not ready while any of the run is pending.
struct Unshare {
    inner: Pin<Box<dyn Sink<Frame, Error = CodecError> + Send>>,
    pending: VecDeque<Frame>,
}

impl Unshare {
    /// Moves the pending frames into the inner sink, in order, as it has room.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        while !self.pending.is_empty() {
            ready!(self.inner.as_mut().poll_ready(cx))?;
            if let Some(frame) = self.pending.pop_front() {
                self.inner.as_mut().start_send(frame)?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Sink<Frame> for Unshare {
    type Error = CodecError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        this.inner.as_mut().poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Frame) -> Result<(), CodecError> {
        self.get_mut().inner.as_mut().start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        this.inner.as_mut().poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        this.inner.as_mut().poll_close(cx)
    }
}

impl Sink<SharedFrame> for Unshare {
    type Error = CodecError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_ready(self, cx)
    }

    fn start_send(self: Pin<&mut Self>, item: SharedFrame) -> Result<(), CodecError> {
        Sink::<Frame>::start_send(self, item.frame().clone())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_flush(self, cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_close(self, cx)
    }
}

impl Sink<Vec<SharedFrame>> for Unshare {
    type Error = CodecError;

    /// Ready once the previous run is all in the inner sink.
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        self.get_mut().poll_pending(cx)
    }

    fn start_send(self: Pin<&mut Self>, items: Vec<SharedFrame>) -> Result<(), CodecError> {
        self.get_mut().pending.extend(items.iter().map(|item| item.frame().clone()));
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_flush(self, cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<Frame>::poll_close(self, cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Event;

    fn event(seq: u64) -> Frame {
        let payload = bytes::Bytes::from(seq.to_string());
        Frame::Event(Event { channel: "c".into(), key: "k".into(), epoch: 1, seq, payload, cached: false })
    }

    #[tokio::test]
    async fn a_run_of_shared_frames_reaches_an_in_process_peer_in_order_as_it_has_room() {
        let (mut a, mut b) = Link::pair(1);
        let shared = |seq| SharedFrame::encode(event(seq), 1 << 20).unwrap();
        let sent = async {
            a.tx.feed(Frame::Ping(0)).await?;
            a.tx.feed((1..=5).map(shared).collect::<Vec<_>>()).await?;
            a.tx.feed(Frame::Ping(6)).await?;
            SinkExt::<Frame>::flush(&mut a.tx).await
        };
        // The channel holds one frame: the run goes in as the peer reads.
        let received = async {
            let mut frames = Vec::new();
            for _ in 0..7 {
                frames.push(b.rx.next().await.expect("a frame").expect("no error"));
            }
            frames
        };
        let (sent, received) = tokio::time::timeout(Duration::from_secs(10), futures::future::join(sent, received))
            .await
            .expect("in time");
        sent.expect("sent");
        let mut expected = vec![Frame::Ping(0)];
        expected.extend((1..=5).map(event));
        expected.push(Frame::Ping(6));
        assert_eq!(received, expected);
    }
}
