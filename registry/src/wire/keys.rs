//! The config center's data as it crosses the wire: a key's value, what a
//! watch follows, and the changes a watch yields.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A key, its value and the revision of the mutation that last set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// The revision of the `put` that set this value.
    pub mod_revision: u64,
}

/// Which keys a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WatchSpec {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this prefix (the empty prefix matches every key).
    Prefix(String),
}

impl WatchSpec {
    /// Watch exactly `key`.
    pub fn key(key: impl Into<String>) -> Self {
        WatchSpec::Key(key.into())
    }

    /// Watch every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        WatchSpec::Prefix(prefix.into())
    }

    /// Whether a change of `key` belongs to this watch.
    pub fn matches(&self, key: &str) -> bool {
        match self {
            WatchSpec::Key(k) => k == key,
            WatchSpec::Prefix(p) => key.starts_with(p.as_str()),
        }
    }

    /// The key or prefix.
    pub fn as_str(&self) -> &str {
        match self {
            WatchSpec::Key(s) | WatchSpec::Prefix(s) => s,
        }
    }
}

/// A change seen by a [`Watch`](crate::Watch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WatchEvent {
    /// `key` was set to `value` by the mutation with this revision.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Bytes,
        /// The revision of the mutation (for snapshot entries, the key's mod revision).
        revision: u64,
    },
    /// `key` was deleted by the mutation with this revision.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: u64,
    },
    /// The watch asked for changes older than the server's history keeps, or
    /// started beyond the server's next revision (then `compact_revision` is the
    /// start minus one and is above `revision`: the watcher's revisions come from
    /// an earlier incarnation of a server that restarted with less state).
    ///
    /// Changes up to `compact_revision` are gone. What follows is a snapshot: one
    /// `Put` per matching key with its value as of `revision` (drop any state you
    /// hold for the watched keys and rebuild it from these), then the changes after
    /// `revision`, as usual.
    Compacted {
        /// The newest revision the history no longer holds.
        compact_revision: u64,
        /// The revision of the snapshot that follows.
        revision: u64,
    },
}

impl WatchEvent {
    /// The event's revision (for `Compacted`, the snapshot's revision).
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Compacted { revision, .. } => *revision,
        }
    }

    /// The changed key (empty for `Compacted`).
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
            WatchEvent::Compacted { .. } => "",
        }
    }
}
