//! The master's side of one child's channels: a reader task feeding the
//! master's loop decoded frames, a writer task draining the child's two
//! bounded queues (control first, then data), a waiter task that owns the
//! `Child` (kills it on request, reaps it), and the hand-over of its
//! listening sockets. The loop never waits on a child: it only `try_send`s.

use std::process::ExitStatus;
use std::sync::Arc;

use futures::StreamExt;
use tandem_protocol::CodecError;
use tandem_protocol::internal::{Refused, WriteLimits, WriteSource, error_chain};
use tandem_protocol::unix::{UnixReadHalf, UnixWriteHalf};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::identity::ProcKey;
use crate::ipc::{FromChild, MasterCodec, ToChild};
use crate::listeners::BoundListeners;
use crate::round_robin::RoundRobin;
use crate::router::Relay;
use crate::{BoxError, WorkerId};

/// Frames written to a child per flush after the first.
const WRITE_BATCH: usize = 64;

/// What the master's loop hears from its children's tasks (and from the master function).
#[derive(Debug)]
pub(crate) enum Input {
    FromChild(ProcKey, FromChild),
    /// The child sent bytes that are not an IPC message (the error, with its causes).
    BadFrame(ProcKey, String),
    /// The child's end of the channel closed; with why when reading failed
    /// (it died with bytes unread, most often) rather than at a clean EOF.
    Eof(ProcKey, Option<String>),
    Exited(ProcKey, Option<ExitStatus>),
    /// The master function returned an error.
    HookFailed(BoxError),
}

/// Hands worker `id` its listening sockets over its descriptor channel. A
/// failure means the child is gone or broken; it then fails to start (it waits
/// for these sockets), which the supervisor reports and handles.
pub(crate) async fn send_listeners(
    listeners: Arc<BoundListeners>,
    id: WorkerId,
    fd_channel: std::os::fd::OwnedFd,
    round_robin: Option<RoundRobin>,
    key: ProcKey,
) {
    let channel = match crate::fdpass::FdChannel::new(fd_channel) {
        Ok(channel) => channel,
        Err(e) => {
            tracing::error!(error = %e, "could not set up the descriptor channel");
            return;
        }
    };
    for (header, fd) in listeners.for_worker(id) {
        if let Err(e) = channel.send(&header, fd).await {
            tracing::error!(error = %e, header, "could not pass a listening socket to the worker");
            return;
        }
    }
    // Round-robin connections and their acknowledgements use the same channel.
    if let Some(rr) = round_robin {
        rr.register(key, Arc::new(channel)).await;
    }
}

/// Writes queued messages to one child: control first, then data, in batches
/// of at most `WRITE_BATCH + 1`. Ends when both queues are closed or the child
/// is gone (its waiter reports the exit).
pub(crate) async fn write_to_child(wr: UnixWriteHalf, control: mpsc::Receiver<ToChild>, data: mpsc::Receiver<ToChild>) {
    let mut w = FramedWrite::new(wr, MasterCodec::new());
    let limits = WriteLimits::default().max_batch(WRITE_BATCH + 1);
    let _ = tandem_protocol::internal::write_loop(&mut ToChildQueues { control, data }, &mut w, limits).await;
}

struct ToChildQueues {
    control: mpsc::Receiver<ToChild>,
    data: mpsc::Receiver<ToChild>,
}

impl WriteSource for ToChildQueues {
    type Item = ToChild;
    type Tag = ();

    async fn next(&mut self) -> Option<ToChild> {
        tokio::select! {
            biased;
            Some(item) = self.control.recv() => Some(item),
            Some(item) = self.data.recv() => Some(item),
            else => None,
        }
    }

    fn try_next(&mut self) -> Option<ToChild> {
        self.control.try_recv().or_else(|_| self.data.try_recv()).ok()
    }

    fn tag(_: &ToChild) {}

    /// A message that cannot be encoded (too large) is dropped without breaking the channel.
    fn refused(&mut self, (): (), error: CodecError) -> Refused<ToChild> {
        tracing::warn!(error = %error, "message to a child dropped");
        Refused::Skip
    }
}

/// Reads one child's channel into the master's loop; its links' frames and
/// credits go straight to the other end through `relay` (the router's fast
/// path, see `router/relay.rs`) when the master runs on one thread.
pub(crate) async fn read_from_child(rd: UnixReadHalf, key: ProcKey, tx: mpsc::Sender<Input>, relay: Relay) {
    let fast = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread;
    let mut reader = FramedRead::new(rd, MasterCodec::new());
    loop {
        let input = match reader.next().await {
            Some(Ok(msg @ (FromChild::LinkFrame { .. } | FromChild::LinkCredit { .. }))) if fast => {
                match relay.forward(key, msg) {
                    Ok(()) => continue,
                    Err(msg) => Input::FromChild(key, msg),
                }
            }
            Some(Ok(msg)) => Input::FromChild(key, msg),
            Some(Err(e)) => {
                let input = match e {
                    CodecError::Io(_) => Input::Eof(key, Some(error_chain(&e))),
                    _ => Input::BadFrame(key, error_chain(&e)),
                };
                let _ = tx.send(input).await;
                return;
            }
            None => {
                let _ = tx.send(Input::Eof(key, None)).await;
                return;
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// Owns the child: reaps it (waitpid) when it exits, or SIGKILLs it on request
/// and then reaps it.
pub(crate) async fn wait_for_child(
    mut child: Child,
    kill: oneshot::Receiver<()>,
    key: ProcKey,
    tx: mpsc::Sender<Input>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        Ok(()) = kill => {
            if let Err(e) = child.start_kill() {
                tracing::warn!(error = %e, "SIGKILL failed");
            }
            child.wait().await
        }
    };
    let status = match status {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::error!(error = %e, "could not reap a child");
            None
        }
    };
    let _ = tx.send(Input::Exited(key, status)).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use std::time::Duration;

    use super::*;
    use crate::identity::SlotId;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// What `read_from_child` reports for the bytes a child end writes and then how it goes away.
    async fn read_outcome(written: &[u8], child_reads_nothing_sent: bool) -> Input {
        let (master, mut child) = tokio::net::UnixStream::pair().unwrap();
        let (rd, mut wr) = tandem_protocol::unix::split(master).unwrap();
        child.write_all(written).await.unwrap();
        if child_reads_nothing_sent {
            // Bytes the child never read: closing its end resets the connection.
            wr.write_all(b"unread").await.unwrap();
        }
        drop(child);
        let key = ProcKey { slot: SlotId::Agent, generation: 1 };
        let (tx, mut rx) = mpsc::channel(4);
        tokio::time::timeout(TEST_TIMEOUT, read_from_child(rd, key, tx, Relay::default())).await.unwrap();
        rx.recv().await.unwrap()
    }

    #[tokio::test]
    async fn a_child_gone_with_bytes_unread_is_a_read_failure_with_its_cause_not_a_bad_frame() {
        match read_outcome(b"", true).await {
            Input::Eof(_, Some(error)) => assert!(error.contains("connection I/O failed: "), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_outcome(b"", false).await, Input::Eof(_, None)));
    }

    #[tokio::test]
    async fn bytes_that_are_no_ipc_message_are_a_bad_frame_with_the_decoder_s_reason() {
        match read_outcome(b"\x00\x00\x00\x01\xc1", false).await {
            Input::BadFrame(_, error) => assert!(error.starts_with("malformed frame body: "), "{error}"),
            other => panic!("{other:?}"),
        }
    }
}
