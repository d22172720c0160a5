//! The server-wide limits that keep many, stalled or hostile clients from
//! starving everyone else: the connection cap, the budget for partial frames,
//! and the rate-limited warnings logged when a client runs into one of them or
//! into a timeout (frame, first request, idle).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tandem_protocol::internal::Throttle;
use tracing::{info, warn};

use super::config::Config;
use super::reader::{Budget, ReadError};

/// What the server holds against its limits.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    /// Connections whose socket is open (counted until the socket is closed).
    open: AtomicUsize,
    /// Bytes of frames being read, across connections.
    pub(crate) budget: Arc<Budget>,
    refused: Mutex<Throttle>,
    stalled: Mutex<Throttle>,
    over_budget: Mutex<Throttle>,
    idle: Mutex<Throttle>,
    silent: Mutex<Throttle>,
}

/// A connection's place under [`Config::max_connections`], given back on drop.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Limits>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slot {
    pub(crate) fn limits(&self) -> &Limits {
        &self.0
    }
}

impl Limits {
    pub(crate) fn new(config: &Config) -> Arc<Limits> {
        Arc::new(Limits {
            max_connections: config.max_connections,
            open: AtomicUsize::new(0),
            budget: Budget::new(config.partial_frame_budget),
            refused: Mutex::default(),
            stalled: Mutex::default(),
            over_budget: Mutex::default(),
            idle: Mutex::default(),
            silent: Mutex::default(),
        })
    }

    /// A slot for one more connection, unless the cap is reached.
    pub(crate) fn try_open(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max_connections;
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1)).ok()?;
        Some(Slot(self.clone()))
    }

    /// Logs (rate-limited) a connection refused at the cap.
    pub(crate) fn log_refused(&self, peer: SocketAddr) {
        if let Some(suppressed) = hit(&self.refused) {
            warn!(
                peer = %peer,
                max_connections = self.max_connections,
                suppressed,
                "connection refused: the registry is at its connection limit (--max-connections)"
            );
        }
    }

    /// Logs (rate-limited) a connection closed because it ran into a read limit.
    pub(crate) fn log_read_limit(&self, error: &ReadError) {
        match error {
            ReadError::Stalled { .. } => {
                if let Some(suppressed) = hit(&self.stalled) {
                    warn!(error = %error, suppressed, "closing connection: a request did not arrive in time (--frame-timeout)");
                }
            }
            ReadError::OverBudget { .. } => {
                if let Some(suppressed) = hit(&self.over_budget) {
                    warn!(error = %error, suppressed, "closing connection: partial requests are over budget (--partial-frame-budget)");
                }
            }
            ReadError::Codec(_) => {}
        }
    }

    /// Logs (rate-limited) an idle connection being closed.
    pub(crate) fn log_idle(&self, idle_ms: u128) {
        if let Some(suppressed) = hit(&self.idle) {
            info!(idle_ms, suppressed, "closing an idle connection (no request, watch or lease; --idle-timeout)");
        }
    }

    /// Logs (rate-limited) a connection closed because it sent no complete
    /// request within the first-request timeout.
    pub(crate) fn log_first_request(&self, timeout: Duration) {
        if let Some(suppressed) = hit(&self.silent) {
            warn!(
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                suppressed, "closing connection: no request arrived after connecting (--first-request-timeout)"
            );
        }
    }
}

fn hit(throttle: &Mutex<Throttle>) -> Option<u64> {
    throttle.lock().unwrap_or_else(PoisonError::into_inner).hit()
}
