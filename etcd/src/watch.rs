//! Watches that survive member failures and outages, resuming from the last
//! revision they delivered.
//!
//! ```text
//! etcd member A ──events rev 7, 8──> task ──> Watch (Stream)   next = 9
//!      X  (A dies: stream error → report → failover moves on)
//! etcd member B <──watch from rev 9── task                      no event missed
//!      compacted past 9? ──> task re-reads the range at rev R ──> Compacted { snapshot@R }, next = R + 1
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::error::Error;
use crate::failover::{Failover, Member};
use crate::handle::{Handle, classify};
use crate::kv::{KeyValue, Keys, Snapshot};

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Start {
    /// Every change from this revision on (inclusive): pass the revision after
    /// the one you last read (`Snapshot::revision + 1`) to miss nothing.
    Revision(i64),
    /// The current state first (a [`WatchEvent::Snapshot`]), then every change after it.
    Snapshot,
}

/// One change seen by a [`Watch`]. Events come in revision order, never twice.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: i64,
    },
    /// The watched range as it is now: the first event of a watch started
    /// with [`Start::Snapshot`].
    Snapshot(Snapshot),
    /// The cluster behind the client is not the one the watch was following:
    /// another cluster id, or a revision below what the watch already delivered
    /// (a cluster restored from a backup, or replaced). Revisions seen before
    /// mean nothing here: `snapshot` is the range as it is now (a key missing
    /// from it is gone), and the watch goes on from `snapshot.revision + 1`.
    Reset {
        /// Why the watch decided the cluster changed, for logs.
        reason: String,
        /// The current state of the range.
        snapshot: Snapshot,
    },
    /// etcd compacted its history past the revision the watch had to resume
    /// from, so the changes between that revision and `compact_revision` are
    /// lost. `snapshot` is the range as it is now (a key missing from it was
    /// deleted meanwhile); the watch goes on from `snapshot.revision + 1`.
    Compacted {
        /// The revision etcd compacted up to.
        compact_revision: i64,
        /// The current state of the range.
        snapshot: Snapshot,
    },
}

impl WatchEvent {
    /// The revision this event brings the watcher to.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
            WatchEvent::Snapshot(snapshot)
            | WatchEvent::Compacted { snapshot, .. }
            | WatchEvent::Reset { snapshot, .. } => snapshot.revision,
        }
    }
}

/// A stream of [`WatchEvent`]s for a key or a prefix. It does not end while
/// its client lives: failures and outages only delay events. Dropping it
/// cancels the watch.
#[derive(Debug)]
pub struct Watch {
    events: mpsc::Receiver<WatchEvent>,
    task: AbortHandle,
    /// Keeps the connection open while the watch lives.
    _handle: Handle,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Watch {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.events.poll_recv(cx)
    }
}

impl Watch {
    pub(crate) fn spawn(handle: Handle, keys: Keys, start: Start) -> Watch {
        // Full: the task waits (and so stops reading from etcd) until the consumer catches up.
        let (tx, events) = mpsc::channel(handle.config().watch_buffer.max(1));
        let task = tokio::spawn(run(handle.failover().clone(), keys, start, tx));
        Watch { events, task: task.abort_handle(), _handle: handle }
    }
}

/// What the task still owes its consumer before following changes.
enum Owed {
    Nothing,
    Snapshot,
    Compacted(i64),
    Reset(String),
}

enum Outcome {
    /// The consumer dropped the watch, or the client closed.
    Closed,
    /// The member failed (reported); wait for the next one.
    MemberFailed,
    /// The client moved to another member; follow there.
    Moved,
    /// etcd refused the watch for a reason of its own; retry after a pause.
    Refused,
    /// The resume revision was compacted up to this one.
    Compacted(i64),
    /// The cluster is not the one followed so far (why).
    Reset(String),
}

/// Which cluster a watch follows: the cluster id of the first response seen.
#[derive(Debug, Default)]
struct Seen {
    cluster_id: Option<u64>,
}

impl Seen {
    /// Checks a response header against what the watch knows; `Some(why)` when
    /// the cluster changed: another id, or a revision below `next - 1` (the last
    /// one delivered), which a live cluster never goes back to.
    fn check(&mut self, header: Option<&etcd_client::ResponseHeader>, next: i64) -> Option<String> {
        let header = header?;
        let cluster_id = header.cluster_id();
        if let Some(seen) = self.cluster_id
            && cluster_id != 0
            && seen != cluster_id
        {
            self.cluster_id = Some(cluster_id);
            return Some(format!("the cluster id changed from {seen:x} to {cluster_id:x}"));
        }
        if cluster_id != 0 {
            self.cluster_id = Some(cluster_id);
        }
        if header.revision() > 0 && header.revision() < next - 1 {
            return Some(format!(
                "the cluster's revision {} is below revision {} already delivered",
                header.revision(),
                next - 1
            ));
        }
        None
    }
}

async fn run(failover: Arc<Failover>, keys: Keys, start: Start, tx: mpsc::Sender<WatchEvent>) {
    let (mut next, mut owed) = match start {
        Start::Revision(revision) => (revision, Owed::Nothing),
        Start::Snapshot => (0, Owed::Snapshot),
    };
    let mut seen = Seen::default();
    loop {
        let Some(member) = failover.member().await else { return };
        let outcome = match owed {
            Owed::Nothing => follow(&failover, &member, &keys, &mut next, &mut seen, &tx).await,
            Owed::Snapshot | Owed::Compacted(_) | Owed::Reset(_) => {
                match read(&failover, &member, &keys, &mut seen).await {
                    Ok(snapshot) => {
                        next = snapshot.revision + 1;
                        let event = match std::mem::replace(&mut owed, Owed::Nothing) {
                            Owed::Reset(reason) => {
                                tracing::warn!(subscription.key = %keys, reason, revision = snapshot.revision,
                                "the etcd cluster changed under the watch; re-read the current state");
                                WatchEvent::Reset { reason, snapshot }
                            }
                            Owed::Compacted(compact_revision) => {
                                tracing::warn!(subscription.key = %keys, compact_revision, revision = snapshot.revision,
                                "watch history compacted; re-read the current state");
                                WatchEvent::Compacted { compact_revision, snapshot }
                            }
                            _ => WatchEvent::Snapshot(snapshot),
                        };
                        owed = Owed::Nothing;
                        if tx.send(event).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(outcome) => outcome,
                }
            }
        };
        match outcome {
            Outcome::Closed => return,
            Outcome::Moved => {}
            Outcome::MemberFailed => failover.replaced(&member).await,
            Outcome::Refused => {
                tokio::select! {
                    _ = tokio::time::sleep(failover.config().retry_max) => {}
                    _ = tx.closed() => return,
                }
            }
            Outcome::Compacted(compact_revision) => owed = Owed::Compacted(compact_revision),
            Outcome::Reset(reason) => owed = Owed::Reset(reason),
        }
    }
}

/// Reads the range on `member`.
async fn read(failover: &Failover, member: &Member, keys: &Keys, seen: &mut Seen) -> Result<Snapshot, Outcome> {
    let mut client = member.client.clone();
    let read = client.get(keys.key(), keys.get_options());
    match tokio::time::timeout(failover.config().request_timeout, read).await {
        Ok(Ok(response)) => Ok(Snapshot {
            revision: {
                // A snapshot is taken as it is: only note which cluster it came from.
                let _ = seen.check(response.header(), 0);
                response.header().map_or(0, |h| h.revision())
            },
            kvs: response.kvs().iter().map(KeyValue::from_etcd).collect(),
        }),
        Ok(Err(error)) => match classify(failover, member, error) {
            Error::Unavailable { .. } => Err(Outcome::MemberFailed),
            error => {
                tracing::warn!(subscription.key = %keys, error = %error.chain(), "watch read refused");
                Err(Outcome::Refused)
            }
        },
        Err(_) => {
            failover.report(member, &"a read timed out");
            Err(Outcome::MemberFailed)
        }
    }
}

/// Follows changes from `next` on `member` until something ends it; `next`
/// always names the first revision not yet delivered.
async fn follow(
    failover: &Failover,
    member: &Member,
    keys: &Keys,
    next: &mut i64,
    seen: &mut Seen,
    tx: &mpsc::Sender<WatchEvent>,
) -> Outcome {
    let mut client = member.client.clone();
    let options = keys.watch_options().with_start_revision(*next);
    let opened = tokio::select! {
        opened = tokio::time::timeout(failover.config().request_timeout, client.watch(keys.key(), Some(options))) => opened,
        _ = failover.replaced(member) => return Outcome::Moved,
        _ = tx.closed() => return Outcome::Closed,
    };
    let mut stream = match opened {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return failed(failover, member, keys, error),
        Err(_) => {
            failover.report(member, &"a watch did not open in time");
            return Outcome::MemberFailed;
        }
    };
    tracing::debug!(endpoint = %member.endpoint, subscription.key = %keys, from = *next, "watching");
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = failover.replaced(member) => return Outcome::Moved,
            _ = tx.closed() => return Outcome::Closed,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                failover.report(member, &"the watch stream ended");
                return Outcome::MemberFailed;
            }
            Err(error) => return failed(failover, member, keys, error),
        };
        if let Some(reason) = seen.check(response.header(), *next) {
            return Outcome::Reset(reason);
        }
        if response.compact_revision() > 0 {
            return Outcome::Compacted(response.compact_revision());
        }
        if response.canceled() {
            let reason = response.cancel_reason().to_string();
            if reason.contains("leader") {
                failover.report(member, &reason);
                return Outcome::MemberFailed;
            }
            tracing::warn!(subscription.key = %keys, reason, "etcd cancelled the watch; retrying");
            return Outcome::Refused;
        }
        // Defensive: a resumed watch never needs what came before `from`.
        let from = *next;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            if revision < from {
                continue;
            }
            let event = match event.event_type() {
                etcd_client::EventType::Put => WatchEvent::Put(KeyValue::from_etcd(kv)),
                etcd_client::EventType::Delete => {
                    WatchEvent::Delete { key: String::from_utf8_lossy(kv.key()).into_owned(), revision }
                }
            };
            if tx.send(event).await.is_err() {
                return Outcome::Closed;
            }
            // Every event of one revision comes in the same response, so the
            // next revision is where a resumed watch must start.
            *next = revision + 1;
        }
    }
}

fn failed(failover: &Failover, member: &Member, keys: &Keys, error: etcd_client::Error) -> Outcome {
    match classify(failover, member, error) {
        Error::Unavailable { .. } => Outcome::MemberFailed,
        error => {
            tracing::warn!(subscription.key = %keys, error = %error.chain(), "watch refused");
            Outcome::Refused
        }
    }
}
