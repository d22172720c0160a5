//! One member in use at a time; on its failure, move on to the next endpoint.
//!
//! ```text
//!            report(generation)                    probe ok
//! Connected ───────────────────> Connecting ───────────────> Connected (next member, generation + 1)
//!     ^                              │ every endpoint failed once
//!     │ probe ok                     v
//!     └──────────────────────────  Down ── retry a round after a pause (doubling, capped, jittered)
//! ```
//!
//! The failover task is the only writer of the state. Calls wait for a member
//! while `Connecting` (bounded by their deadline) and fail at once with
//! [`Error::Unavailable`] while `Down`; watches and lease keep-alives wait for
//! the next `Connected` and resume there. Everyone who sees a member fail
//! reports it with the member's generation, so a stale report cannot make the
//! client drop the member it has just moved to. Exactly one etcd-client (one
//! TCP connection) is live at a time: users of an older generation drop theirs.

use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::internal::Backoff;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Cause, Error};

/// The member in use.
#[derive(Clone)]
pub(crate) struct Member {
    /// A client bound to this member alone.
    pub(crate) client: etcd_client::Client,
    /// Its URL.
    pub(crate) endpoint: Arc<str>,
    /// Bumped on every new member (or new connection to the same member).
    pub(crate) generation: u64,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("endpoint", &self.endpoint).field("generation", &self.generation).finish()
    }
}

#[derive(Clone, Debug)]
enum Current {
    Connecting,
    Connected(Box<Member>),
    Down {
        tried: String,
        cause: Option<Cause>,
    },
    /// A member refused the credentials: the client has given up.
    Refused(String),
}

/// What a client can observe about its connection to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Looking for a member that answers (at start, or after losing one).
    Connecting,
    /// Talking to this member.
    Connected {
        /// The member's URL.
        endpoint: String,
    },
    /// No member answered in a whole round over the endpoints; calls fail at
    /// once with [`Error::Unavailable`] while the client keeps trying.
    Unavailable {
        /// Why the last attempt failed.
        reason: String,
    },
    /// A member refused this client's user and password. Retrying cannot
    /// help, so the client has stopped: calls fail with
    /// [`Error::Unauthenticated`], watches and registrations end. Fix the
    /// settings and start a new client. (TLS failures are `Unavailable`.)
    Refused {
        /// etcd's answer.
        reason: String,
    },
}

/// The connection manager shared by a client and its background tasks.
#[derive(Debug)]
pub(crate) struct Failover {
    config: Arc<Config>,
    urls: Vec<String>,
    current: watch::Sender<Current>,
    public: watch::Sender<ConnectionState>,
    /// The highest generation reported as failed.
    failed: watch::Sender<u64>,
    pub(crate) cancel: CancellationToken,
}

impl Failover {
    /// Starts the failover task. It stops when `cancel` is cancelled.
    pub(crate) fn start(config: Arc<Config>, cancel: CancellationToken) -> Result<Arc<Failover>, Error> {
        let urls = config.urls()?;
        if urls.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        let failover = Arc::new(Failover {
            config,
            urls,
            current: watch::Sender::new(Current::Connecting),
            public: watch::Sender::new(ConnectionState::Connecting),
            failed: watch::Sender::new(0),
            cancel,
        });
        tokio::spawn(run(failover.clone()));
        Ok(failover)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn state(&self) -> watch::Receiver<ConnectionState> {
        self.public.subscribe()
    }

    /// Tells the failover task that `member` failed, so it moves on. Reports
    /// about an older member than the current one are ignored.
    pub(crate) fn report(&self, member: &Member, error: &dyn std::fmt::Display) {
        let generation = member.generation;
        let newer = self.failed.send_if_modified(|failed| {
            let newer = generation > *failed;
            if newer {
                *failed = generation;
            }
            newer
        });
        if newer {
            tracing::warn!(endpoint = %member.endpoint, generation, %error, "etcd member failed; moving on");
        }
    }

    /// The member in use, waiting while the client looks for one, until
    /// `until`. Fails at once while no member is reachable.
    pub(crate) async fn member_until(&self, until: Instant) -> Result<Member, Error> {
        let mut rx = self.current.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Current::Connected(member) => return Ok(Member::clone(member)),
                Current::Down { tried, cause } => return Err(Error::unavailable(tried.clone(), cause.clone())),
                Current::Refused(reason) => return Err(Error::Unauthenticated { reason: reason.clone() }),
                Current::Connecting => {}
            }
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::unavailable(self.urls.join(","), None)),
                Err(_) => {
                    return Err(Error::unavailable(
                        format!("still looking for a member of {}", self.urls.join(",")),
                        None,
                    ));
                }
            }
        }
    }

    /// The member in use, waiting as long as it takes; `None` once the client
    /// is closed, or has given up because etcd refused its credentials.
    pub(crate) async fn member(&self) -> Option<Member> {
        let mut rx = self.current.subscribe();
        let wait = rx.wait_for(|current| matches!(current, Current::Connected(_) | Current::Refused(_)));
        let current = tokio::select! {
            current = wait => current.ok()?.clone(),
            _ = self.cancel.cancelled() => return None,
        };
        match current {
            Current::Connected(member) => Some(*member),
            _ => None,
        }
    }

    /// Resolves once `member` is no longer the one in use (it failed, or the
    /// client moved on after someone else saw it fail), or the client closed.
    pub(crate) async fn replaced(&self, member: &Member) {
        let mut rx = self.current.subscribe();
        let generation = member.generation;
        tokio::select! {
            _ = rx.wait_for(|current| !matches!(current, Current::Connected(m) if m.generation == generation)) => {}
            _ = self.cancel.cancelled() => {}
        }
    }

    fn publish(&self, current: Current) {
        let public = match &current {
            Current::Connecting => ConnectionState::Connecting,
            Current::Connected(member) => ConnectionState::Connected { endpoint: member.endpoint.to_string() },
            Current::Down { tried, cause } => ConnectionState::Unavailable {
                reason: match cause {
                    Some(cause) => format!("{tried}: {cause}"),
                    None => tried.clone(),
                },
            },
            Current::Refused(reason) => ConnectionState::Refused { reason: reason.clone() },
        };
        self.current.send_replace(current);
        self.public.send_if_modified(|state| {
            let changed = *state != public;
            *state = public;
            changed
        });
    }

    /// Connects to one member and checks that it answers (and, as the client
    /// requires a leader, that it has one).
    async fn probe(&self, url: &str) -> Result<etcd_client::Client, Cause> {
        let config = &self.config;
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(config.keep_alive_interval, config.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls.options());
        }
        if let Some(credentials) = &config.credentials {
            // etcd-client asks for a token at connect, and a new one when it expires.
            options = options.with_user(credentials.user(), credentials.password()).with_auto_token_refresh(true);
        }
        let attempt = async {
            let mut client = etcd_client::Client::connect([url], Some(options)).await?;
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(config.connect_timeout, attempt).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(Arc::new(error)),
            Err(_) => Err(Arc::new(Timeout(config.connect_timeout))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
struct Timeout(Duration);

/// Whether a member refused the credentials themselves (a wrong user or
/// password, or credentials for a cluster without auth), which no retry fixes.
fn is_refusal(cause: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    let Some(etcd_client::Error::GRpcStatus(status)) = cause.downcast_ref::<etcd_client::Error>() else {
        return false;
    };
    matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
        || (status.code() == tonic::Code::InvalidArgument && status.message().contains("authentication failed"))
        || (status.code() == tonic::Code::FailedPrecondition
            && status.message().contains("authentication is not enabled"))
}

async fn run(failover: Arc<Failover>) {
    let n = failover.urls.len();
    let mut next = 0;
    let mut generation = 0;
    let mut backoff = Backoff::new(failover.config.retry_initial, failover.config.retry_max);
    let mut failed = failover.failed.subscribe();
    loop {
        let mut last_cause = None;
        let mut connected = None;
        for step in 0..n {
            let index = (next + step) % n;
            let url = &failover.urls[index];
            let probed = tokio::select! {
                probed = failover.probe(url) => probed,
                _ = failover.cancel.cancelled() => return,
            };
            match probed {
                Ok(client) => {
                    connected = Some((index, client));
                    break;
                }
                Err(cause) if is_refusal(&*cause) => {
                    let reason = tandem_protocol::internal::error_chain(&*cause);
                    let user = failover.config.credentials.as_ref().map(|c| c.user().to_owned());
                    tracing::error!(endpoint = %url, user, reason,
                        "etcd refused this client's credentials; retrying cannot help, so the client stops: \
                         fix the user, password or client certificate and start again");
                    failover.publish(Current::Refused(reason));
                    return;
                }
                Err(cause) => {
                    tracing::debug!(endpoint = %url, error = %cause, "etcd member does not answer");
                    last_cause = Some(cause);
                }
            }
        }
        let Some((index, client)) = connected else {
            if !matches!(&*failover.current.borrow(), Current::Down { .. }) {
                let error = last_cause.as_ref().map(ToString::to_string).unwrap_or_default();
                tracing::warn!(endpoints = %failover.urls.join(","), error,
                    "no etcd member answers; calls fail as unavailable until one does");
            }
            failover.publish(Current::Down { tried: failover.urls.join(","), cause: last_cause });
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = failover.cancel.cancelled() => return,
            }
            continue;
        };
        backoff.reset();
        generation += 1;
        let endpoint: Arc<str> = Arc::from(failover.urls[index].as_str());
        tracing::info!(%endpoint, generation, "etcd member in use");
        failover.publish(Current::Connected(Box::new(Member { client, endpoint, generation })));
        tokio::select! {
            _ = failed.wait_for(|failed| *failed >= generation) => {}
            _ = failover.cancel.cancelled() => return,
        }
        failover.publish(Current::Connecting);
        next = (index + 1) % n;
    }
}
