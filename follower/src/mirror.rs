//! A mirror of the leader (protocol version 3, PROTOCOL.md §7.2): every key
//! the leader follows, with its latest value, position and upstream revision,
//! kept up to date on this connection. What a hot standby holds, and what a
//! new leader is seeded from (`tandem_leader::LeaderBuilder::seed`).
//!
//! ```text
//! Connection::mirror() --Mirror(id)--> leader
//!                      <--Ack(id)----- the handle is returned
//!                      <--Mirrored{entries, synced: false}-- ... snapshot batches
//!                      <--Mirrored{synced: true}------------ the snapshot replaces the map
//!                      <--Mirrored{[entry] | removed [k]}--- each update, applied at once
//! leader lost ----------------------- the map stays as it was: the standby's state
//! next leader ---------Mirror(id)---> a new snapshot, which replaces the map once complete
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{Api, ChannelName, ErrorCode, Frame, MIRROR_VERSION, MirrorEntry, Mirrored, RemoteError};
use tokio::sync::{oneshot, watch};

use crate::Error;
use crate::in_flight::{InFlight, Pending};
use crate::remote::Remote;

type MirrorKey = (ChannelName, Bytes);

/// One mirrored key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorValue {
    /// The epoch of the leader that produced the value.
    pub epoch: u64,
    /// Its sequence number within the epoch.
    pub seq: u64,
    /// The value: MessagePack bytes of the channel's event type.
    pub payload: Bytes,
    /// The upstream's resume point for the key, when its adapter gives one.
    pub revision: Option<u64>,
}

/// Where a mirror stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    /// A snapshot was complete once: the map holds every key the leader
    /// followed (then, or at the last update). Stays true after the leader is
    /// lost: the map is then what the last leader followed.
    pub synced: bool,
    /// The epoch of the leader whose snapshot was complete last (the map's
    /// source): a new leader is seeded from the map only when it succeeds
    /// that epoch's leader, never from an older leader's state.
    pub synced_epoch: Option<u64>,
    /// The updates applied so far (snapshots count one each): a counter to await changes on.
    pub updates: u64,
}

#[derive(Debug, Default)]
struct Map {
    values: HashMap<MirrorKey, MirrorValue>,
}

#[derive(Debug)]
struct Shared {
    map: Mutex<Map>,
    status: watch::Sender<MirrorStatus>,
}

/// A live view of the leader's followed keys (see [`Connection::mirror`](crate::Connection::mirror)).
/// Cheap to clone; every clone is the same view, kept up to date by the
/// connection's driver for the connection's life.
#[derive(Debug, Clone)]
pub struct Mirror {
    shared: Arc<Shared>,
}

impl Mirror {
    fn map(&self) -> MutexGuard<'_, Map> {
        self.shared.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.map().values.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key, as entries to seed a new leader with
    /// ([`LeaderBuilder::seed`](tandem_leader::LeaderBuilder::seed)).
    pub fn entries(&self) -> Vec<MirrorEntry> {
        self.map()
            .values
            .iter()
            .map(|((channel, key), value)| MirrorEntry {
                channel: channel.clone(),
                key: key.clone(),
                epoch: value.epoch,
                seq: value.seq,
                payload: value.payload.clone(),
                revision: value.revision,
            })
            .collect()
    }

    /// The value of `key` (its MessagePack bytes) of `channel`, if mirrored.
    pub fn get(&self, channel: &str, key: &[u8]) -> Option<MirrorValue> {
        self.map().values.get(&(ChannelName::from(channel), Bytes::copy_from_slice(key))).cloned()
    }

    /// The value of `key` of `A`'s channel, decoded, with where it stands.
    /// Fails if the key cannot be encoded or the value does not decode as `A::Event`.
    pub fn value<A: Api>(&self, key: &A::Key) -> Result<Option<(A::Event, MirrorValue)>, Error> {
        let key = encode(key)?;
        let Some(value) = self.get(A::NAME, &key) else { return Ok(None) };
        Ok(Some((decode(&value.payload)?, value)))
    }

    /// Where it stands now.
    pub fn status(&self) -> MirrorStatus {
        *self.shared.status.borrow()
    }

    /// Its status, observable: `changed()` after each update.
    pub fn watch(&self) -> watch::Receiver<MirrorStatus> {
        self.shared.status.subscribe()
    }

    /// Resolves once a snapshot is complete (at once if one was).
    pub async fn synced(&self) {
        let mut status = self.watch();
        // The sender lives in `self`: the wait cannot fail.
        let _ = status.wait_for(|s| s.synced).await;
    }
}

pub(crate) type MirrorReply = oneshot::Sender<Result<Mirror, Error>>;

/// The driver's side of the connection's mirror.
#[derive(Debug)]
pub(crate) struct MirrorLink {
    view: Mirror,
    remote: Remote,
    /// A handle was given out: the mirror lives on across leaders.
    given: bool,
    /// Callers waiting for the leader's answer.
    waiters: Vec<MirrorReply>,
    /// The snapshot being received (it replaces the map once `synced`).
    pending: Option<HashMap<MirrorKey, MirrorValue>>,
    /// The epoch of the leader the mirror was last asked of.
    epoch: u64,
}

impl MirrorLink {
    pub(crate) fn new() -> Self {
        let view = Mirror {
            shared: Arc::new(Shared { map: Mutex::default(), status: watch::Sender::new(MirrorStatus::default()) }),
        };
        MirrorLink { view, remote: Remote::Unsent, given: false, waiters: Vec::new(), pending: None, epoch: 0 }
    }

    /// A caller wants the mirror: answered at once when it is active, else
    /// with the leader's answer. Returns whether a `Mirror` must be sent.
    pub(crate) fn want(&mut self, reply: MirrorReply) -> bool {
        if self.remote == Remote::Active {
            self.given = true;
            let _ = reply.send(Ok(self.view.clone()));
            return false;
        }
        self.waiters.push(reply);
        self.remote == Remote::Unsent
    }

    /// Whether the mirror should be asked for again on a new link.
    pub(crate) fn wanted(&self) -> bool {
        self.given || !self.waiters.is_empty()
    }

    /// Asks the leader of `epoch` for the mirror (on a link speaking `version`):
    /// the frame in `out`, or the waiting callers refused when the leader is too old.
    pub(crate) fn send(&mut self, version: u16, epoch: u64, id: u64, in_flight: &mut InFlight, out: &mut Vec<Frame>) {
        if version < MIRROR_VERSION {
            let error = RemoteError::rejected(format!(
                "the leader speaks protocol version {version}; a mirror needs version {MIRROR_VERSION}"
            ))
            .with_code(ErrorCode::VERSION);
            if self.given {
                tracing::warn!(%error, "this leader cannot be mirrored; the mirror keeps its last state");
            }
            for reply in self.waiters.drain(..) {
                let _ = reply.send(Err(Error::Remote(error.clone())));
            }
            return;
        }
        self.remote = Remote::Pending(id);
        self.epoch = epoch;
        self.pending = Some(HashMap::new());
        in_flight.insert(id, Pending::Mirror);
        out.push(Frame::Mirror(id));
    }

    /// The leader answered the `Mirror`.
    pub(crate) fn on_ack(&mut self, id: u64, result: Result<(), RemoteError>) {
        if self.remote != Remote::Pending(id) {
            return;
        }
        match result {
            Ok(()) => {
                self.remote = Remote::Active;
                for reply in self.waiters.drain(..) {
                    self.given |= reply.send(Ok(self.view.clone())).is_ok();
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the leader refused to be mirrored");
                self.remote = Remote::Unsent;
                self.pending = None;
                for reply in self.waiters.drain(..) {
                    let _ = reply.send(Err(Error::Remote(error.clone())));
                }
            }
        }
    }

    /// A snapshot batch or an update.
    pub(crate) fn on_mirrored(&mut self, mirrored: Mirrored) {
        if self.remote != Remote::Active {
            return;
        }
        let Mirrored { entries, removed, synced } = mirrored;
        let apply = |values: &mut HashMap<MirrorKey, MirrorValue>| {
            for entry in entries {
                let value = MirrorValue {
                    epoch: entry.epoch,
                    seq: entry.seq,
                    payload: entry.payload,
                    revision: entry.revision,
                };
                values.insert((entry.channel, entry.key), value);
            }
            for gone in removed {
                values.remove(&(gone.channel, gone.key));
            }
        };
        let shared = &self.view.shared;
        match self.pending.as_mut() {
            Some(pending) => {
                apply(pending);
                if !synced {
                    return;
                }
                let snapshot = self.pending.take().unwrap_or_default();
                let keys = snapshot.len();
                self.view.map().values = snapshot;
                tracing::info!(
                    keys,
                    epoch = self.epoch,
                    "mirror synced: this process holds every key the leader follows"
                );
                shared.status.send_modify(|s| {
                    s.synced = true;
                    s.synced_epoch = Some(self.epoch);
                    s.updates += 1;
                });
            }
            None => {
                apply(&mut self.view.map().values);
                shared.status.send_modify(|s| s.updates += 1);
            }
        }
    }

    /// The link is gone: the map stays; callers waiting are told.
    pub(crate) fn lost(&mut self, error: &Error) {
        self.remote = Remote::Unsent;
        self.pending = None;
        for reply in self.waiters.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// The mirror's view, wanted from now on on every link (a hot standby's).
    pub(crate) fn adopt(&mut self) -> Mirror {
        self.given = true;
        self.view.clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(key: &str, epoch: u64, seq: u64) -> MirrorEntry {
        MirrorEntry {
            channel: "kv".into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
            epoch,
            seq,
            payload: Bytes::from_static(b"\xa1v"),
            revision: None,
        }
    }

    /// Asks the leader of `epoch` for the mirror on a new link, and gets its
    /// answer and `batches` (the last one `synced` if `complete`).
    pub(crate) fn mirror_leader(link: &mut MirrorLink, epoch: u64, batches: Vec<Vec<MirrorEntry>>, complete: bool) {
        let (mut in_flight, mut out) = (InFlight::default(), Vec::new());
        let id = epoch * 100;
        link.send(MIRROR_VERSION, epoch, id, &mut in_flight, &mut out);
        assert!(matches!(out.as_slice(), [Frame::Mirror(sent)] if *sent == id), "{out:?}");
        link.on_ack(id, Ok(()));
        let last = batches.len().saturating_sub(1);
        for (n, entries) in batches.into_iter().enumerate() {
            link.on_mirrored(Mirrored { entries, removed: vec![], synced: complete && n == last });
        }
    }

    #[test]
    fn the_status_names_the_epoch_of_the_last_complete_snapshot_only() {
        let mut link = MirrorLink::new();
        let mirror = link.adopt();
        mirror_leader(&mut link, 1, vec![vec![entry("a", 1, 3)]], true);
        assert_eq!((mirror.status().synced, mirror.status().synced_epoch), (true, Some(1)));

        // The leader of epoch 1 is lost; the one of epoch 2 sends part of its snapshot only.
        link.lost(&Error::LeaderLost);
        mirror_leader(&mut link, 2, vec![vec![entry("b", 2, 1)]], false);
        assert_eq!(mirror.status().synced_epoch, Some(1), "epoch 2's snapshot is not complete");
        assert!(mirror.get("kv", b"a").is_some() && mirror.get("kv", b"b").is_none(), "the map is epoch 1's");

        // Epoch 3's is complete: the map and the status are epoch 3's.
        link.lost(&Error::LeaderLost);
        mirror_leader(&mut link, 3, vec![vec![entry("c", 3, 1)], vec![]], true);
        assert_eq!(mirror.status().synced_epoch, Some(3));
        assert_eq!(mirror.entries(), vec![entry("c", 3, 1)]);
    }
}
