//! The Leader in the cluster's agent, Followers in its workers, and the choice
//! of transport between them.
//!
//! ```text
//! worker: Connection ──(direct)───── unix socket ─────────────> agent: Leader
//!                    └─(messenger)── FrameLink ── master relay ──┘ (serve_link)
//! ```
//!
//! [`start_leader`] runs in the agent's start function: it gives the leader the
//! agent's epoch and the cluster token, serves the runtime directory's socket
//! and the links relayed by the master, and reports the agent ready.
//! [`WorkerConnector`] runs in a worker: it reaches that leader over the socket,
//! over the messenger relay, or (`auto`) over the socket when it can and the
//! relay when it cannot, returning to the socket once it is reachable again.

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use tandem_cluster::{AgentContext, AgentInfo, AgentReady, Messenger, WorkerContext};
use tandem_follower::{Connected, Connector};
use tandem_leader::{Leader, LeaderBuilder, PeerInfo};
use tandem_protocol::{FrameCodec, Link};
use tokio::sync::watch;

/// How a worker's Follower reaches the agent's Leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Transport {
    /// The leader's Unix socket, no master hop. The default.
    #[default]
    Direct,
    /// Frames relayed by the master over the IPC channels.
    Messenger,
    /// The socket when it can be reached, the relay otherwise; back to the
    /// socket as soon as it answers again.
    Auto,
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Transport::Direct),
            "messenger" => Ok(Transport::Messenger),
            "auto" => Ok(Transport::Auto),
            other => Err(format!("unknown transport {other:?}: expected direct, messenger or auto")),
        }
    }
}

/// The topic on which the agent answers leader introspection requests
/// (a JSON [`tandem_leader::Stats`]).
pub const LEADER_STATS_TOPIC: &str = tandem_cluster::control::AGENT_STATS_TOPIC;

/// A leader builder for the agent, keeping a last-known-good cache in
/// `cache_dir` when one is given (see `docs/cache.md`, "Last-known-good cache").
///
/// Call it in the master too, before the cluster starts, so that a bad
/// directory (not ours, open to others, not creatable) stops the program with
/// a clear error instead of failing every agent start.
pub fn agent_leader(cache_dir: Option<&Path>) -> Result<LeaderBuilder, tandem_leader::Error> {
    let builder = Leader::builder();
    match cache_dir {
        Some(dir) => builder.cache_dir(dir),
        None => Ok(builder),
    }
}

/// Starts the agent's Leader: epoch and token from the cluster, served on the
/// runtime directory's socket and on relayed links, then reports the agent ready.
///
/// In the hot standby ([`AgentContext::is_standby`], with
/// `tandem_cluster::Config::standby`) it first [stands by](standby): the
/// `builder` is not started (so it must not connect upstream before
/// [`LeaderBuilder::start`]: `channel_with_retry` and `channel_from` connect
/// at start), the standby mirrors the Leader, and only once promoted starts
/// it, seeded from the mirror, at the promoted epoch. When the standby is
/// stopped before its promotion it returns
/// [`tandem_cluster::Error::StandbyStopped`]: return it from the agent's
/// function (`?`), the process then exits cleanly.
pub async fn start_leader(ctx: &AgentContext, builder: LeaderBuilder) -> Result<Leader, tandem_cluster::BoxError> {
    let builder = if ctx.is_standby() { standby(ctx, builder).await? } else { builder.epoch(ctx.epoch()) };
    let leader = builder.token(Some(ctx.token().to_string())).start();
    let socket = leader.bind_unix(ctx.default_socket_path())?;
    if ctx.is_standby() {
        tracing::debug!(epoch = ctx.epoch(), "the promoted standby's Leader is bound");
    }
    let mut links = ctx.links();
    let relay_leader = leader.clone();
    let stop = leader.shutdown_token();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                incoming = links.recv() => {
                    let Some(incoming) = incoming else { return };
                    let link = Link::from(incoming.link);
                    let pid = i32::try_from(incoming.pid).ok();
                    tracing::debug!(worker.id = incoming.worker_id, pid = incoming.pid, "relayed follower link");
                    relay_leader.serve_link(link, PeerInfo::relayed("messenger", pid));
                }
                _ = stop.cancelled() => return,
            }
        }
    });
    let mut stats = ctx.messenger().subscribe(LEADER_STATS_TOPIC);
    let stats_leader = leader.clone();
    let stop = leader.shutdown_token();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                request = stats.next() => {
                    let Some(request) = request else { return };
                    let json = serde_json::to_vec(&stats_leader.stats()).unwrap_or_default();
                    let _ = request.reply(json).await;
                }
                _ = stop.cancelled() => return,
            }
        }
    });
    ctx.ready(AgentReady { socket }).await?;
    Ok(leader)
}

/// The hot standby's wait: mirrors the agent's Leader (PROTOCOL.md §7.2)
/// over its socket (no upstream connection), reports the standby ready once
/// the mirror's snapshot is complete, waits for the promotion, then returns
/// `builder` at the promoted epoch, seeded from the mirror when the mirror is
/// of the Leader it succeeds (else cold, as the standalone standby does).
pub async fn standby(ctx: &AgentContext, builder: LeaderBuilder) -> Result<LeaderBuilder, tandem_cluster::BoxError> {
    let mut config = tandem_follower::Config::default();
    config.token = Some(ctx.token().to_string());
    let connection = tandem_follower::Connection::builder()
        .config(config)
        .connect(tandem_follower::UnixConnector::new(ctx.default_socket_path()))
        .spawn();
    let mirrored = async {
        let mirror = connection.mirror().await?;
        mirror.synced().await;
        Ok::<_, tandem_follower::Error>(mirror)
    };
    let mirror = tokio::select! {
        mirror = mirrored => mirror,
        _ = ctx.stopped() => {
            connection.close().await;
            return Err(tandem_cluster::Error::StandbyStopped.into());
        }
    };
    let mirror = match mirror {
        Ok(mirror) => mirror,
        Err(error) => {
            connection.close().await;
            return Err(error.into());
        }
    };
    let mirrors = mirror.status().synced_epoch.unwrap_or(0);
    tracing::info!(mirrors, keys = mirror.len(), "standby ready: mirroring the agent's Leader");
    ctx.standby_ready(mirrors).await?;
    let promotion = match ctx.promoted().await {
        Ok(promotion) => promotion,
        Err(error) => {
            connection.close().await;
            return Err(error.into());
        }
    };
    // The map as it is now (the dead Leader's last state); then stop
    // following, before this process's own Leader binds the socket.
    let seed = warm_seed(&mirror, promotion.succeeded);
    tokio::spawn(async move { connection.close().await });
    tracing::info!(
        epoch = promotion.epoch,
        keys = seed.len(),
        "promoted: the standby leads, serving its mirrored values"
    );
    Ok(builder.epoch(promotion.epoch).seed(seed))
}

/// The mirror's entries if its last complete snapshot is of the Leader of
/// epoch `succeeded`; none (a cold start, WARN) otherwise.
fn warm_seed(mirror: &tandem_follower::Mirror, succeeded: u64) -> Vec<tandem_protocol::MirrorEntry> {
    match mirror.status().synced_epoch {
        Some(epoch) if epoch == succeeded => mirror.entries(),
        mirrored => {
            tracing::warn!(?mirrored, succeeded, "the standby's mirror is not of the Leader it succeeds; leading cold");
            Vec::new()
        }
    }
}

/// A worker's connector to the agent's Leader over the chosen [`Transport`].
#[derive(Debug)]
pub struct WorkerConnector {
    transport: Transport,
    agent: watch::Receiver<AgentInfo>,
    messenger: Messenger,
    /// How often `auto` probes the socket while on the relay. The default is 1 second.
    probe_every: Duration,
}

impl WorkerConnector {
    /// A connector for this worker.
    pub fn new(ctx: &WorkerContext, transport: Transport) -> Self {
        WorkerConnector {
            transport,
            agent: ctx.agent(),
            messenger: ctx.messenger().clone(),
            probe_every: Duration::from_secs(1),
        }
    }

    fn socket(&self) -> PathBuf {
        self.agent.borrow().socket.clone()
    }

    async fn direct(&self) -> io::Result<Connected> {
        let stream = tokio::net::UnixStream::connect(self.socket()).await?;
        let (read, write) = tandem_protocol::unix::split(stream)?;
        Ok(Connected::remote(Link::from_io(read, write, FrameCodec::new())))
    }

    async fn relayed(&self) -> io::Result<Connected> {
        let link = self.messenger.open_link().await.map_err(io::Error::other)?;
        Ok(Connected::remote(Link::from(link)))
    }
}

/// How long a connect attempt waits for the master to report a live agent.
const AGENT_WAIT: Duration = Duration::from_secs(5);

impl Connector for WorkerConnector {
    async fn connect(&mut self) -> io::Result<Connected> {
        // Reconnecting to a dead agent only burns backoff: wait for a live one
        // (the master tells every worker as soon as a new agent is ready).
        let _ = tokio::time::timeout(AGENT_WAIT, self.agent.wait_for(|agent| agent.up)).await;
        let epoch = self.agent.borrow().epoch;
        match self.connect_once().await {
            Ok(connected) => Ok(connected),
            Err(_) => {
                // The agent most likely just died and the master has not said so
                // yet: wait for its successor, then try at once.
                let successor = self.agent.wait_for(|agent| agent.up && agent.epoch > epoch);
                let _ = tokio::time::timeout(AGENT_WAIT, successor).await;
                self.connect_once().await
            }
        }
    }
}

impl WorkerConnector {
    async fn connect_once(&mut self) -> io::Result<Connected> {
        match self.transport {
            Transport::Direct => self.direct().await,
            Transport::Messenger => self.relayed().await,
            Transport::Auto => match self.direct().await {
                Ok(connected) => Ok(connected),
                Err(error) => {
                    tracing::info!(%error, "leader socket unreachable; using the messenger relay");
                    let mut connected = self.relayed().await?;
                    // End the relayed link once the socket answers, so the
                    // driver reconnects, and prefers the socket.
                    let socket = self.socket();
                    let every = self.probe_every;
                    let socket_back = async move {
                        loop {
                            tokio::time::sleep(every).await;
                            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                                tracing::info!("leader socket reachable again; leaving the relay");
                                return;
                            }
                        }
                    };
                    connected.link.rx = connected.link.rx.take_until(Box::pin(socket_back)).boxed();
                    Ok(connected)
                }
            },
        }
    }
}
