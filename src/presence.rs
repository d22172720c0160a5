//! Registrations that follow the Leader: [`stay_registered`] registers an
//! instance through whichever Leader is current, again after each failover (a
//! dead Leader's lease dies with it, and the new one does not know its
//! predecessor's registrations). Works over any Leader serving [`ServiceApi`].

use std::time::Duration;

use tandem_follower::{Client, State};
use tandem_registry::Instance;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::apis::{ServiceApi, ServiceRequest};
use tandem_protocol::Api;
use tandem_protocol::internal::Backoff;

/// An instance kept registered through whichever Leader is current; see [`stay_registered`].
/// Dropping it stops re-registering (the instance stays until the Leader's
/// lease ends or it is deregistered).
#[derive(Debug)]
pub struct Presence {
    registered: watch::Receiver<Option<u64>>,
    task: AbortHandle,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Presence {
    /// The epoch of the Leader that holds the registration (`None` before the
    /// first one succeeds), to await a re-registration.
    pub fn registered(&self) -> watch::Receiver<Option<u64>> {
        self.registered.clone()
    }
}

/// Registers `instance` through the Leader now, and again each time a Leader
/// with a new epoch takes over (the lease of a dead Leader dies with it, and the
/// new one does not know its predecessor's registrations). A failed attempt is
/// retried with a growing pause (up to 2 seconds) while the same Leader serves.
pub fn stay_registered(client: Client<ServiceApi>, instance: Instance, ttl: Duration) -> Presence {
    let (tx, registered) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut status = client.watch();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let (epoch, ready) = {
                let status = status.borrow_and_update();
                (status.epoch(), status.state_of(ServiceApi::NAME) == State::Ready)
            };
            if ready && epoch.is_some() && epoch != *tx.borrow() {
                let request = ServiceRequest::Register { instance: instance.clone(), ttl_ms };
                match client.invoke(request).await {
                    Ok(_) => {
                        tracing::info!(channel = ServiceApi::NAME, service = %instance.service, id = %instance.id,
                            epoch, "registered through the leader");
                        tx.send_replace(epoch);
                        backoff.reset();
                    }
                    Err(error) => {
                        tracing::warn!(channel = ServiceApi::NAME, service = %instance.service, %error,
                            "registration failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                            changed = status.changed() => if changed.is_err() { return },
                        }
                    }
                }
                continue;
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    });
    Presence { registered, task: task.abort_handle() }
}
