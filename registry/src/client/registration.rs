//! A registered service instance, kept alive by a background task.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::RegistryClient;
use super::error::Error;
use crate::wire::{Instance, Op};
use tandem_protocol::internal::error_chain;

/// An instance registered with [`RegistryClient::register`].
///
/// A background task renews its lease every TTL / 3. Dropping the registration
/// (or [`deregister`](Registration::deregister)ing it) removes the instance; so
/// does the loss of the client's connection, or a renewal the registry refuses
/// (the lease already expired, or another registration took over the id).
#[derive(Debug)]
#[must_use = "the instance is deregistered when the registration is dropped"]
pub struct Registration {
    client: RegistryClient,
    lease: u64,
    instance: Instance,
    ttl: Duration,
    /// Stops the keepalive task.
    stop: CancellationToken,
    registered: bool,
}

impl Registration {
    pub(crate) fn start(client: RegistryClient, lease: u64, instance: Instance, ttl: Duration) -> Self {
        let stop = CancellationToken::new();
        tokio::spawn(keep_alive(client.clone(), lease, ttl, stop.clone()));
        Registration { client, lease, instance, ttl, stop, registered: true }
    }

    /// The lease's id.
    pub fn lease_id(&self) -> u64 {
        self.lease
    }

    /// The registered instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Removes the instance and waits for the registry to confirm.
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.stop.cancel();
        self.registered = false;
        self.client.deregister(self.lease).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.registered {
            self.client.detach(Op::Deregister { lease: self.lease });
        }
    }
}

async fn keep_alive(client: RegistryClient, lease: u64, ttl: Duration, stop: CancellationToken) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let renewed = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            renewed = client.keep_alive(lease) => renewed,
        };
        match renewed {
            Ok(_) => debug!(lease, "lease renewed"),
            Err(e) if e.is_connection_lost() => return,
            Err(e) => {
                warn!(lease, error = %error_chain(&e), "lease renewal refused; the instance is no longer registered");
                return;
            }
        }
    }
}
