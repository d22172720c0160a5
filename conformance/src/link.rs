//! The harness's side of the socket: it plays the Leader.

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tandem_protocol::uuid::Uuid;
use tandem_protocol::{ChannelStatus, Frame, FrameCodec, Hello, UpstreamState, Welcome};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{Encoder, FramedRead};

/// The Unix socket the follower under test connects to.
#[derive(Debug)]
pub(crate) struct Leader {
    listener: UnixListener,
}

impl Leader {
    pub(crate) fn bind(path: &Path) -> Result<Leader, String> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        Ok(Leader { listener })
    }

    /// The next connection, within `timeout`.
    pub(crate) async fn accept(&self, timeout: Duration) -> Result<Conn, String> {
        let (stream, _) = tokio::time::timeout(timeout, self.listener.accept())
            .await
            .map_err(|_| format!("the follower did not connect within {} ms", timeout.as_millis()))?
            .map_err(|e| format!("accept failed: {e}"))?;
        let peer_pid = stream.peer_cred().ok().and_then(|cred| cred.pid());
        let (read, write) = stream.into_split();
        Ok(Conn { rx: FramedRead::new(read, FrameCodec::new()), tx: write, peer_pid })
    }

    /// Whether a connection arrives within `window` (a follower that must not reconnect).
    pub(crate) async fn connects_within(&self, window: Duration) -> bool {
        tokio::time::timeout(window, self.listener.accept()).await.is_ok()
    }
}

/// One follower connection.
#[derive(Debug)]
pub(crate) struct Conn {
    rx: FramedRead<OwnedReadHalf, FrameCodec>,
    tx: OwnedWriteHalf,
    /// The connecting process, as the kernel says (SO_PEERCRED).
    pub(crate) peer_pid: Option<i32>,
}

/// What the harness's leader says in `Welcome`.
pub(crate) fn leader_id(epoch: u64) -> Uuid {
    Uuid::from_u128(0x7a4d_0000_0000_0000_0000_0000_0000_0000 | u128::from(epoch))
}

impl Conn {
    pub(crate) async fn send(&mut self, frame: Frame) -> Result<(), String> {
        let kind = frame.kind();
        let mut buf = BytesMut::new();
        FrameCodec::new().encode(frame, &mut buf).map_err(|e| format!("cannot encode {kind}: {e}"))?;
        self.send_raw(&buf).await.map_err(|e| format!("writing {kind}: {e}"))
    }

    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.tx.write_all(bytes).await.map_err(|e| format!("write to the follower failed: {e}"))
    }

    /// Ends the harness's half of the stream (the follower reads end-of-file).
    pub(crate) async fn shutdown_write(&mut self) {
        let _ = self.tx.shutdown().await;
    }

    /// The next frame as it arrives; `None` when the follower closed the stream.
    pub(crate) async fn recv_raw(&mut self, timeout: Duration) -> Result<Option<Frame>, String> {
        match tokio::time::timeout(timeout, self.rx.next()).await {
            Err(_) => Err(format!("no frame from the follower within {} ms", timeout.as_millis())),
            Ok(None) => Ok(None),
            Ok(Some(Ok(frame))) => Ok(Some(frame)),
            Ok(Some(Err(e))) => Err(format!("the follower sent bytes that are not a frame: {e}")),
        }
    }

    /// The next frame that is not part of the link's upkeep: a `Ping` is
    /// answered, a `Pong` skipped, an `Open` answered with `Status Ready` per name.
    pub(crate) async fn recv(&mut self, timeout: Duration) -> Result<Frame, String> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_raw(left).await? {
                None => return Err("the follower closed the connection".into()),
                Some(Frame::Ping(nonce)) => self.send(Frame::Pong(nonce)).await?,
                Some(Frame::Pong(_)) => {}
                Some(Frame::Open(channels)) => {
                    for channel in channels {
                        self.send(status(&channel, UpstreamState::Ready)).await?;
                    }
                }
                Some(frame) => return Ok(frame),
            }
        }
    }

    /// Waits for the follower to close the connection: `Goodbye`, `Ping` and
    /// `Pong` may come first (not answered), any other frame is an error.
    pub(crate) async fn expect_closed(&mut self, timeout: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.next()).await {
                Err(_) => return Err(format!("the follower kept the connection open for {} ms", timeout.as_millis())),
                Ok(None) | Ok(Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(Frame::Goodbye(_) | Frame::Ping(_) | Frame::Pong(_)))) => {}
                Ok(Some(Ok(other))) => return Err(format!("the follower sent {other:?} instead of closing")),
            }
        }
    }

    /// Reads the `Hello` (it must be the first frame); does not answer it.
    pub(crate) async fn hello(&mut self, timeout: Duration) -> Result<Hello, String> {
        match self.recv_raw(timeout).await? {
            Some(Frame::Hello(hello)) => Ok(hello),
            Some(other) => Err(format!("the first frame must be Hello, got {}", other.kind())),
            None => Err("the follower closed the connection before its Hello".into()),
        }
    }

    /// `Welcome` at `epoch`, then `Status Ready` for each channel the `Hello` named.
    pub(crate) async fn welcome(&mut self, hello: &Hello, epoch: u64, heartbeat_ms: u32) -> Result<(), String> {
        self.send(Frame::Welcome(Welcome {
            // The harness speaks whatever version the follower offered (it checked the range).
            version: hello.version,
            leader_id: leader_id(epoch),
            epoch,
            pid: std::process::id(),
            heartbeat_ms,
        }))
        .await?;
        for channel in &hello.channels {
            self.send(status(channel, UpstreamState::Ready)).await?;
        }
        Ok(())
    }
}

pub(crate) fn status(channel: &str, state: UpstreamState) -> Frame {
    Frame::Status(ChannelStatus { channel: channel.into(), state })
}
