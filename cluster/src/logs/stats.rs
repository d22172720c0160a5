//! The log capture's counters, read by `/metrics`:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tandem_log_lines_dropped_total` | counter | `process` (`agent`, `worker-3`), `reason` (`buffer_full`, `write_failed`, `too_long`) |
//! | `tandem_log_bytes_written_total` | counter (bytes written to the log files) | |
//! | `tandem_log_files_deleted_total` | counter (rotated files deleted to stay within the quota) | |
//! | `tandem_log_bytes` | gauge (bytes in the log files now, at most the quota) | |
//! | `tandem_log_quota_bytes` | gauge | |

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why lines were dropped instead of written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum DropReason {
    /// The queue to the writer thread was full: the disk (or the writer) was
    /// slower than the children.
    BufferFull,
    /// Writing, opening, rotating or deleting a file failed (a full disk, a
    /// directory removed or made read-only).
    WriteFailed,
    /// A piece of output larger than the quota itself.
    TooLong,
}

impl DropReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::WriteFailed => "write_failed",
            DropReason::TooLong => "too_long",
        }
    }
}

/// Counters shared by the readers, the writer thread and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct LogStats {
    pub bytes_written: AtomicU64,
    pub files_deleted: AtomicU64,
    /// The bytes in the log files now (the writer's account).
    pub bytes_on_disk: AtomicU64,
    pub quota: AtomicU64,
    /// One counter per process and reason: taken once by whoever drops, so
    /// that counting a drop takes no lock.
    dropped: Mutex<BTreeMap<(String, DropReason), Arc<AtomicU64>>>,
}

impl LogStats {
    /// The counter of `process`'s lines dropped for `reason`.
    pub(crate) fn counter(&self, process: &str, reason: DropReason) -> Arc<AtomicU64> {
        let mut dropped = self.dropped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(dropped.entry((process.to_owned(), reason)).or_default())
    }

    /// Lines of `process` dropped so far, for every reason.
    #[cfg(test)]
    pub(crate) fn dropped_lines(&self, process: &str) -> u64 {
        let dropped = self.dropped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        dropped.iter().filter(|((p, _), _)| p == process).map(|(_, n)| n.load(Ordering::Relaxed)).sum()
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;

        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct DropLabels {
            process: String,
            reason: String,
        }
        let counter = |n: &AtomicU64| {
            let c = Counter::<u64>::default();
            c.inc_by(n.load(Ordering::Relaxed));
            c
        };
        let gauge = |n: &AtomicU64| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(n.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            g
        };
        let dropped = Family::<DropLabels, Counter>::default();
        for ((process, reason), n) in self.dropped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            let labels = DropLabels { process: process.clone(), reason: reason.as_str().to_owned() };
            dropped.get_or_create(&labels).inc_by(n.load(Ordering::Relaxed));
        }
        registry.register(
            "tandem_log_lines_dropped",
            "Lines of the children's output not written to the log files, by process and reason",
            dropped,
        );
        registry.register("tandem_log_bytes_written", "Bytes written to the log files", counter(&self.bytes_written));
        registry.register(
            "tandem_log_files_deleted",
            "Rotated log files deleted to stay within the log quota",
            counter(&self.files_deleted),
        );
        registry.register("tandem_log_bytes", "Bytes in the cluster's log files now", gauge(&self.bytes_on_disk));
        registry.register("tandem_log_quota_bytes", "The most bytes the log files may take", gauge(&self.quota));
    }
}
