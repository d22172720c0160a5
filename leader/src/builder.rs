//! Builds a [`Leader`]: its epoch, token, settings, cache, seed and channels,
//! and starts it: each channel's upstream built (once, or with retries) and its health followed.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use tandem_protocol::internal::Backoff;
use tandem_protocol::{Api, MirrorEntry, RemoteError, UpstreamState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::admission::Handshakes;
use crate::cache::Cache;
use crate::channel::Channel;
use crate::erased::{BoxFuture, ErasedUpstream, Typed};
use crate::fence::Fence;
use crate::hub::HubContext;
use crate::leader::Leader;
use crate::shared::Shared;
use crate::{Config, Error, Upstream};

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
    /// for byte the seeded one, is not sent again. Until the upstream gives a
    /// seeded key a fresh value, a subscriber whose last seen position is at
    /// or after the entry's (epoch, seq) is not sent the seeded value (the
    /// mirror may lag what it got). A seeded key stays followed
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
        Leader::new(shared)
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
