//! The call latency histogram: fixed buckets, lock-free counters, read by
//! [`Leader::stats`](crate::Leader::stats) (the cluster's `/metrics` turns it
//! into a Prometheus histogram).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the buckets, in seconds (the last bucket, `+Inf`, is implicit).
pub const BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
pub(crate) struct CallLatency {
    /// One counter per bucket plus `+Inf`; each call counts in its own bucket only.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl CallLatency {
    pub(crate) fn record(&self, elapsed: Duration) {
        self.record_many(elapsed, 1);
    }

    /// Records `calls` calls that each took `elapsed`.
    pub(crate) fn record_many(&self, elapsed: Duration, calls: u64) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(calls, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos.saturating_mul(calls), Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencyStats {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let buckets =
            counts.iter().enumerate().map(|(i, &n)| (BUCKETS.get(i).copied(), n)).collect::<Vec<(Option<f64>, u64)>>();
        LatencyStats {
            count: counts.iter().sum(),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// Calls answered, by how long they took from arrival to answer.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LatencyStats {
    /// Calls answered.
    pub count: u64,
    /// Their total time, in seconds.
    pub sum_seconds: f64,
    /// `(upper bound in seconds, calls in this bucket only)`; the last bound,
    /// `None`, is `+Inf`.
    pub buckets: Vec<(Option<f64>, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_counts_in_one_bucket() {
        let h = CallLatency::default();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (Some(0.0001), 1));
        assert_eq!(s.buckets[5], (Some(0.005), 1));
        assert_eq!(s.buckets.last(), Some(&(None, 1)));
        assert!((s.sum_seconds - 60.00305).abs() < 1e-6, "{}", s.sum_seconds);
    }
}
