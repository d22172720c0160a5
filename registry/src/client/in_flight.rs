//! The client's outstanding calls and open watches, keyed by request id; shared
//! by the callers (who register before sending) and the connection's reader (who
//! completes them). When the connection is lost, everything in here fails at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tandem_protocol::RemoteError;
use tandem_protocol::internal::{InsertError, PendingTable};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::error::Error;
use super::queue::{Feed, Item, Undelivered};
use crate::wire::{RequestId, Response, ServiceEvent, WatchEvent};

/// Where a watch's events go.
#[derive(Debug)]
pub(crate) enum WatchSink {
    Keys(Feed<WatchEvent>),
    Service(Feed<ServiceEvent>),
}

impl WatchSink {
    fn finish(self, error: Option<Error>) {
        match self {
            WatchSink::Keys(feed) => feed.finish(error),
            WatchSink::Service(feed) => feed.finish(error),
        }
    }
}

type ReplyTx = oneshot::Sender<Result<Response, Error>>;

#[derive(Debug, Default)]
struct State {
    /// Why the connection was lost: set once, when both tables are closed.
    closed: Option<Error>,
    calls: PendingTable<ReplyTx>,
    watches: PendingTable<WatchSink>,
}

impl State {
    /// What the caller of a refused request is told.
    fn refusal<V>(&self, refused: &InsertError<V>) -> Error {
        if refused.is_closed() {
            return self.closed.clone().unwrap_or(Error::ConnectionLost { source: None });
        }
        // Never: ids come from one counter.
        tracing::error!(error = %refused, "request not sent");
        Error::Remote(RemoteError::internal(refused.to_string()))
    }
}

#[derive(Debug)]
pub(crate) struct InFlight {
    state: Mutex<State>,
    last_id: AtomicU64,
    lost: CancellationToken,
}

impl InFlight {
    pub(crate) fn new() -> Self {
        InFlight { state: Mutex::new(State::default()), last_id: AtomicU64::new(0), lost: CancellationToken::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh request id (never 0).
    pub(crate) fn next_id(&self) -> RequestId {
        self.last_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Cancelled when the connection is lost.
    pub(crate) fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Why the connection was lost (a generic loss if it was not, yet).
    pub(crate) fn lost_error(&self) -> Error {
        self.lock().closed.clone().unwrap_or(Error::ConnectionLost { source: None })
    }

    /// Registers call `id` (and, for a watch, where its events go) before it is sent.
    pub(crate) fn start(
        &self,
        id: RequestId,
        sink: Option<WatchSink>,
    ) -> Result<oneshot::Receiver<Result<Response, Error>>, Error> {
        let mut state = self.lock();
        let (tx, rx) = oneshot::channel();
        if let Err(refused) = state.calls.insert(id, tx) {
            return Err(state.refusal(&refused));
        }
        if let Some(sink) = sink
            && let Err(refused) = state.watches.insert(id, sink)
        {
            state.calls.remove(id);
            let error = state.refusal(&refused);
            drop(state);
            refused.into_value().finish(Some(error.clone()));
            return Err(error);
        }
        Ok(rx)
    }

    /// Hands the outcome of call `id` to its caller (ignored if the caller is gone).
    pub(crate) fn complete(&self, id: RequestId, result: Result<Response, Error>) {
        let tx = self.lock().calls.remove(id);
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
    }

    /// Forgets call `id`, whose caller stopped waiting.
    pub(crate) fn forget_call(&self, id: RequestId) {
        self.lock().calls.remove(id);
    }

    /// Forgets watch `id`; true if it was still open.
    pub(crate) fn forget_watch(&self, id: RequestId) -> bool {
        let sink = self.lock().watches.remove(id);
        sink.map(|sink| sink.finish(None)).is_some()
    }

    /// Queues items for key watch `id`; `Err(Full)` means the watch was ended with
    /// [`Error::Lagged`] and must be cancelled on the server.
    pub(crate) fn deliver_change(
        &self,
        id: RequestId,
        items: impl IntoIterator<Item = Item<WatchEvent>>,
    ) -> Result<(), Undelivered> {
        self.deliver(id, |sink| match sink {
            WatchSink::Keys(feed) => items.into_iter().try_for_each(|item| feed.push(item)),
            WatchSink::Service(_) => Ok(()),
        })
    }

    /// Queues items for service watch `id`; errors as for [`InFlight::deliver_change`].
    pub(crate) fn deliver_service(
        &self,
        id: RequestId,
        items: impl IntoIterator<Item = Item<ServiceEvent>>,
    ) -> Result<(), Undelivered> {
        self.deliver(id, |sink| match sink {
            WatchSink::Service(feed) => items.into_iter().try_for_each(|item| feed.push(item)),
            WatchSink::Keys(_) => Ok(()),
        })
    }

    fn deliver(
        &self,
        id: RequestId,
        push: impl FnOnce(&WatchSink) -> Result<(), Undelivered>,
    ) -> Result<(), Undelivered> {
        let mut state = self.lock();
        // Unknown: the watch was cancelled; the server may still send what was in flight.
        let Some(sink) = state.watches.get(id) else { return Ok(()) };
        let result = push(sink);
        if let Err(undelivered) = &result
            && let Some(sink) = state.watches.remove(id)
        {
            sink.finish((*undelivered == Undelivered::Full).then_some(Error::Lagged));
        }
        result
    }

    /// Fails every call and ends every watch with `error`; later calls fail at once.
    pub(crate) fn close(&self, error: Error) {
        let (calls, watches) = {
            let mut state = self.lock();
            if state.calls.is_closed() {
                return;
            }
            state.closed = Some(error.clone());
            (state.calls.close(), state.watches.close())
        };
        self.lost.cancel();
        for (_, tx) in calls {
            let _ = tx.send(Err(error.clone()));
        }
        for (_, sink) in watches {
            sink.finish(Some(error.clone()));
        }
    }
}
