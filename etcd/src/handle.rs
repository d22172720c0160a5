//! The connection a [`EtcdClient`](crate::EtcdClient) and everything made from it (its
//! clones, [`Watch`](crate::Watch)es and [`Registration`](crate::Registration)s)
//! share, and calls on the member in use.
//!
//! ```text
//! EtcdClient, its clones ──┐
//! Watch ───────────────┼─> Handle { deadline } ──> Shared { Failover }   the last one dropped cancels it
//! Registration ────────┘   call(op): on the member in use, by the deadline; its error classified
//! ```

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, is_connection_error};
use crate::failover::{Failover, Member};

/// A cheap clone of the one connection, with the deadline of its calls.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    shared: Arc<Shared>,
    /// When set, calls end by this instant (see [`EtcdClient::until`](crate::EtcdClient::until)).
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    failover: Arc<Failover>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.failover.cancel.cancel();
    }
}

impl Handle {
    /// Starts the failover over the configured endpoints; fails only with
    /// [`Error::Config`] (no endpoint).
    pub(crate) fn start(config: Config) -> Result<Handle, Error> {
        let failover = Failover::start(Arc::new(config), CancellationToken::new())?;
        Ok(Handle { shared: Arc::new(Shared { failover }), deadline: None })
    }

    /// The settings.
    pub(crate) fn config(&self) -> &Config {
        self.shared.failover.config()
    }

    pub(crate) fn failover(&self) -> &Arc<Failover> {
        &self.shared.failover
    }

    /// A handle whose calls end by `deadline` (or by the request timeout, if earlier).
    pub(crate) fn until(&self, deadline: Instant) -> Handle {
        Handle { shared: self.shared.clone(), deadline: Some(deadline) }
    }

    /// Runs `op` on the member in use by the call's deadline; reports the member
    /// if the connection failed.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut until = started + self.config().request_timeout;
        if let Some(deadline) = self.deadline {
            until = until.min(deadline);
        }
        let failover = &self.shared.failover;
        let member = failover.member_until(until).await?;
        match tokio::time::timeout_at(until, op(member.client.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(classify(failover, &member, error)),
            Err(_) => Err(Error::DeadlineExceeded(until.saturating_duration_since(started))),
        }
    }
}

/// Turns an etcd-client error into ours, reporting the member when its
/// connection is the problem.
pub(crate) fn classify(failover: &Failover, member: &Member, error: etcd_client::Error) -> Error {
    if is_connection_error(&error) {
        failover.report(member, &error);
        Error::unavailable(member.endpoint.to_string(), Some(Arc::new(error)))
    } else {
        Error::Refused(error)
    }
}
