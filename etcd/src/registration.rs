//! A key kept alive by a lease: a service instance that vanishes when its
//! owner dies.
//!
//! ```text
//! register ── grant lease(ttl) ── put key (lease) ──> etcd
//! task     ── keep-alive every ttl/3 ───────────────> etcd   (ack: lease ttl)
//!   member fails          → keep the same lease alive on the next member
//!   lease gone (ttl <= 0) → grant a new lease, put the key again
//! process dies            → no keep-alive; etcd deletes the key after ttl
//! deregister()            → revoke the lease: etcd deletes the key at once
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::failover::{Failover, Member};
use crate::handle::{Handle, classify};

/// A key held alive by a lease that a background task keeps alive.
///
/// Dropping it stops the keep-alive (the key then vanishes when the lease
/// expires); [`deregister`](Registration::deregister) removes it at once.
#[derive(Debug)]
pub struct Registration {
    key: String,
    lease: watch::Receiver<i64>,
    stop: CancellationToken,
    task: AbortHandle,
    handle: Handle,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// The lease TTL etcd is asked for: whole seconds, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1)
}

impl Registration {
    pub(crate) async fn start(handle: Handle, key: String, value: Vec<u8>, ttl: Duration) -> Result<Self, Error> {
        let ttl = ttl_secs(ttl);
        let lease = {
            let (key, value) = (key.clone(), value.clone());
            handle.call(move |c| grant_and_put(c, key, value, ttl)).await?
        };
        tracing::info!(key, lease, ttl, "registered");
        let (lease_tx, lease_rx) = watch::channel(lease);
        let stop = CancellationToken::new();
        let holder = Holder { failover: handle.failover().clone(), key: key.clone(), value, ttl, lease: lease_tx };
        let task = tokio::spawn(holder.run(stop.clone()));
        Ok(Registration { key, lease: lease_rx, stop, task: task.abort_handle(), handle })
    }

    /// The registered key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease currently holding the key (a new one after etcd let the previous expire).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Every lease change, to await a re-registration.
    pub fn lease_changes(&self) -> watch::Receiver<i64> {
        self.lease.clone()
    }

    /// Stops the keep-alive and revokes the lease, which deletes the key. If
    /// etcd cannot be reached, the key still vanishes when the lease expires.
    pub async fn deregister(self) -> Result<(), Error> {
        self.stop.cancel();
        self.task.abort();
        let lease = self.lease();
        let result = self.handle.call(move |mut c| async move { c.lease_revoke(lease).await.map(drop) }).await;
        match result {
            Ok(()) => Ok(()),
            // Already gone: the key is gone with it.
            Err(Error::Refused(error)) if error.to_string().contains("lease not found") => Ok(()),
            Err(error) => Err(error),
        }
    }
}

async fn grant_and_put(
    mut client: etcd_client::Client,
    key: String,
    value: Vec<u8>,
    ttl: i64,
) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(ttl, None).await?.id();
    client.put(key, value, Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    Ok(lease)
}

/// The background task's state.
struct Holder {
    failover: Arc<Failover>,
    key: String,
    value: Vec<u8>,
    ttl: i64,
    lease: watch::Sender<i64>,
}

enum Held {
    Stopped,
    /// The member failed (reported).
    MemberFailed,
    /// The client moved to another member.
    Moved,
    /// etcd no longer knows the lease: the key is gone.
    Expired,
    /// etcd refused something; retry after a pause.
    Refused,
    /// A new lease holds the key; keep that one alive.
    Renewed,
}

impl Holder {
    async fn run(self, stop: CancellationToken) {
        loop {
            let member = tokio::select! {
                member = self.failover.member() => match member { Some(m) => m, None => return },
                _ = stop.cancelled() => return,
            };
            let held = match self.hold(&member, &stop).await {
                Held::Expired => self.renew(&member).await,
                other => other,
            };
            let pause = async {
                match held {
                    Held::Stopped => true,
                    Held::MemberFailed => {
                        self.failover.replaced(&member).await;
                        false
                    }
                    Held::Refused => {
                        tokio::time::sleep(self.failover.config().retry_max).await;
                        false
                    }
                    Held::Moved | Held::Expired | Held::Renewed => false,
                }
            };
            tokio::select! {
                done = pause => if done { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Keeps the current lease alive on `member` until something ends it.
    async fn hold(&self, member: &Member, stop: &CancellationToken) -> Held {
        let lease = *self.lease.borrow();
        let mut client = member.client.clone();
        let timeout = self.failover.config().request_timeout;
        let opened = tokio::select! {
            opened = tokio::time::timeout(timeout, client.lease_keep_alive(lease)) => opened,
            _ = self.failover.replaced(member) => return Held::Moved,
            _ = stop.cancelled() => return Held::Stopped,
        };
        let (mut keeper, mut acks) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(message))) if message.contains("not found") => {
                return Held::Expired;
            }
            Ok(Err(error)) => return self.failed(member, error),
            Err(_) => {
                self.failover.report(member, &"a lease keep-alive did not open in time");
                return Held::MemberFailed;
            }
        };
        let ttl = Duration::from_secs(u64::try_from(self.ttl).unwrap_or(1));
        let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut acked = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if acked.elapsed() > ttl {
                        self.failover.report(member, &"lease keep-alives unanswered for a whole ttl");
                        return Held::MemberFailed;
                    }
                    if let Err(error) = keeper.keep_alive().await {
                        return self.failed(member, error);
                    }
                }
                ack = acks.message() => match ack {
                    Ok(Some(ack)) if ack.ttl() <= 0 => return Held::Expired,
                    Ok(Some(_)) => acked = Instant::now(),
                    Ok(None) => {
                        self.failover.report(member, &"the lease keep-alive stream ended");
                        return Held::MemberFailed;
                    }
                    Err(error) => return self.failed(member, error),
                },
                _ = self.failover.replaced(member) => return Held::Moved,
                _ = stop.cancelled() => return Held::Stopped,
            }
        }
    }

    /// The lease expired (an outage longer than the ttl): a new lease, the key again.
    async fn renew(&self, member: &Member) -> Held {
        let attempt = grant_and_put(member.client.clone(), self.key.clone(), self.value.clone(), self.ttl);
        match tokio::time::timeout(self.failover.config().request_timeout, attempt).await {
            Ok(Ok(lease)) => {
                tracing::warn!(key = self.key, lease, "lease expired; registered again under a new lease");
                self.lease.send_replace(lease);
                Held::Renewed
            }
            Ok(Err(error)) => self.failed(member, error),
            Err(_) => {
                self.failover.report(member, &"a lease grant timed out");
                Held::MemberFailed
            }
        }
    }

    fn failed(&self, member: &Member, error: etcd_client::Error) -> Held {
        match classify(&self.failover, member, error) {
            Error::Unavailable { .. } => Held::MemberFailed,
            error => {
                tracing::warn!(key = self.key, error = %error.chain(), "lease keep-alive refused");
                Held::Refused
            }
        }
    }
}
