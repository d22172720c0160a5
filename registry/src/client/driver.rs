//! The client's connection task: writes queued requests, reads replies and watch
//! events and hands them to their callers and streams. It ends when the
//! connection fails (failing everything in flight) or when every handle is gone.

use std::io;
use std::sync::Arc;

use futures::StreamExt;
use tandem_protocol::internal::{Refused, WriteLimits, WriteSource, error_chain};
use tandem_protocol::{Codec, CodecError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info_span, warn};

use super::error::Error;
use super::in_flight::InFlight;
use super::queue::{Item, Undelivered};
use crate::wire::{Op, Reply, Request, RequestId, ServerInfo, ServerMessage, ServiceEvent};

/// The driver's inputs.
#[derive(Debug)]
pub(crate) struct Inputs {
    /// Calls, registered in the in-flight table before they were queued.
    pub(crate) outgoing: mpsc::Receiver<Request>,
    /// Fire-and-forget requests (cancel a watch, end a lease) from `Drop`s and the reader.
    pub(crate) detached: mpsc::UnboundedReceiver<Op>,
    /// The reader's way to cancel a watch that fell behind.
    pub(crate) detached_tx: mpsc::UnboundedSender<Op>,
    /// Where the server's hello (its first message) goes.
    pub(crate) hello: oneshot::Sender<ServerInfo>,
}

/// Runs the connection on a new task.
pub(crate) fn spawn(stream: TcpStream, max_frame: usize, in_flight: Arc<InFlight>, inputs: Inputs) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let span = info_span!("registry_client", peer = %peer);
    tokio::spawn(run(stream, max_frame, in_flight, inputs).instrument(span));
}

async fn run(stream: TcpStream, max_frame: usize, in_flight: Arc<InFlight>, inputs: Inputs) {
    let (read, write) = stream.into_split();
    let reader = FramedRead::new(read, Codec::<ServerMessage>::with_max_frame_length(max_frame));
    let writer = FramedWrite::new(write, Codec::<ServerMessage>::with_max_frame_length(max_frame));
    let Inputs { outgoing, detached, detached_tx, hello } = inputs;
    let reason = tokio::select! {
        // `RegistryClient::close`: the in-flight table is already closed.
        () = in_flight.lost().cancelled() => return,
        error = read_loop(reader, &in_flight, detached_tx, hello) => {
            warn!(error = %error_chain(&error), "registry connection lost");
            error
        }
        result = write_loop(writer, outgoing, detached, &in_flight) => match result {
            Ok(()) => {
                debug!("every client handle dropped; closing the registry connection");
                Error::lost(io::Error::other("the client was dropped"))
            }
            Err(error) => {
                warn!(error = %error_chain(&error), "registry connection lost");
                error
            }
        },
    };
    in_flight.close(reason);
}

/// Dispatches what the server sends until the connection ends; returns why it ended.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FramedRead<R, Codec<ServerMessage>>,
    in_flight: &InFlight,
    detached_tx: mpsc::UnboundedSender<Op>,
    hello: oneshot::Sender<ServerInfo>,
) -> Error {
    let mut hello = Some(hello);
    loop {
        let message = match reader.next().await {
            None => {
                return Error::lost(io::Error::new(io::ErrorKind::UnexpectedEof, "the registry closed the connection"));
            }
            Some(Err(e)) => return Error::lost(e),
            Some(Ok(message)) => message,
        };
        let message = match (message, hello.take()) {
            (ServerMessage::Hello(info), Some(tx)) => {
                // The caller may have given up waiting: nothing to tell then.
                let _ = tx.send(info);
                continue;
            }
            (ServerMessage::Hello(_), None) => {
                return Error::lost(io::Error::new(io::ErrorKind::InvalidData, "the registry sent a second hello"));
            }
            (ServerMessage::Goodbye(error), _) => return Error::lost(error),
            (_, Some(_)) => {
                return Error::lost(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the registry did not start with a hello (a server from an older tandem?)",
                ));
            }
            (message, None) => message,
        };
        let (watch_id, delivered) = match message {
            ServerMessage::Reply(Reply { id, result }) => {
                in_flight.complete(id, result.map_err(Error::Remote));
                continue;
            }
            ServerMessage::Hello(_) | ServerMessage::Goodbye(_) => continue,
            ServerMessage::Event { watch_id, event } => {
                (watch_id, in_flight.deliver_change(watch_id, [Item::Event(event)]))
            }
            ServerMessage::Progress { watch_id, revision } => {
                (watch_id, in_flight.deliver_change(watch_id, [Item::Progress(revision)]))
            }
            ServerMessage::ServiceSnapshot { watch_id, instances } => {
                let joins = instances.into_iter().map(|i| Item::Event(ServiceEvent::Join(i)));
                (watch_id, in_flight.deliver_service(watch_id, joins))
            }
            ServerMessage::ServiceEvent { watch_id, event } => {
                (watch_id, in_flight.deliver_service(watch_id, [Item::Event(event)]))
            }
        };
        if delivered == Err(Undelivered::Full) {
            warn!(watch.id = watch_id, "watch consumer fell behind; cancelling the watch");
            let _ = detached_tx.send(Op::CancelWatch { watch_id });
        }
    }
}

/// Writes requests until every handle is gone (`Ok`) or writing fails.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FramedWrite<W, Codec<ServerMessage>>,
    outgoing: mpsc::Receiver<Request>,
    detached: mpsc::UnboundedReceiver<Op>,
    in_flight: &InFlight,
) -> Result<(), Error> {
    let mut requests = Requests { outgoing, detached, in_flight };
    tandem_protocol::internal::write_loop(&mut requests, &mut writer, WriteLimits::default())
        .await
        .into_result()
        .map_err(Error::lost)
}

/// Calls first, then fire-and-forget requests.
struct Requests<'a> {
    outgoing: mpsc::Receiver<Request>,
    detached: mpsc::UnboundedReceiver<Op>,
    in_flight: &'a InFlight,
}

impl WriteSource for Requests<'_> {
    type Item = Request;
    type Tag = RequestId;

    /// `None` once every handle is gone.
    async fn next(&mut self) -> Option<Request> {
        tokio::select! {
            biased;
            request = self.outgoing.recv() => request,
            Some(op) = self.detached.recv() => Some(Request { id: self.in_flight.next_id(), op }),
        }
    }

    fn try_next(&mut self) -> Option<Request> {
        match self.outgoing.try_recv() {
            Ok(request) => Some(request),
            Err(_) => self.detached.try_recv().ok().map(|op| Request { id: self.in_flight.next_id(), op }),
        }
    }

    fn tag(request: &Request) -> RequestId {
        request.id
    }

    /// The codec wrote nothing for this frame: only this call fails.
    fn refused(&mut self, id: RequestId, e: CodecError) -> Refused<Request> {
        self.in_flight.complete(id, Err(Error::RequestTooLarge(Arc::new(e))));
        Refused::Skip
    }
}
