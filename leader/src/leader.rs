//! The leader: channels, sessions, listeners.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tandem_protocol::internal::{AcceptErrors, Backoff};
use tandem_protocol::{Api, FrameCodec, Link, MirrorEntry, RemoteError, UpstreamState};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::admission::{Admission, Handshakes};
use crate::cache::Cache;
use crate::channel::Channel;
use crate::erased::{BoxFuture, ErasedUpstream, Typed};
use crate::fence::Fence;
use crate::hub::HubContext;
use crate::session::{self, PeerInfo};
use crate::shared::Shared;
use crate::{ChannelStats, Config, Error, LeaderGoodbye, Stats, Upstream};

/// Checks whether a leader still holds its place: see [`LeaderBuilder::fence`].
type StillLeader = Box<dyn Fn() -> bool + Send + Sync>;

type Built = BoxFuture<Result<Arc<dyn ErasedUpstream>, RemoteError>>;

/// How a channel's upstream is built.
enum Factory {
    /// Once: if it fails, the channel stays down with that error.
    Once(Built),
    /// Again and again, with backoff, until it succeeds.
    Retry(Box<dyn Fn() -> Built + Send + Sync>),
}

/// Builds a [`Leader`]: its epoch, token, settings, cache and channels.
#[must_use = "a builder does nothing until start() is called"]
pub struct LeaderBuilder {
    config: Config,
    epoch: u64,
    token: Option<String>,
    cache: Option<Cache>,
    channels: Vec<(String, Factory)>,
    still_leader: Option<StillLeader>,
    seed: Vec<MirrorEntry>,
}

impl std::fmt::Debug for LeaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderBuilder")
            .field("epoch", &self.epoch)
            .field("channels", &self.channels.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl LeaderBuilder {
    /// Settings. The default is [`Config::default()`].
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The epoch: must exceed every earlier leader's of this name. The default is 1.
    pub fn epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The secret followers must present in `Hello` (peers relayed by a trusted
    /// party and in-process handles are exempt). The default is none.
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Fences the leader: `still_leader` says whether this leader still holds
    /// its place (its election lock, its epoch). It is called every
    /// [`FENCE_CHECK_INTERVAL`](crate::FENCE_CHECK_INTERVAL), and before
    /// anything is read from or written to a follower after this process did
    /// not run for a while (`SIGSTOP`, a frozen VM). Once it returns `false`,
    /// the leader stops at once: no frame more goes out at this epoch, every
    /// session ends, and the upstream clients are dropped (their connections
    /// close). It must be quick (a `stat` or two) and must not block for long.
    /// The default is none: the leader serves until it is shut down.
    ///
    /// The standalone election sets it; a leader whose process is supervised
    /// (the cluster's agent, killed when hung) needs none.
    pub fn fence(mut self, still_leader: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.still_leader = Some(Box::new(still_leader));
        self
    }

    /// Keeps the latest live value of every subscribed key in this
    /// last-known-good cache, and serves it (marked `cached`) to subscribers
    /// while a channel's upstream is unreachable. The default is no cache.
    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Starts warm, from a hot standby's mirror of the previous leader
    /// (`tandem_follower::Mirror::entries`, PROTOCOL.md §7.2): each entry's
    /// value is the key's last value from the start, served at once to
    /// subscribers (before the upstream answers) at a new position of this
    /// leader's epoch, which must exceed the entries' epochs. Each seeded key
    /// is subscribed upstream as soon as its channel's upstream is built, from
    /// the entry's revision where the upstream can resume
    /// ([`Upstream::subscribe_from`]); the upstream's first value, when byte
    /// for byte the seeded one, is not sent again. A seeded key stays followed
    /// for [`Config::seed_hold`] even with no subscriber (the old leader's
    /// followers resubscribe meanwhile). Entries of channels this leader does
    /// not serve are ignored (WARN). The default is no seed.
    pub fn seed(mut self, entries: impl IntoIterator<Item = MirrorEntry>) -> Self {
        self.seed.extend(entries);
        self
    }

    /// [`Cache::open`]s `dir` and uses it as the [`cache`](Self::cache).
    /// Fails if the directory cannot be created or is open to other users.
    pub fn cache_dir(self, dir: impl AsRef<Path>) -> Result<Self, Error> {
        Ok(self.cache(Cache::open(dir)?))
    }

    /// Adds a channel served by `upstream`. (For a value that implements
    /// `Upstream` for several APIs, name the API: `.channel_from::<ConfigApi, _>(upstream)`.)
    pub fn channel<A: Api, U: Upstream<A>>(self, upstream: U) -> Self {
        self.channel_from::<A, U>(async move { Ok(upstream) })
    }

    /// Adds a channel whose upstream client is built by `upstream` once the
    /// leader starts. Until it resolves, the channel is `Starting` (calls and
    /// subscriptions wait); if it fails, the channel is `Down` with that error
    /// for good, and subscriptions are refused with it. To keep trying, use
    /// [`channel_with_retry`](Self::channel_with_retry).
    pub fn channel_from<A: Api, U: Upstream<A>>(
        mut self,
        upstream: impl Future<Output = Result<U, RemoteError>> + Send + 'static,
    ) -> Self {
        let built: Built = Box::pin(async move {
            let upstream = upstream.await?;
            Ok(Arc::new(Typed::<A, U>::new(upstream)) as Arc<dyn ErasedUpstream>)
        });
        self.channels.push((A::NAME.to_string(), Factory::Once(built)));
        self
    }

    /// Adds a channel whose upstream client is built by calling `build` until
    /// it succeeds: the leader starts without it. Meanwhile the channel is
    /// `Down` with the last build error (logged at WARN the first time, with
    /// the cause), calls fail at once with that error, and subscriptions are
    /// accepted as pending (served from the [`cache`](Self::cache) if it holds
    /// the key); attempts are spaced by `Config::upstream_retry_initial`,
    /// doubling up to `Config::upstream_retry_max`. Once built, the pending
    /// subscriptions are subscribed upstream and everything flows, with no restart.
    pub fn channel_with_retry<A, U, F, Fut>(mut self, build: F) -> Self
    where
        A: Api,
        U: Upstream<A>,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<U, RemoteError>> + Send + 'static,
    {
        let factory = move || -> Built {
            let attempt = build();
            Box::pin(async move {
                let upstream = attempt.await?;
                Ok(Arc::new(Typed::<A, U>::new(upstream)) as Arc<dyn ErasedUpstream>)
            })
        };
        self.channels.push((A::NAME.to_string(), Factory::Retry(Box::new(factory))));
        self
    }

    /// Starts the leader: the channels' upstreams begin building. Must be called
    /// inside a tokio runtime. Serve it with [`Leader::bind_unix`] and friends.
    pub fn start(self) -> Leader {
        let mut channels = HashMap::new();
        let mut factories = Vec::new();
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        for (name, factory) in self.channels {
            let ctx = HubContext {
                epoch: self.epoch,
                config: self.config.clone(),
                tracker: tracker.clone(),
                cancel: cancel.clone(),
                cache: self.cache.clone(),
                accept_pending: matches!(factory, Factory::Retry(_)),
            };
            let channel = Arc::new(Channel::new(&name, ctx));
            channels.insert(name, channel.clone());
            factories.push((channel, factory));
        }
        let mut seeds: HashMap<String, Vec<MirrorEntry>> = HashMap::new();
        for entry in self.seed {
            seeds.entry(entry.channel.as_str().to_owned()).or_default().push(entry);
        }
        for (name, entries) in seeds {
            match channels.get(&name) {
                Some(channel) => channel.hub.seed(entries),
                None => {
                    tracing::warn!(channel = %name, keys = entries.len(), "seeded keys of a channel this leader does not serve; ignored")
                }
            }
        }
        let handshakes = Handshakes::new(&self.config);
        let fence = self.still_leader.map(|check| Arc::new(Fence::new(check, cancel.clone())));
        if let Some(fence) = fence.clone() {
            let epoch = self.epoch;
            tracker.spawn(async move { fence.watch(epoch).await });
        }
        if let Some(cache) = self.cache.clone() {
            // Its own token: the writer flushes what is pending once the leader stops.
            let stop = cancel.clone();
            tracker.spawn(cache.run_writer(stop));
        }
        let shared = Arc::new(Shared {
            handshakes,
            refusals: Default::default(),
            id: Uuid::new_v4(),
            epoch: self.epoch,
            config: self.config,
            token: self.token,
            channels,
            tracker,
            cancel,
            next_session: AtomicU64::new(1),
            followers: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            conflated: AtomicU64::new(0),
            peers: Default::default(),
            call_latency: Default::default(),
            fence,
            leaving: Default::default(),
        });
        for (channel, factory) in factories {
            let cancel = shared.cancel.clone();
            let (initial, max) = (shared.config.upstream_retry_initial, shared.config.upstream_retry_max);
            shared.tracker.spawn(async move {
                let Some(upstream) = build_upstream(&channel, factory, &cancel, initial, max).await else { return };
                let health = upstream.health();
                channel.attach(upstream);
                channel.state.send_replace(UpstreamState::Ready);
                if let Some(health) = health {
                    forward_health(&channel, health, &cancel).await;
                }
            });
        }
        tracing::debug!(epoch = shared.epoch, leader.id = %shared.id, "leader started");
        Leader { shared }
    }
}

/// The leader: holds each channel's one upstream client and serves followers.
///
/// Cheap to clone; every clone is the same leader. Built with
/// [`Leader::builder`] ([`LeaderBuilder`]): one [`Upstream`](crate::Upstream)
/// per channel, then served on a Unix socket (followers connect with
/// `tandem_follower::UnixConnector`) and, in its own process, through memory
/// (`tandem_follower::LocalConnector`).
///
/// ```
/// use tandem_leader::Leader;
/// # use tandem_leader::{CallContext, Events, Upstream};
/// # use tandem_protocol::{Api, RemoteError};
/// # struct Echo;
/// # impl Api for Echo {
/// #     const NAME: &'static str = "echo";
/// #     type Key = String; type Event = String; type Request = String; type Response = String;
/// # }
/// # struct EchoUpstream;
/// # impl Upstream<Echo> for EchoUpstream {
/// #     async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> { Ok(request) }
/// #     async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
/// #         Err(RemoteError::bad_request("no keys"))
/// #     }
/// # }
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # use std::os::unix::fs::PermissionsExt;
/// # let dir = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o700)).tempdir()?;
/// let leader = Leader::builder().channel(EchoUpstream).start();
/// let socket = leader.bind_unix(dir.path().join("leader.sock"))?; // in a private (0700) directory
/// assert!(socket.exists());
/// // ... followers connect to `socket` ...
/// leader.shutdown().await; // stops serving and drops the upstream clients
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Leader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader").field("id", &self.shared.id).field("epoch", &self.shared.epoch).finish()
    }
}

impl Leader {
    /// A builder with default settings, epoch 1, no token and no channels.
    pub fn builder() -> LeaderBuilder {
        LeaderBuilder {
            config: Config::default(),
            epoch: 1,
            token: None,
            cache: None,
            channels: Vec::new(),
            still_leader: None,
            seed: Vec::new(),
        }
    }

    /// The leader's random id.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    /// The leader's epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// Whether the leader's [fence](LeaderBuilder::fence) said another process
    /// took its place: it serves nothing more (it stops as if shut down).
    pub fn is_fenced(&self) -> bool {
        self.shared.fence.as_ref().is_some_and(|fence| fence.is_fenced())
    }

    /// The current state of a channel's upstream, if the leader serves it.
    pub fn upstream_state(&self, channel: &str) -> Option<UpstreamState> {
        self.shared.channels.get(channel).map(|c| c.state.borrow().clone())
    }

    /// Serves followers on a Unix socket at `path`.
    ///
    /// The socket's directory is created with mode 0700 if missing; an existing
    /// one must belong to this user and be closed to others. A stale socket
    /// file at `path` is replaced: callers make sure no live leader owns it (the
    /// election lock does). Each peer's uid is checked with `SO_PEERCRED` before
    /// its first byte is read.
    pub fn bind_unix(&self, path: impl AsRef<Path>) -> Result<PathBuf, Error> {
        let path = path.as_ref().to_path_buf();
        let bind_error = |source| Error::Bind { path: path.display().to_string(), source };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        ensure_private_dir(dir).map_err(|e| match e {
            DirError::Io(source) => bind_error(source),
            DirError::Insecure(mode) => Error::InsecureDirectory { path: dir.to_path_buf(), mode },
            DirError::Foreign { owner, uid } => Error::ForeignDirectory { path: dir.to_path_buf(), owner, uid },
            DirError::NotADirectory => Error::NotADirectory { path: dir.to_path_buf() },
        })?;
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        let bound = std::fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino())).map_err(bind_error)?;
        tracing::debug!(path = %path.display(), "leader listening");
        let shared = self.shared.clone();
        let socket = path.clone();
        self.shared.tracker.spawn(
            async move {
                accept_unix(shared, listener).await;
                // Only the socket this leader bound: a leader that took over from
                // this one (fenced) has its own socket at the same path.
                let ours = std::fs::symlink_metadata(&socket).is_ok_and(|m| (m.dev(), m.ino()) == bound);
                if ours {
                    let _ = std::fs::remove_file(&socket);
                }
            }
            .in_current_span(),
        );
        Ok(path)
    }

    /// Serves followers over TCP on a loopback address (needs a token: TCP has no peer uid).
    pub async fn bind_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        if !addr.ip().is_loopback() {
            return Err(Error::NotLoopback(addr));
        }
        if self.shared.token.is_none() {
            return Err(Error::TokenRequired);
        }
        let listener =
            TcpListener::bind(addr).await.map_err(|source| Error::Bind { path: addr.to_string(), source })?;
        let local = listener.local_addr().map_err(|source| Error::Bind { path: addr.to_string(), source })?;
        tracing::debug!(addr = %local, "leader listening on TCP");
        self.shared.tracker.spawn(accept_tcp(self.shared.clone(), listener).in_current_span());
        Ok(local)
    }

    /// Serves one follower over a link that some other transport established
    /// (the cluster's messenger relay, a test harness).
    pub fn serve_link(&self, link: Link, peer: PeerInfo) {
        self.shared
            .tracker
            .spawn(session::run(self.shared.clone(), link, peer, Admission::trusted()).in_current_span());
    }

    /// A link for a follower in this very process: frames travel through memory,
    /// with the same deadlines, subscription sharing and ordering as a socket.
    pub fn connect_local(&self) -> Link {
        let (ours, theirs) = Link::pair(1024);
        let peer =
            PeerInfo { pid: i32::try_from(std::process::id()).ok(), uid: None, transport: "local", trusted: true };
        self.serve_link(ours, peer);
        theirs
    }

    /// What the leader is doing now.
    pub fn stats(&self) -> Stats {
        let mut channels: Vec<ChannelStats> = self
            .shared
            .channels
            .values()
            .map(|channel| {
                let counts = channel.hub.counts();
                ChannelStats {
                    name: channel.name.to_string(),
                    upstream: channel.state.borrow().clone(),
                    subscriptions: counts.keys,
                    subscribers: counts.subscribers,
                    keys: channel.hub.keys(),
                }
            })
            .collect();
        channels.sort_by(|a, b| a.name.cmp(&b.name));
        Stats {
            leader_id: self.shared.id,
            epoch: self.shared.epoch,
            followers: self.shared.followers.load(Ordering::Relaxed),
            in_flight: self.shared.in_flight.load(Ordering::Relaxed),
            conflated_events: self.shared.conflated.load(Ordering::Relaxed),
            events_sent: self.shared.channels.values().map(|c| c.hub.events.load(Ordering::Relaxed)).sum(),
            undelivered_dropped: self
                .shared
                .channels
                .values()
                .map(|c| c.hub.undelivered_dropped.load(Ordering::Relaxed))
                .sum(),
            follower_list: {
                let peers = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner());
                let mut list: Vec<crate::FollowerStats> = peers.values().cloned().collect();
                list.sort_by_key(|f| f.id);
                list
            },
            call_latency: self.shared.call_latency.snapshot(),
            channels,
        }
    }

    /// A token cancelled when the leader shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// Stops: says goodbye to every follower (`Goodbye("leader shutting
    /// down")`, [`LeaderGoodbye::ShuttingDown`]), stops listening, cancels
    /// calls, and waits (up to the configured grace) for sessions to flush.
    /// Followers log it at INFO and reconnect to whoever leads next; a leader
    /// whose process just exits (or whose handle is dropped with the runtime)
    /// says nothing, and its followers log `lost the leader` at WARN.
    pub async fn shutdown(&self) {
        self.stop(LeaderGoodbye::ShuttingDown).await;
    }

    /// Steps down so that another process leads: like [`shutdown`](Self::shutdown),
    /// but every follower is told `Goodbye("leader handing off")`
    /// ([`LeaderGoodbye::HandOff`]), logs the hand-off at INFO (not as a lost
    /// leader) and looks for the next leader at once. Whoever elects leaders
    /// releases its lock after this returns: the standalone election does it
    /// in `Connection::step_down` (tandem-follower).
    ///
    /// ```
    /// use tandem_leader::Leader;
    /// # use tandem_leader::{CallContext, Events, Upstream};
    /// # use tandem_protocol::{Api, RemoteError};
    /// # struct Echo;
    /// # impl Api for Echo {
    /// #     const NAME: &'static str = "echo";
    /// #     type Key = String; type Event = String; type Request = String; type Response = String;
    /// # }
    /// # struct EchoUpstream;
    /// # impl Upstream<Echo> for EchoUpstream {
    /// #     async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> { Ok(request) }
    /// #     async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
    /// #         Err(RemoteError::bad_request("no keys"))
    /// #     }
    /// # }
    /// # #[tokio::main]
    /// # async fn main() {
    /// let leader = Leader::builder().epoch(7).channel(EchoUpstream).start();
    /// // ... serve followers ...
    /// leader.hand_off().await; // followers: "the leader handed off" (INFO), then the next leader
    /// assert!(leader.shutdown_token().is_cancelled());
    /// # }
    /// ```
    pub async fn hand_off(&self) {
        self.stop(LeaderGoodbye::HandOff).await;
    }

    async fn stop(&self, goodbye: LeaderGoodbye) {
        // The first reason given wins: a hand-off is not turned into a shutdown by a later call.
        let _ = self.shared.leaving.set(goodbye);
        tracing::debug!(epoch = self.shared.epoch, reason = %goodbye, "leader stopping");
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        let grace = self.shared.config.shutdown_grace + Duration::from_millis(100);
        if tokio::time::timeout(grace, self.shared.tracker.wait()).await.is_err() {
            tracing::warn!("leader tasks still running after the shutdown grace");
        }
    }
}

/// Builds a channel's upstream: once, or (with a retrying factory) until it
/// succeeds, keeping the channel `Down` with the last error meanwhile. `None`
/// when the leader stops first or a one-shot build failed.
async fn build_upstream(
    channel: &Channel,
    factory: Factory,
    cancel: &CancellationToken,
    initial: Duration,
    max: Duration,
) -> Option<Arc<dyn ErasedUpstream>> {
    let build = match factory {
        Factory::Once(built) => {
            let result = tokio::select! {
                result = built => result,
                _ = cancel.cancelled() => return None,
            };
            return match result {
                Ok(upstream) => {
                    tracing::debug!(channel = %channel.name, "upstream ready");
                    Some(upstream)
                }
                Err(error) => {
                    tracing::error!(channel = %channel.name, %error, "upstream failed to start (built once: not retried)");
                    channel.hub.fail(error.clone());
                    channel.state.send_replace(UpstreamState::Down(error));
                    None
                }
            };
        }
        Factory::Retry(build) => build,
    };
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(initial, max);
    let mut last_error: Option<RemoteError> = None;
    let mut delay;
    for attempt in 1u64.. {
        let result = tokio::select! {
            result = build() => result,
            _ = cancel.cancelled() => return None,
        };
        match result {
            Ok(upstream) => {
                if attempt == 1 {
                    tracing::debug!(channel = %channel.name, "upstream ready");
                } else {
                    tracing::info!(channel = %channel.name, attempt, down_ms = started.elapsed().as_millis() as u64, "upstream ready after failed attempts");
                }
                return Some(upstream);
            }
            Err(error) => {
                delay = backoff.next_delay();
                // WARN the first time, and whenever the cause changes; DEBUG otherwise.
                if last_error.as_ref() != Some(&error) {
                    tracing::warn!(channel = %channel.name, %error, attempt, retry_ms = delay.as_millis() as u64, "cannot build the upstream; serving without it and retrying");
                } else {
                    tracing::debug!(channel = %channel.name, %error, attempt, "upstream still unavailable");
                }
                channel.state.send_replace(UpstreamState::Down(error.clone()));
                last_error = Some(error);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return None,
        }
    }
    None
}

/// Mirrors an upstream's own health into its channel's state (and so to the
/// followers) until the leader stops.
async fn forward_health(channel: &Channel, mut health: watch::Receiver<UpstreamState>, cancel: &CancellationToken) {
    loop {
        let state = health.borrow_and_update().clone();
        let state = match state {
            UpstreamState::Starting => UpstreamState::Down(RemoteError::unavailable("upstream reconnecting")),
            other => other,
        };
        if *channel.state.borrow() != state {
            tracing::info!(channel = %channel.name, state = ?state, "upstream state changed");
            channel.state.send_replace(state);
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

enum DirError {
    Io(std::io::Error),
    Insecure(u32),
    Foreign { owner: u32, uid: u32 },
    NotADirectory,
}

fn ensure_private_dir(dir: &Path) -> Result<(), DirError> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(DirError::NotADirectory);
            }
            // The owner first: only the owner can fix the mode.
            let uid = nix::unistd::geteuid().as_raw();
            if meta.uid() != uid {
                return Err(DirError::Foreign { owner: meta.uid(), uid });
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(DirError::Insecure(mode));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(DirError::Io)
        }
        Err(e) => Err(DirError::Io(e)),
    }
}

use std::os::unix::fs::DirBuilderExt;

/// Waits for a handshake slot, then for a connection; `None` once the leader stops.
///
/// A failed `accept` (out of descriptors, say) is logged (rate-limited) and
/// followed by a pause that grows while it lasts; the sessions already running
/// are served all along.
async fn next_connection<S, A>(
    shared: &Shared,
    errors: &mut AcceptErrors,
    mut accept: impl FnMut() -> A,
) -> Option<(S, Admission)>
where
    A: Future<Output = std::io::Result<S>>,
{
    let admission = tokio::select! {
        admission = shared.handshakes.slot() => admission,
        _ = shared.cancel.cancelled() => return None,
    };
    loop {
        let accepted = tokio::select! {
            accepted = accept() => accepted,
            _ = shared.cancel.cancelled() => return None,
        };
        match accepted {
            Ok(stream) => {
                errors.succeeded();
                return Some((stream, admission));
            }
            Err(error) => {
                let pause = errors.failed(&error);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.cancel.cancelled() => return None,
                }
            }
        }
    }
}

async fn accept_unix(shared: Arc<Shared>, listener: UnixListener) {
    let uid = nix::unistd::geteuid().as_raw();
    let mut errors = AcceptErrors::new("leader unix socket");
    loop {
        let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
        let Some((stream, admission)) = next_connection(&shared, &mut errors, accept).await else { return };
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(error) => {
                tracing::warn!(%error, "cannot read peer credentials; connection dropped");
                continue;
            }
        };
        if cred.uid() != uid {
            tracing::warn!(peer.uid = cred.uid(), peer.pid = cred.pid(), "connection from another user refused");
            continue;
        }
        let (read, write) = match tandem_protocol::unix::split(stream) {
            Ok(halves) => halves,
            Err(error) => {
                tracing::warn!(%error, "cannot register the connection; connection dropped");
                continue;
            }
        };
        let read = admission.limit(read, shared.config.max_hello_length);
        let link = Link::from_io(read, write, FrameCodec::with_max_frame_length(shared.config.max_frame_length));
        let peer = PeerInfo { pid: cred.pid(), uid: Some(cred.uid()), transport: "unix", trusted: false };
        shared.tracker.spawn(session::run(shared.clone(), link, peer, admission).in_current_span());
    }
}

async fn accept_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let mut errors = AcceptErrors::new("leader tcp socket");
    loop {
        let accept = || listener.accept();
        let Some(((stream, addr), admission)) = next_connection(&shared, &mut errors, accept).await else { return };
        if !addr.ip().is_loopback() {
            tracing::warn!(peer.addr = %addr, "non-loopback connection refused");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let read = admission.limit(read, shared.config.max_hello_length);
        let link = Link::from_io(read, write, FrameCodec::with_max_frame_length(shared.config.max_frame_length));
        let peer = PeerInfo { pid: None, uid: None, transport: "tcp", trusted: false };
        shared.tracker.spawn(session::run(shared.clone(), link, peer, admission).in_current_span());
    }
}
