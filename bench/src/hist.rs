//! Latency histograms (HDR, in nanoseconds) and the form they travel in between
//! processes: the non-empty buckets, so the coordinator merges them exactly.

use hdrhistogram::Histogram;

pub type Hist = Histogram<u64>;

/// (bucket value in ns, count) for every non-empty bucket.
pub type Wire = Vec<(u64, u64)>;

/// An empty histogram from 1 ns to 2 minutes, 3 significant digits.
pub fn new() -> Hist {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("static bounds are valid")
}

pub fn to_wire(hist: &Hist) -> Wire {
    hist.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

pub fn add_wire(hist: &mut Hist, wire: &Wire) {
    for &(value, count) in wire {
        hist.saturating_record_n(value, count);
    }
}

/// The value at `quantile`, in microseconds (0 for an empty histogram).
pub fn quantile_us(hist: &Hist, quantile: f64) -> f64 {
    if hist.is_empty() { 0.0 } else { hist.value_at_quantile(quantile) as f64 / 1e3 }
}
