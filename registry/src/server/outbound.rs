//! One connection's outbound path: two bounded queues and the task that writes them.
//!
//! Replies (and a watch's catch-up) go through the *control* queue, which the
//! session awaits when full: a client that does not read only stops its own
//! requests from being served. Live watch events go through the *events*
//! queue, which is never awaited: the server's shared state pushes into it while
//! holding its lock. It is bounded both in events and in bytes (values can be
//! large); when either bound is reached the client is too slow, so its
//! connection is closed (the reason is logged) and nobody else waits.
//!
//! The writer prefers the control queue, and checks it again before writing any
//! event, so everything queued on control before an event is written first (a
//! watch's replay and `Progress` always precede its live events).

use crate::code;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_protocol::internal::{Refused, WriteLimits, WriteSource};
use tandem_protocol::{Codec, CodecError, RemoteError};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use futures::SinkExt;

use super::conn_id::ConnId;
use crate::wire::{Instance, Reply, Request, RequestId, Response, ServerMessage, ServiceEvent, WatchEvent};

/// Replies and catch-up messages waiting to be written to one connection.
/// When full, the session waits (it stops reading that connection's requests).
const CONTROL_QUEUE: usize = 64;

/// The session's end of the outbound path.
#[derive(Debug)]
pub(crate) struct Outbound {
    control: mpsc::Sender<ServerMessage>,
    events: EventSender,
}

/// The connection is gone; stop serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gone;

/// Pushes live watch events to one connection without ever waiting.
///
/// It runs in whichever session made the change, so its logs name the watching
/// connection as `watcher.conn.id`.
#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    conn: ConnId,
    tx: mpsc::Sender<ServerMessage>,
    /// The approximate size of the queued events.
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    closing: CancellationToken,
}

/// How much a connection's live events may pile up before it is closed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventBounds {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
}

/// The writer's end of the outbound path.
#[derive(Debug)]
pub(crate) struct Queues {
    control: mpsc::Receiver<ServerMessage>,
    events: mpsc::Receiver<ServerMessage>,
    queued_bytes: Arc<AtomicUsize>,
    /// An event taken from its queue while control messages were still waiting.
    stashed: Option<ServerMessage>,
}

/// The outbound queues of connection `conn`; `closing` is cancelled when it must be dropped at once.
pub(crate) fn channel(conn: ConnId, bounds: EventBounds, closing: CancellationToken) -> (Outbound, Queues) {
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(bounds.events.max(1));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let events =
        EventSender { conn, tx: events_tx, queued_bytes: queued_bytes.clone(), max_bytes: bounds.bytes, closing };
    let queues = Queues { control: control_rx, events: events_rx, queued_bytes, stashed: None };
    (Outbound { control: control_tx, events }, queues)
}

impl Outbound {
    /// Queues the reply to request `id`, waiting while the control queue is full.
    pub(crate) async fn reply(&self, id: RequestId, result: Result<Response, RemoteError>) -> Result<(), Gone> {
        self.send(ServerMessage::Reply(Reply { id, result })).await
    }

    /// Queues a control message, waiting while the control queue is full.
    pub(crate) async fn send(&self, message: ServerMessage) -> Result<(), Gone> {
        self.control.send(message).await.map_err(|_| Gone)
    }

    /// Reserves a control slot, to be filled while holding the state lock.
    pub(crate) async fn reserve(&self) -> Result<mpsc::Permit<'_, ServerMessage>, Gone> {
        self.control.reserve().await.map_err(|_| Gone)
    }

    /// Queues a last message if there is room; a peer that does not read will not get it.
    pub(crate) fn try_send(&self, message: ServerMessage) {
        let _ = self.control.try_send(message);
    }

    /// The handle watchers use to push live events.
    pub(crate) fn events(&self) -> EventSender {
        self.events.clone()
    }
}

impl EventSender {
    /// Queues a live event; closes the connection if its queue is full.
    pub(crate) fn push(&self, message: ServerMessage) {
        if self.closing.is_cancelled() {
            return;
        }
        let size = approximate_size(&message);
        let queued = self.queued_bytes.fetch_add(size, Ordering::Relaxed) + size;
        if queued > self.max_bytes {
            warn!(
                watcher.conn.id = self.conn,
                queued_bytes = queued,
                max_bytes = self.max_bytes,
                "closing connection: too many bytes of watch events queued, the client reads too slowly"
            );
            self.closing.cancel();
            return;
        }
        match self.tx.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    watcher.conn.id = self.conn,
                    max_events = self.tx.max_capacity(),
                    "closing connection: too many watch events queued, the client reads too slowly"
                );
                self.closing.cancel();
            }
            // The session is ending; its watchers are about to be removed.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Queues {
    fn take_event(&mut self, event: ServerMessage) -> ServerMessage {
        self.queued_bytes.fetch_sub(approximate_size(&event), Ordering::Relaxed);
        match self.control.try_recv() {
            Ok(control) => {
                self.stashed = Some(event);
                control
            }
            Err(_) => event,
        }
    }
}

/// Control messages first; a reply the codec refuses becomes an error reply,
/// any other refused message ends the connection.
impl WriteSource for Queues {
    type Item = ServerMessage;
    /// The id of a reply.
    type Tag = Option<RequestId>;

    /// The next message to write; `None` once the session dropped its [`Outbound`].
    async fn next(&mut self) -> Option<ServerMessage> {
        if let Some(message) = self.try_next() {
            return Some(message);
        }
        tokio::select! {
            biased;
            message = self.control.recv() => message,
            Some(event) = self.events.recv() => Some(self.take_event(event)),
        }
    }

    fn try_next(&mut self) -> Option<ServerMessage> {
        if let Ok(message) = self.control.try_recv() {
            return Some(message);
        }
        if let Some(event) = self.stashed.take() {
            return Some(event);
        }
        let event = self.events.try_recv().ok()?;
        Some(self.take_event(event))
    }

    fn tag(message: &ServerMessage) -> Option<RequestId> {
        match message {
            ServerMessage::Reply(Reply { id, .. }) => Some(*id),
            _ => None,
        }
    }

    fn refused(&mut self, reply: Option<RequestId>, e: CodecError) -> Refused<ServerMessage> {
        // The stream stays consistent: the codec writes nothing for a frame it refuses.
        let Some(id) = reply else { return Refused::Fatal(e) };
        warn!(request.id = id, error = %e, "reply does not fit in a frame");
        let error =
            RemoteError::internal(format!("the reply does not fit in one frame: {e}")).with_code(code::REPLY_TOO_LARGE);
        Refused::Replace(ServerMessage::Reply(Reply { id, result: Err(error) }))
    }
}

/// Writes queued messages until the session drops its [`Outbound`], then closes the socket.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut queues: Queues,
    mut sink: FramedWrite<W, Codec<Request>>,
) -> Result<(), CodecError> {
    tandem_protocol::internal::write_loop(&mut queues, &mut sink, WriteLimits::default()).await.into_result()?;
    SinkExt::<ServerMessage>::close(&mut sink).await
}

/// Roughly what a live event costs in memory and on the wire.
fn approximate_size(message: &ServerMessage) -> usize {
    const OVERHEAD: usize = 32;
    let instance = |i: &Instance| {
        i.service.len()
            + i.id.len()
            + i.address.len()
            + i.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    };
    OVERHEAD
        + match message {
            ServerMessage::Event { event: WatchEvent::Put { key, value, .. }, .. } => key.len() + value.len(),
            ServerMessage::Event { event, .. } => event.key().len(),
            ServerMessage::ServiceEvent { event: ServiceEvent::Join(i), .. } => instance(i),
            ServerMessage::ServiceEvent { event: ServiceEvent::Leave { service, id }, .. } => service.len() + id.len(),
            _ => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(revision: u64) -> ServerMessage {
        ServerMessage::Progress { watch_id: 1, revision }
    }

    #[tokio::test]
    async fn control_messages_queued_first_are_written_first() {
        let closing = CancellationToken::new();
        let (outbound, mut queues) = channel(1, EventBounds { events: 8, bytes: 1 << 20 }, closing.clone());
        let events = outbound.events();
        outbound.send(progress(1)).await.expect("queued");
        outbound.send(progress(2)).await.expect("queued");
        events.push(progress(3));
        outbound.send(progress(4)).await.expect("queued");
        events.push(progress(5));
        let mut written = Vec::new();
        for _ in 0..5 {
            let Some(ServerMessage::Progress { revision, .. }) = queues.next().await else { panic!("a message") };
            written.push(revision);
        }
        // An event never overtakes a control message queued before it; control may overtake events.
        assert_eq!(written, vec![1, 2, 4, 3, 5]);
        drop((outbound, events));
        assert_eq!(queues.next().await, None);
        assert!(!closing.is_cancelled());
    }

    async fn write_all(queues: Queues, max_frame: usize) -> (Result<(), CodecError>, Vec<ServerMessage>) {
        use futures::StreamExt;
        use tokio_util::codec::FramedRead;

        let (near, far) = tokio::io::duplex(1 << 16);
        let sink = FramedWrite::new(near, Codec::<Request>::with_max_frame_length(max_frame));
        let written = tokio::time::timeout(std::time::Duration::from_secs(10), write_loop(queues, sink))
            .await
            .expect("the writer ends");
        let read = FramedRead::new(far, Codec::<ServerMessage>::new()).map(|m| m.expect("a message")).collect().await;
        (written, read)
    }

    #[tokio::test]
    async fn a_reply_too_large_becomes_an_error_reply() {
        use crate::wire::{KeyValue, Response};

        let closing = CancellationToken::new();
        let (outbound, queues) = channel(1, EventBounds { events: 8, bytes: 1 << 20 }, closing);
        let kv = KeyValue { key: "k".into(), value: bytes::Bytes::from(vec![0u8; 1000]), mod_revision: 2 };
        outbound.reply(1, Ok(Response::Value { kv: Some(kv), revision: 2 })).await.expect("queued");
        outbound.reply(2, Ok(Response::Done)).await.expect("queued");
        drop(outbound);
        let (written, read) = write_all(queues, 256).await;
        assert!(written.is_ok(), "{written:?}");
        let ids_and_codes: Vec<(RequestId, Option<tandem_protocol::ErrorCode>)> = read
            .into_iter()
            .map(|m| match m {
                ServerMessage::Reply(Reply { id, result }) => (id, result.err().map(|e| e.code)),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids_and_codes, vec![(1, Some(code::REPLY_TOO_LARGE)), (2, None)]);
    }

    #[tokio::test]
    async fn an_event_too_large_ends_the_writer() {
        let closing = CancellationToken::new();
        let (outbound, queues) = channel(1, EventBounds { events: 8, bytes: 1 << 20 }, closing);
        outbound.events().push(ServerMessage::Event {
            watch_id: 1,
            event: WatchEvent::Put { key: "k".into(), value: bytes::Bytes::from(vec![0u8; 1000]), revision: 3 },
        });
        let (written, read) = write_all(queues, 256).await;
        assert!(matches!(written, Err(CodecError::TooLarge { max: 256, .. })), "{written:?}");
        assert_eq!(read, vec![]);
        drop(outbound);
    }

    #[tokio::test]
    async fn too_many_queued_events_close_the_connection() {
        let closing = CancellationToken::new();
        let (outbound, _queues) = channel(1, EventBounds { events: 2, bytes: 1 << 20 }, closing.clone());
        let events = outbound.events();
        events.push(progress(1));
        events.push(progress(2));
        assert!(!closing.is_cancelled());
        events.push(progress(3));
        assert!(closing.is_cancelled());
    }

    #[tokio::test]
    async fn too_many_queued_bytes_close_the_connection() {
        let put = |n: usize| ServerMessage::Event {
            watch_id: 1,
            event: WatchEvent::Put { key: "k".into(), value: bytes::Bytes::from(vec![0u8; n]), revision: 2 },
        };
        let closing = CancellationToken::new();
        let (outbound, mut queues) = channel(1, EventBounds { events: 100, bytes: 1000 }, closing.clone());
        let events = outbound.events();
        events.push(put(400));
        events.push(put(400));
        // Written events no longer count.
        assert!(queues.next().await.is_some());
        events.push(put(400));
        assert!(!closing.is_cancelled());
        events.push(put(400));
        assert!(closing.is_cancelled());
    }
}
