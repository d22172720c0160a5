//! The writing side of a session: the writer task that drains the outbox to
//! the link, and the channel status changes it forwards.

use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use tandem_protocol::internal::{WriteEnd, WriteLimits};
use tandem_protocol::{ChannelStatus, Frame, LinkSink, UpstreamState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::channel::Channel;
use crate::fence::Fence;
use crate::outbox::{Batches, Outbox, OutgoingSink};
use crate::session_end::SessionEnd;

/// Tells the follower about every change of a channel's upstream state.
pub(super) async fn forward_status(
    channel: Arc<Channel>,
    mut state: watch::Receiver<UpstreamState>,
    outbox: Arc<Outbox>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = state.borrow_and_update().clone();
                if !outbox.push(Frame::Status(ChannelStatus { channel: channel.name.clone().into(), state: current })) {
                    return;
                }
            }
        }
    }
}

/// Writes batches from the outbox until it closes or the follower stops reading.
pub(super) async fn write_loop(
    mut tx: LinkSink,
    outbox: Arc<Outbox>,
    stall: Duration,
    fence: Option<(Arc<Fence>, u64)>,
) -> SessionEnd {
    // The stall bound applies to each step, so a big batch to a reader that
    // is slow but still reading is not mistaken for a stalled one.
    let limits = WriteLimits::default().stall(stall);
    let mut batches = Batches::new(outbox.clone(), fence);
    let reason = match tandem_protocol::internal::write_loop(&mut batches, &mut OutgoingSink(&mut tx), limits).await {
        WriteEnd::Finished => {
            let _ = tokio::time::timeout(stall, SinkExt::<Frame>::close(&mut tx)).await;
            return outbox.closed_reason().unwrap_or(SessionEnd::OutboxClosed);
        }
        WriteEnd::Stalled(stall) => SessionEnd::TooSlow(stall),
        WriteEnd::Failed(error) => SessionEnd::WriteFailed(Arc::new(error)),
    };
    outbox.close(reason.clone());
    reason
}
