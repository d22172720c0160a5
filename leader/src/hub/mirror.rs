//! The hub's side of a hot standby (PROTOCOL.md §7.2): mirrors that copy
//! every followed key's live value, and keys seeded from such a mirror when
//! this leader takes over.
//!
//! ```text
//! standby --Mirror--> session: each hub, under its lock: register the outbox, snapshot its live values
//! k's pump --value--> hub.deliver: Event to subscribers, Mirrored{[entry]} to every mirror (same lock),
//!                     replacing k's update still queued there, if any (Outbox::push_mirror)
//! k released -------> hub.forget_value: Mirrored{removed [k]} to every mirror
//! new leader: seed(entries) --> topics with their value at (epoch, next seq), held for `seed_hold`,
//!                               subscribed upstream from their revision once the upstream is attached
//! ```

use tandem_protocol::{MIRROR_BATCH_BYTES, MIRROR_BATCH_ENTRIES, MirrorEntry, MirrorKey, Mirrored};

use std::sync::atomic::AtomicBool;

use super::*;

/// The bytes of a `Mirrored` frame besides its entries (its tag, arrays,
/// `synced`), with room to spare.
pub(super) const MIRRORED_HEADROOM: usize = 64;

/// The bytes of a `MirrorEntry` besides its channel name, key and payload
/// (its array, the three byte strings' headers, epoch, seq, revision: 43 at most).
const ENTRY_OVERHEAD: usize = 48;

/// The most bytes of entries a snapshot batch holds: `MIRROR_BATCH_BYTES`,
/// less when the frame limit is lower, so that every batch fits in a frame
/// (one entry alone always does: its `Event` did).
pub(super) fn batch_budget(max_frame_length: usize) -> usize {
    MIRROR_BATCH_BYTES.min(max_frame_length.saturating_sub(MIRRORED_HEADROOM))
}

/// An entry's bytes in a `Mirrored` frame, at most.
pub(super) fn entry_size(channel: &str, key: &[u8], payload: &[u8]) -> usize {
    channel.len() + key.len() + payload.len() + ENTRY_OVERHEAD
}

/// A mirroring session: its outbox, and whether every channel's snapshot is
/// queued on it already (the `synced` of its updates).
#[derive(Debug)]
pub(crate) struct MirrorSink {
    outbox: Arc<Outbox>,
    synced: Arc<AtomicBool>,
}

impl Hub {
    fn mirrors(&self) -> MutexGuard<'_, HashMap<SessionId, MirrorSink>> {
        self.mirrors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, key: &Bytes, seq: u64, payload: &Bytes, revision: Option<u64>) -> MirrorEntry {
        MirrorEntry {
            channel: self.channel.clone().into(),
            key: key.clone(),
            epoch: self.epoch,
            seq,
            payload: payload.clone(),
            revision,
        }
    }

    /// A new live value of `key`: one update to every mirror. Called under the
    /// hub's lock, so mirrors see a key's values in order, after the snapshot.
    pub(super) fn mirror_value(&self, key: &Bytes, seq: u64, payload: &Bytes, revision: Option<u64>) {
        let mirrors = self.mirrors();
        if mirrors.is_empty() {
            return;
        }
        let entry = self.entry(key, seq, payload, revision);
        for sink in mirrors.values() {
            let synced = sink.synced.load(Ordering::Relaxed);
            sink.outbox.push_mirror(
                &self.channel,
                key,
                Mirrored { entries: vec![entry.clone()], removed: vec![], synced },
            );
        }
    }

    /// The key's value is dropped (the key is no longer followed): the
    /// mirrors forget it too, if they had it (a live value). Under the hub's lock.
    pub(super) fn forget_value(&self, topic: &mut Topic, key: &Bytes) {
        let had = topic.live_value().is_some();
        topic.last = None;
        topic.revision = None;
        topic.absorb = None;
        topic.origin = None;
        if !had {
            return;
        }
        let mirrors = self.mirrors();
        if mirrors.is_empty() {
            return;
        }
        let removed = MirrorKey { channel: self.channel.clone().into(), key: key.clone() };
        for sink in mirrors.values() {
            let synced = sink.synced.load(Ordering::Relaxed);
            sink.outbox.push_mirror(
                &self.channel,
                key,
                Mirrored { entries: vec![], removed: vec![removed.clone()], synced },
            );
        }
    }

    /// Starts mirroring this channel to `outbox`: its snapshot now (batches,
    /// `synced` false; the session sends the closing `synced` frame once
    /// every channel's snapshot is queued), its updates from now on. False if
    /// the outbox overflowed (the session ends).
    pub(crate) fn mirror(&self, session: SessionId, outbox: &Arc<Outbox>, synced: &Arc<AtomicBool>) -> bool {
        let state = self.lock();
        self.mirrors().insert(session, MirrorSink { outbox: outbox.clone(), synced: synced.clone() });
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut sent = 0usize;
        let budget = batch_budget(self.max_frame_length);
        for (key, topic) in &state.topics {
            let Some(value) = topic.live_value() else { continue };
            let size = entry_size(&self.channel, key, &value.payload);
            if !batch.is_empty() && (batch.len() >= MIRROR_BATCH_ENTRIES || bytes + size > budget) {
                let entries = std::mem::take(&mut batch);
                if !outbox.push(Frame::Mirrored(Mirrored { entries, removed: vec![], synced: false })) {
                    return false;
                }
                bytes = 0;
            }
            batch.push(self.entry(key, value.seq, &value.payload, topic.revision));
            bytes += size;
            sent += 1;
        }
        if !batch.is_empty()
            && !outbox.push(Frame::Mirrored(Mirrored { entries: batch, removed: vec![], synced: false }))
        {
            return false;
        }
        tracing::debug!(channel = %self.channel, keys = sent, "mirror snapshot queued");
        true
    }

    /// The session stopped mirroring (it ended).
    pub(crate) fn unmirror(&self, session: SessionId) {
        let _state = self.lock();
        self.mirrors().remove(&session);
    }

    /// Seeds this channel's keys from a mirror: each is served at once at a
    /// new position of this leader's epoch, held for `seed_hold` with no
    /// subscriber, and subscribed upstream (from its revision) once the
    /// upstream is attached. Called before the leader serves anyone.
    pub(crate) fn seed(self: &Arc<Self>, entries: Vec<MirrorEntry>) {
        if entries.is_empty() {
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let mut seeded = 0usize;
        for entry in entries {
            if entry.epoch >= self.epoch {
                tracing::warn!(channel = %self.channel, key = %display_key(&entry.key), entry.epoch, epoch = self.epoch,
                    "a seeded value comes from this epoch or a later one: is the epoch right?");
            }
            if !crate::fits_in_frame(self.max_frame_length, &[self.channel.as_bytes(), &entry.key, &entry.payload]) {
                tracing::warn!(channel = %self.channel, bytes = entry.payload.len(), "seeded value too large for a frame; ignored");
                continue;
            }
            state.next_seq += 1;
            let seq = state.next_seq;
            let event = Event {
                channel: self.channel.clone().into(),
                key: entry.key.clone(),
                epoch: self.epoch,
                seq,
                payload: entry.payload.clone(),
                cached: false,
            };
            let Ok(event) = SharedFrame::encode(Frame::Event(event), self.max_frame_length) else { continue };
            let topic = state.topics.entry(entry.key).or_default();
            topic.last = Some((seq, event));
            topic.revision = entry.revision;
            topic.resume = entry.revision;
            topic.absorb = Some(entry.payload);
            topic.origin = Some(Position { epoch: entry.epoch, seq: entry.seq });
            topic.seeded = true;
            topic.held = true;
            seeded += 1;
        }
        tracing::info!(channel = %self.channel, keys = seeded, epoch = self.epoch, hold_ms = self.seed_hold.as_millis() as u64,
            "keys seeded from a mirror");
        self.tracker.spawn(self.clone().end_seed_hold());
    }

    /// After `seed_hold`, seeded keys nobody subscribed are released.
    async fn end_seed_hold(self: Arc<Self>) {
        tokio::select! {
            () = tokio::time::sleep(self.seed_hold) => {}
            _ = self.cancel.cancelled() => return,
        }
        let keys: Vec<Bytes> = {
            let mut state = self.lock();
            state
                .topics
                .iter_mut()
                .filter_map(|(key, topic)| (std::mem::take(&mut topic.held) && topic.idle()).then(|| key.clone()))
                .collect()
        };
        if !keys.is_empty() {
            tracing::info!(channel = %self.channel, keys = keys.len(), "seeded keys nobody subscribed are released");
        }
        for key in keys {
            self.release_if_idle(self.lock(), &key);
        }
    }
}
