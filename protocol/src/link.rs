//! A link: a bidirectional stream of frames, whatever carries it.
//!
//! The leader serves links and the follower's driver talks over one. A link may
//! be a socket (framed with [`FrameCodec`](crate::FrameCodec)), an in-process
//! channel pair (the leader's own process: no socket, no encoding), or a relay
//! through the cluster master (the messenger transport).

use std::fmt;
use std::io;

use futures::channel::mpsc as fmpsc;
use futures::sink::{Sink, SinkExt};
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{CodecError, Frame, FrameCodec};

/// The boxed sending half of a link.
pub type LinkSink = std::pin::Pin<Box<dyn Sink<Frame, Error = CodecError> + Send>>;

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
        Link {
            rx: FramedRead::with_capacity(read, codec.clone(), 64 * 1024).boxed(),
            tx: Box::pin(FramedWrite::new(write, codec)),
        }
    }

    /// A link from any stream and sink of frames.
    pub fn new<S, K>(rx: S, tx: K) -> Link
    where
        S: Stream<Item = Result<Frame, CodecError>> + Send + 'static,
        K: Sink<Frame, Error = CodecError> + Send + 'static,
    {
        Link { rx: rx.boxed(), tx: Box::pin(tx) }
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
        Link { rx: rx.map(Ok).boxed(), tx: Box::pin(tx) }
    }

    /// A link over tokio mpsc channels (as the cluster's messenger relay hands out).
    pub fn from_mpsc(tx: tokio::sync::mpsc::Sender<Frame>, rx: tokio::sync::mpsc::Receiver<Frame>) -> Link {
        let tx = tokio_util::sync::PollSender::new(tx)
            .sink_map_err(|_| CodecError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "peer closed the link")));
        let rx = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (Ok(f), rx)) });
        Link { rx: rx.boxed(), tx: Box::pin(tx) }
    }
}
