//! The client-side streams of a watch ([`Watch`], [`ServiceWatch`]), which cancel
//! the server-side watch on drop.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures::Stream;

use super::RegistryClient;
use super::error::Error;
use super::queue::{Item, Receiver, Rx};
use crate::wire::{RequestId, ServiceEvent, WatchEvent};

/// Cancels a server-side watch when its stream goes away.
#[derive(Debug)]
struct CancelOnDrop {
    client: RegistryClient,
    id: RequestId,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.client.end_watch(self.id);
    }
}

/// A stream of the changes of a key or prefix, from [`RegistryClient::watch`].
///
/// Yields `Ok(event)` in revision order. When the connection is lost (or the
/// watch falls behind by more than [`WATCH_BUFFER`](crate::WATCH_BUFFER) events) it yields one `Err`,
/// then ends; watch again from [`Watch::revision`]` + 1` to resume without a gap.
/// Dropping it cancels the watch on the server.
#[derive(Debug)]
#[must_use = "a watch does nothing unless polled"]
pub struct Watch {
    receiver: Receiver<WatchEvent>,
    revision: u64,
    /// Inside a snapshot taken at this revision (after a `Compacted`).
    snapshot_at: Option<u64>,
    _cancel: CancelOnDrop,
}

impl Watch {
    pub(crate) fn new(
        client: RegistryClient,
        id: RequestId,
        rx: Rx<WatchEvent>,
        end: Arc<OnceLock<Error>>,
        from_revision: Option<u64>,
    ) -> Self {
        Watch {
            receiver: Receiver::new(rx, end),
            revision: from_revision.map_or(0, |r| r.saturating_sub(1)),
            snapshot_at: None,
            _cancel: CancelOnDrop { client, id },
        }
    }

    /// Every matching change up to this revision has been yielded: to resume after
    /// an error, watch again from `revision() + 1`.
    ///
    /// Before the server reported where a live-only watch starts, this is 0.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn observe(&mut self, event: &WatchEvent) {
        match (event, self.snapshot_at) {
            (WatchEvent::Compacted { revision, .. }, _) => {
                // The snapshot replaces what came before, even a higher revision from
                // another incarnation of the server.
                self.snapshot_at = Some(*revision);
                self.revision = *revision;
            }
            (_, Some(at)) if event.revision() <= at => {}
            _ => {
                self.snapshot_at = None;
                self.revision = self.revision.max(event.revision());
            }
        }
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match this.receiver.poll_item(cx) {
                Poll::Ready(Some(Ok(Item::Progress(revision)))) => {
                    this.snapshot_at = None;
                    this.revision = this.revision.max(revision);
                    continue;
                }
                Poll::Ready(Some(Ok(Item::Event(event)))) => {
                    this.observe(&event);
                    Poll::Ready(Some(Ok(event)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// A stream of the instances joining and leaving a service, from [`RegistryClient::watch_service`].
///
/// Starts with one [`ServiceEvent::Join`] per current instance. Ends like a
/// [`Watch`]: one `Err` when the connection is lost, then `None`. Dropping it
/// cancels the watch on the server.
#[derive(Debug)]
#[must_use = "a watch does nothing unless polled"]
pub struct ServiceWatch {
    receiver: Receiver<ServiceEvent>,
    _cancel: CancelOnDrop,
}

impl ServiceWatch {
    pub(crate) fn new(client: RegistryClient, id: RequestId, rx: Rx<ServiceEvent>, end: Arc<OnceLock<Error>>) -> Self {
        ServiceWatch { receiver: Receiver::new(rx, end), _cancel: CancelOnDrop { client, id } }
    }
}

impl Stream for ServiceWatch {
    type Item = Result<ServiceEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match this.receiver.poll_item(cx) {
                Poll::Ready(Some(Ok(Item::Progress(_)))) => continue,
                Poll::Ready(Some(Ok(Item::Event(event)))) => Poll::Ready(Some(Ok(event))),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}
