//! A link: a bidirectional stream of frames, whatever carries it.
//!
//! The leader serves links and the follower's driver talks over one. A link may
//! be a socket (framed with [`FrameCodec`](crate::FrameCodec)), an in-process
//! channel pair (the leader's own process: no socket, no encoding), or a relay
//! through the cluster master (the messenger transport).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::mpsc as fmpsc;
use futures::sink::{Sink, SinkExt};
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{CodecError, Frame, FrameCodec, SharedFrame};

/// What the sending half of a link accepts: frames, and frames encoded once
/// for many links ([`SharedFrame`]; a socket copies its bytes, other links
/// take the frame).
pub trait FrameSink: Sink<Frame, Error = CodecError> + Sink<SharedFrame, Error = CodecError> + Send {}

impl<T> FrameSink for T where T: Sink<Frame, Error = CodecError> + Sink<SharedFrame, Error = CodecError> + Send + ?Sized {}

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
        Link { rx: rx.boxed(), tx: Box::pin(Unshare(Box::pin(tx))) }
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
struct Unshare(Pin<Box<dyn Sink<Frame, Error = CodecError> + Send>>);

impl Sink<Frame> for Unshare {
    type Error = CodecError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        self.0.as_mut().poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Frame) -> Result<(), CodecError> {
        self.0.as_mut().start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        self.0.as_mut().poll_close(cx)
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
