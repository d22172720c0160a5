//! The config center's data: keys, values, the global revision and a bounded
//! history of changes that lets a watcher catch up on what it missed.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::wire::{KeyValue, WatchEvent, WatchSpec};

#[derive(Debug)]
struct Entry {
    value: Bytes,
    mod_revision: u64,
}

/// What a watcher starting at some revision has to be sent before it is live.
#[derive(Debug, PartialEq)]
pub(crate) enum Replay {
    /// Nothing: every change from the requested revision on has been seen.
    CaughtUp,
    /// Changes from the history, in order; continue from `next`.
    Events { events: Vec<WatchEvent>, next: u64 },
    /// The history no longer reaches back far enough: the current values of the
    /// matching keys, as of `revision`; continue from `revision + 1`.
    Snapshot { compact_revision: u64, revision: u64, values: Vec<KeyValue> },
}

/// Keys and values with one global revision and a bounded history of changes.
///
/// The revision is 1 for an empty store and grows by one per mutation (a `put`,
/// or a `delete` of a present key), so the first `put` has revision 2.
#[derive(Debug)]
pub(crate) struct Store {
    revision: u64,
    entries: BTreeMap<String, Entry>,
    /// The newest changes, oldest first, revisions `compacted + 1 ..= revision`.
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// The newest revision dropped from the history (0: none yet).
    compacted: u64,
}

impl Store {
    pub(crate) fn new(history_limit: usize) -> Self {
        Store { revision: 1, entries: BTreeMap::new(), history: VecDeque::new(), history_limit, compacted: 0 }
    }

    /// The revision of the latest mutation (1 when nothing happened yet).
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// How many keys are set.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get(&self, key: &str) -> Option<KeyValue> {
        self.entries.get(key).map(|e| KeyValue {
            key: key.to_owned(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
        })
    }

    /// Sets `key` and returns the change (its revision is the new global revision).
    pub(crate) fn put(&mut self, key: String, value: Bytes) -> WatchEvent {
        self.revision += 1;
        let revision = self.revision;
        self.entries.insert(key.clone(), Entry { value: value.clone(), mod_revision: revision });
        self.record(WatchEvent::Put { key, value, revision })
    }

    /// Removes `key`; `None` (and no new revision) when it was absent.
    pub(crate) fn delete(&mut self, key: &str) -> Option<WatchEvent> {
        self.entries.remove(key)?;
        self.revision += 1;
        Some(self.record(WatchEvent::Delete { key: key.to_owned(), revision: self.revision }))
    }

    fn record(&mut self, event: WatchEvent) -> WatchEvent {
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.revision();
            }
        }
        if self.history_limit == 0 {
            self.compacted = self.revision;
        }
        event
    }

    /// What a watcher of `spec` must receive to have seen every change with a
    /// revision `>= from`, at most `max` events at a time.
    pub(crate) fn replay(&self, spec: &WatchSpec, from: u64, max: usize) -> Replay {
        if from == self.revision + 1 {
            return Replay::CaughtUp;
        }
        if from > self.revision + 1 {
            // A start this store never reached: the watcher's revisions come from another
            // incarnation (the server restarted with less state). Treating it as caught up
            // would drop every change up to `from` silently; a snapshot lets it rebuild.
            let values = self.matching(spec);
            return Replay::Snapshot { compact_revision: from - 1, revision: self.revision, values };
        }
        if from <= self.compacted {
            let values = self.matching(spec);
            return Replay::Snapshot { compact_revision: self.compacted, revision: self.revision, values };
        }
        let start = self.history.partition_point(|e| e.revision() < from);
        let mut events = Vec::new();
        for event in self.history.range(start..) {
            if events.len() == max.max(1) {
                return Replay::Events { next: event.revision(), events };
            }
            if spec.matches(event.key()) {
                events.push(event.clone());
            }
        }
        if events.is_empty() { Replay::CaughtUp } else { Replay::Events { events, next: self.revision + 1 } }
    }

    /// The current values of the keys `spec` matches, in key order.
    fn matching(&self, spec: &WatchSpec) -> Vec<KeyValue> {
        let kv = |(key, e): (&String, &Entry)| KeyValue {
            key: key.clone(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
        };
        match spec {
            WatchSpec::Key(key) => self.get(key).into_iter().collect(),
            WatchSpec::Prefix(prefix) => self
                .entries
                .range::<str, _>((std::ops::Bound::Included(prefix.as_str()), std::ops::Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(prefix.as_str()))
                .map(kv)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &mut Store, key: &str, value: &str) -> u64 {
        store.put(key.to_owned(), Bytes::from(value.to_owned())).revision()
    }

    #[test]
    fn revisions_start_at_one_and_grow_per_mutation() {
        let mut store = Store::new(10);
        assert_eq!(store.revision(), 1);
        assert_eq!(put(&mut store, "a", "1"), 2);
        assert_eq!(put(&mut store, "a", "2"), 3);
        assert_eq!(store.get("a").map(|kv| (kv.value, kv.mod_revision)), Some((Bytes::from("2"), 3)));
        assert_eq!(store.delete("missing"), None);
        assert_eq!(store.revision(), 3);
        assert_eq!(store.delete("a").map(|e| e.revision()), Some(4));
        assert_eq!(store.get("a"), None);
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn replay_filters_by_spec_and_pages() {
        let mut store = Store::new(10);
        put(&mut store, "a/1", "x"); // 2
        put(&mut store, "b/1", "x"); // 3
        put(&mut store, "a/2", "x"); // 4
        put(&mut store, "a/3", "x"); // 5
        let spec = WatchSpec::prefix("a/");
        let Replay::Events { events, next } = store.replay(&spec, 2, 2) else { panic!("expected events") };
        assert_eq!(events.iter().map(WatchEvent::revision).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(next, 5);
        let Replay::Events { events, next } = store.replay(&spec, next, 2) else { panic!("expected events") };
        assert_eq!(events.iter().map(WatchEvent::revision).collect::<Vec<_>>(), vec![5]);
        assert_eq!(next, 6);
        assert_eq!(store.replay(&spec, next, 2), Replay::CaughtUp);
        assert_eq!(store.replay(&WatchSpec::key("c"), 1, 2), Replay::CaughtUp);
    }

    #[test]
    fn replay_past_the_history_is_a_snapshot() {
        let mut store = Store::new(2);
        put(&mut store, "a/1", "old"); // 2
        put(&mut store, "a/2", "x"); // 3
        put(&mut store, "a/1", "new"); // 4
        put(&mut store, "z", "x"); // 5
        assert!(matches!(store.replay(&WatchSpec::prefix("a/"), 4, 10), Replay::Events { .. }));
        let Replay::Snapshot { compact_revision, revision, values } = store.replay(&WatchSpec::prefix("a/"), 3, 10)
        else {
            panic!("expected a snapshot")
        };
        assert_eq!((compact_revision, revision), (3, 5));
        let got: Vec<_> = values.iter().map(|kv| (kv.key.as_str(), kv.mod_revision)).collect();
        assert_eq!(got, vec![("a/1", 4), ("a/2", 3)]);
    }

    #[test]
    fn a_start_beyond_the_revision_is_a_snapshot_not_caught_up() {
        let mut store = Store::new(10);
        put(&mut store, "a", "x"); // 2
        put(&mut store, "b", "y"); // 3
        // The next revision is a normal resume point.
        assert_eq!(store.replay(&WatchSpec::key("a"), 4, 10), Replay::CaughtUp);
        // Revision 31 was seen on another incarnation: the watcher gets the state as of now.
        let Replay::Snapshot { compact_revision, revision, values } = store.replay(&WatchSpec::key("a"), 32, 10) else {
            panic!("expected a snapshot")
        };
        assert_eq!((compact_revision, revision), (31, 3));
        assert_eq!(values.iter().map(|kv| (kv.key.as_str(), kv.mod_revision)).collect::<Vec<_>>(), vec![("a", 2)]);
        // An absent key: an empty snapshot, still a snapshot.
        assert!(matches!(
            store.replay(&WatchSpec::key("z"), 32, 10),
            Replay::Snapshot { values, .. } if values.is_empty()
        ));
    }

    #[test]
    fn zero_history_compacts_everything() {
        let mut store = Store::new(0);
        put(&mut store, "a", "x");
        assert!(matches!(store.replay(&WatchSpec::key("a"), 2, 10), Replay::Snapshot { revision: 2, .. }));
        assert_eq!(store.replay(&WatchSpec::key("a"), 3, 10), Replay::CaughtUp);
    }
}
