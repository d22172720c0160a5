//! Registrations that follow the Leader: [`stay_registered`] registers an
//! instance through whichever Leader is current, again after each failover (a
//! dead Leader's lease dies with it, and the new one does not know its
//! predecessor's registrations). Works over any Leader serving [`ServiceApi`].
//! [`on_each_leader`] does the same for any action: re-publishing a key a
//! process owns, say.

use std::future::Future;
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
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let caller = client.clone();
    on_each_leader(&caller, "registration", move |epoch| {
        let (client, instance) = (client.clone(), instance.clone());
        async move {
            client.invoke(ServiceRequest::Register { instance: instance.clone(), ttl_ms }).await?;
            tracing::info!(channel = ServiceApi::NAME, service = %instance.service, id = %instance.id,
                epoch, "registered through the leader");
            Ok(())
        }
    })
}

/// Runs `act` once per Leader: now (once the channel of `client` is ready),
/// and again each time a Leader with a new epoch takes over. Use it to
/// re-publish what a process owns, which a new Leader does not replay. A
/// failed attempt is retried with a growing pause (100 ms up to 2 seconds)
/// while the same Leader serves: logged at WARN with its cause the first time
/// for each Leader, at DEBUG after. `what` names the action in those lines.
/// [`Presence::registered`] says the epoch of the last success.
pub fn on_each_leader<A, F, Fut>(client: &Client<A>, what: &'static str, mut act: F) -> Presence
where
    A: Api,
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), tandem_follower::Error>> + Send,
{
    let (tx, registered) = watch::channel(None);
    let mut status = client.watch();
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut warned_at = None;
        loop {
            let (epoch, ready) = {
                let status = status.borrow_and_update();
                (status.epoch(), status.state_of(A::NAME) == State::Ready)
            };
            if let Some(epoch) = epoch.filter(|e| ready && Some(*e) != *tx.borrow()) {
                match act(epoch).await {
                    Ok(()) => {
                        tx.send_replace(Some(epoch));
                        backoff.reset();
                    }
                    Err(error) => {
                        if warned_at != Some(epoch) {
                            warned_at = Some(epoch);
                            tracing::warn!(channel = A::NAME, epoch, %error, "{what} through the leader failed; retrying");
                        } else {
                            tracing::debug!(channel = A::NAME, epoch, %error, "{what} through the leader failed again");
                        }
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
