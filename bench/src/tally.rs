//! What a client process counts, the same way for tandem and for the floor:
//! calls completed inside the window, and events published inside the window.

use std::collections::HashMap;
use std::time::Duration;

use crate::clock::Window;
use crate::control::Report;
use crate::hist::{self, Hist};

/// How long a receiver keeps counting after the window closes, for events still in flight.
pub const DRAIN: Duration = Duration::from_millis(200);

/// Calls counted by one load task.
pub struct Calls {
    pub hist: Hist,
    pub calls: u64,
    pub errors: u64,
    pub links_lost: u64,
}

impl Calls {
    pub fn new() -> Calls {
        Calls { hist: hist::new(), calls: 0, errors: 0, links_lost: 0 }
    }

    /// A call that took `latency_ns` ended at `done_ns`: counted if inside the window.
    pub fn record(&mut self, window: &Window, done_ns: u64, latency_ns: u64) {
        if window.contains(done_ns) {
            self.hist.saturating_record(latency_ns.max(1));
            self.calls += 1;
        }
    }

    pub fn report(&self) -> Report {
        Report::Invoked {
            calls: self.calls,
            errors: self.errors,
            links_lost: self.links_lost,
            hist: hist::to_wire(&self.hist),
        }
    }
}

/// Events received by one follower during a fan-out phase.
pub struct EventTally {
    window: Option<Window>,
    events: u64,
    gaps: u64,
    last: HashMap<u32, u64>,
    hist: Hist,
}

impl EventTally {
    pub fn new() -> EventTally {
        EventTally { window: None, events: 0, gaps: 0, last: HashMap::new(), hist: hist::new() }
    }

    /// Starts counting for a new window (the publisher numbers each key from 0 again).
    pub fn start(&mut self, window: Window) {
        *self = EventTally::new();
        self.window = Some(window);
    }

    /// An event of `key` with index `idx`, published at `sent_ns`, arrived at `recv_ns`.
    pub fn record(&mut self, key: u32, idx: u64, sent_ns: u64, recv_ns: u64) {
        let Some(window) = self.window else { return };
        if !window.contains(sent_ns) {
            return;
        }
        self.events += 1;
        // Indices this follower never saw (conflated by the leader, or skipped locally).
        let expected = self.last.get(&key).map_or(0, |last| last + 1);
        self.gaps += idx.saturating_sub(expected);
        self.last.insert(key, idx);
        self.hist.saturating_record(recv_ns.saturating_sub(sent_ns).max(1));
    }

    /// The report (with the links lost meanwhile), and counting stops.
    pub fn finish(&mut self, links_lost: u64) -> Report {
        self.window = None;
        Report::Received { events: self.events, gaps: self.gaps, links_lost, hist: hist::to_wire(&self.hist) }
    }
}
