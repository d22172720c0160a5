//! [`Reconnecting`]: a registry client that stays connected, and what it was
//! asked to follow or hold survives every reconnect.
//!
//! A [`RegistryClient`] is one TCP connection and ends with it. A `Reconnecting`
//! client owns a task that connects, and connects again whenever the
//! connection is lost, with a backoff from 20 ms to 2 s (the cause is in its
//! [`ConnectionState`]). On every new connection it registers again the
//! instances it holds, then publishes the client; each followed key or
//! service has its own loop, run by its stream, that waits for that client
//! and watches again:
//!
//! ```text
//! connection task:  connect ──> register held instances ──> publish client ──> Stats every 60 s ──> lost ─┐
//!                      ^ <─────────────────────── backoff 20 ms .. 2 s on failure ─────────────────────────┘
//! FollowedKey:      wait for a client ──> watch from the last revision (or read the key again) ──> yield values
//! FollowedService:  wait for a client ──> watch the service, list it ──> yield the list on every change
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tandem_protocol::internal::{Backoff, error_chain};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, warn};

use super::{Error, Registration, RegistryClient, ServiceWatch, Watch};
use crate::wire::{Instance, ServerInfo, ServiceEvent, WatchEvent, WatchSpec};

/// How often a connection sends a request (a `Stats`): well under the
/// registry's idle timeout (`tandem-registry serve --idle-timeout`, default
/// 5 min), which closes connections with no watch and no lease.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// The pause before watching again what the registry refused after a reconnect.
const REFUSED_RETRY: Duration = Duration::from_secs(2);
/// The first and the longest pause between connection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(2));

/// What a [`Reconnecting`] client knows of its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// The first attempt is under way.
    Connecting,
    /// Connected.
    Connected {
        /// The server's hello on this connection (its incarnation and revision then).
        server: ServerInfo,
    },
    /// The registry cannot be reached, or the connection was just lost: calls
    /// fail at once while the client keeps trying.
    Unavailable {
        /// Why the last attempt failed, or `connection lost: <why>`.
        reason: String,
    },
}

/// A registry client that reconnects by itself: one connection at a time, and
/// keys, services and registrations that outlive it.
///
/// A followed key resumes from its last revision, so no change is missed,
/// unless the registry restarted with less state (another incarnation in its
/// hello, or a revision below the one to resume from; logged at WARN once per
/// restart): then the key is read again and followed from the new server's
/// revision, and a key that is gone is reported as deleted. A resume older
/// than the server's history delivers the key's current value.
///
/// Cheap to clone; every clone shares the connection. The connection task
/// stops when the last clone, and the last stream made from it, is dropped.
///
/// ```no_run
/// use futures::StreamExt;
/// use tandem_registry::Reconnecting;
///
/// # async fn demo() -> Result<(), tandem_registry::Error> {
/// let registry = Reconnecting::start("127.0.0.1:7000");
/// // Accepted even while the registry is down; it flows once the registry is up.
/// let mut values = registry.follow_key("app/db.url").await?;
/// while let Some(state) = values.next().await {
///     println!("{:?} at revision {}", state.value, state.revision);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Reconnecting {
    shared: Arc<Shared>,
    /// Stops the connection task once every handle and stream is gone.
    _stop: Arc<DropGuard>,
}

#[derive(Debug)]
struct Shared {
    addr: String,
    /// The live client, or why there is none.
    link: watch::Sender<Result<RegistryClient, Error>>,
    state: watch::Sender<ConnectionState>,
    held: Mutex<Held>,
}

/// By (service, id): what to register again after a reconnect, and its registration.
type Held = HashMap<(String, String), (Instance, Duration, Registration)>;

impl Reconnecting {
    /// Starts connecting to the registry at `addr` (such as `127.0.0.1:7000`)
    /// in the background, on the current tokio runtime, and returns at once:
    /// await a change of [`state`](Self::state) for the first outcome. An
    /// unreachable registry is logged at WARN with why (then at DEBUG while it
    /// stays so), a lost connection at WARN, the recovery at INFO.
    pub fn start(addr: impl Into<String>) -> Reconnecting {
        let addr = addr.into();
        let not_yet = io::Error::new(io::ErrorKind::NotConnected, "not connected yet");
        let shared = Arc::new(Shared {
            link: watch::Sender::new(Err(Error::Connect { addr: addr.clone(), source: Arc::new(not_yet) })),
            addr,
            state: watch::Sender::new(ConnectionState::Connecting),
            held: Mutex::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(connection_task(shared.clone(), stop.clone()));
        Reconnecting { shared, _stop: Arc::new(stop.drop_guard()) }
    }

    /// The registry's address, as given.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The connection's state, to read or to await a transition.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// The connected client, for one-off calls. Fails at once while there is
    /// none, with why (the last attempt's error, or the lost connection's). A
    /// connection that died a moment ago may not be noticed yet: its calls
    /// fail with [`Error::ConnectionLost`].
    pub fn current(&self) -> Result<RegistryClient, Error> {
        self.shared.link.borrow().clone()
    }

    /// The connected client, waiting as long as it takes (a client whose
    /// connection just died is not connected: its successor is waited for).
    async fn connected(&self) -> Option<RegistryClient> {
        let mut link = self.shared.link.subscribe();
        let link = link.wait_for(|link| link.as_ref().is_ok_and(|c| !c.is_closed())).await.ok()?;
        link.as_ref().ok().cloned()
    }

    /// Registers `instance` under a lease of `ttl` on the current connection
    /// and holds it: it is registered again after every reconnect (a failure
    /// then is logged at WARN) until [`deregister`](Self::deregister)ed or
    /// this client is dropped. The same (service, id) again replaces it.
    pub async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), Error> {
        let registration = self.current()?.register(instance.clone(), ttl).await?;
        let key = (instance.service.clone(), instance.id.clone());
        self.shared.held().insert(key, (instance, ttl, registration));
        Ok(())
    }

    /// Removes an instance registered through this client; `false` if it was not.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, Error> {
        let held = self.shared.held().remove(&(service.to_owned(), id.to_owned()));
        let Some((_, _, registration)) = held else { return Ok(false) };
        registration.deregister().await?;
        Ok(true)
    }

    /// Follows `key`: the stream yields its current value (an absence too),
    /// then every change, in revision order, across reconnects (see
    /// [`Reconnecting`] for a registry that restarted with less state).
    ///
    /// Returns once the registry accepted the key's watch: its refusal (such
    /// as the watches-per-connection limit, code `too_many_watches`) is the
    /// error, at once. While the registry is unreachable the key is accepted
    /// and flows once it is back. A watch refused after a reconnect is logged
    /// at ERROR (the first time) and tried again every 2 s.
    pub async fn follow_key(&self, key: impl Into<String>) -> Result<FollowedKey, Error> {
        let mut key = KeyFollower { registry: self.clone(), key: key.into(), position: None, live: None, first: None };
        if let Ok(client) = self.current() {
            match key.start(client).await {
                Ok(current) => key.first = current,
                Err(error) if error.is_connection_lost() => {}
                Err(error) => return Err(error),
            }
        }
        let values = futures::stream::unfold(key, |mut key| async move { Some((key.next().await?, key)) });
        Ok(FollowedKey { values: Box::pin(values) })
    }

    /// Follows `service`: the stream yields its instances (sorted by id) once
    /// the watch started, after every change, and again after each reconnect.
    /// Refusals and losses are handled like [`follow_key`](Self::follow_key)'s
    /// (a refusal after a reconnect is logged at WARN each time).
    pub async fn follow_service(&self, service: impl Into<String>) -> Result<FollowedService, Error> {
        let mut service = ServiceFollower {
            registry: self.clone(),
            service: service.into(),
            live: None,
            instances: BTreeMap::new(),
            fresh: false,
        };
        if let Ok(client) = self.current()
            && let Err(error) = service.start(client).await
            && !error.is_connection_lost()
        {
            return Err(error);
        }
        let lists =
            futures::stream::unfold(service, |mut service| async move { Some((service.next().await?, service)) });
        Ok(FollowedService { lists: Box::pin(lists) })
    }
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No client, because of `error`.
    fn down(&self, reason: String, error: Error) {
        // Nobody waits for an error: the waiting streams are not woken.
        self.link.send_if_modified(|link| {
            *link = Err(error);
            false
        });
        self.state.send_if_modified(|state| match state {
            ConnectionState::Unavailable { reason: old } if *old == reason => false,
            _ => {
                *state = ConnectionState::Unavailable { reason };
                true
            }
        });
    }

    /// Registers the held instances again on `client`, a new connection.
    async fn register_again(&self, client: &RegistryClient) {
        let held: Vec<(Instance, Duration)> = self.held().values().map(|(i, ttl, _)| (i.clone(), *ttl)).collect();
        for (instance, ttl) in held {
            match client.register(instance.clone(), ttl).await {
                Ok(live) => {
                    if let Some(entry) = self.held().get_mut(&(instance.service, instance.id)) {
                        entry.2 = live;
                    }
                }
                Err(error) => {
                    warn!(service = %instance.service, id = %instance.id, error = %error_chain(&error), "re-register failed")
                }
            }
        }
    }
}

/// Keeps a client connected: connects (reporting failures and backing off),
/// registers the held instances again, serves until the connection dies, again.
async fn connection_task(shared: Arc<Shared>, stop: CancellationToken) {
    let addr = shared.addr.as_str();
    let mut backoff = Backoff::new(BACKOFF.0, BACKOFF.1);
    let (mut failures, mut incarnation) = (0u64, None::<String>);
    loop {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = RegistryClient::connect(addr) => connected,
        };
        let client = match connected {
            Ok(client) => client,
            Err(error) => {
                failures += 1;
                let reason = error_chain(&error);
                if failures == 1 {
                    warn!(registry = %addr, error = %reason, "registry unreachable; retrying with backoff");
                } else {
                    debug!(registry = %addr, error = %reason, failures, "registry still unreachable");
                }
                shared.down(reason, error);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        let server = client.server_info().clone();
        if let Some(previous) = incarnation.replace(server.incarnation.clone()).filter(|p| *p != server.incarnation) {
            warn!(registry = %addr, previous, incarnation = %server.incarnation, revision = server.revision,
                "the registry restarted (a new incarnation): every watched key is read again from it");
        }
        shared.register_again(&client).await;
        if failures > 0 {
            info!(registry = %addr, failures, "registry reachable again");
        }
        debug!(registry = %addr, incarnation = %server.incarnation, revision = server.revision, "registry connection established");
        backoff.reset();
        shared.link.send_modify(|link| *link = Ok(client.clone()));
        shared.state.send_replace(ConnectionState::Connected { server });
        let error = loop {
            tokio::select! {
                error = client.closed() => break error,
                () = stop.cancelled() => return,
                // A tiny request now and then, so a connection with nothing to watch is not idle.
                () = tokio::time::sleep(KEEPALIVE) => if let Err(error) = client.stats().await {
                    debug!(registry = %addr, error = %error_chain(&error), "registry keepalive failed");
                },
            }
        };
        let reason = format!("connection lost: {}", error_chain(&error));
        warn!(registry = %addr, error = %reason, "registry connection lost; reconnecting");
        failures = 1;
        shared.down(reason, error);
    }
}

/// A followed key's value at a revision (`None` once deleted), from [`FollowedKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// The value, or `None` if the key is not set.
    pub value: Option<Bytes>,
    /// The revision of the change, or of the read that found the key absent.
    pub revision: u64,
}

/// The values of a key across reconnects, from [`Reconnecting::follow_key`].
/// It never ends; dropping it cancels the watch.
#[must_use = "a stream does nothing unless polled"]
pub struct FollowedKey {
    values: Pin<Box<dyn Stream<Item = KeyState> + Send>>,
}

/// The instance lists of a service across reconnects, from [`Reconnecting::follow_service`].
/// It never ends; dropping it cancels the watch.
#[must_use = "a stream does nothing unless polled"]
pub struct FollowedService {
    lists: Pin<Box<dyn Stream<Item = Vec<Instance>> + Send>>,
}

impl Stream for FollowedKey {
    type Item = KeyState;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<KeyState>> {
        self.values.as_mut().poll_next(cx)
    }
}

impl Stream for FollowedService {
    type Item = Vec<Instance>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<Instance>>> {
        self.lists.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for FollowedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowedKey").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FollowedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowedService").finish_non_exhaustive()
    }
}

/// Where a key's watch stands: the server incarnation its revisions belong to,
/// and the next revision to receive.
#[derive(Debug, Clone)]
struct Position {
    incarnation: String,
    from: u64,
}

impl Position {
    /// Whether `client`'s server can resume from here: the same incarnation, and
    /// a revision that reached ours (a lower one means the server lost state).
    fn valid_on(&self, client: &RegistryClient) -> bool {
        let info = client.server_info();
        info.incarnation == self.incarnation && info.revision.saturating_add(1) >= self.from
    }
}

/// A key's watch on `client`: from `position` if that server can resume from
/// there, or else from a fresh read of the key (then also its current value).
async fn start_key(
    client: &RegistryClient,
    key: &str,
    position: Option<&Position>,
) -> Result<(Watch, Position, Option<KeyState>), Error> {
    if let Some(p) = position.filter(|p| p.valid_on(client)) {
        let watch = client.watch(WatchSpec::key(key), Some(p.from)).await?;
        return Ok((watch, p.clone(), None));
    }
    if position.is_some() {
        // Once per key: the connection's WARN ("the registry restarted") says it for all of them.
        debug!(subscription.key = %key, "the registry lost state; reading the key again");
    }
    let (current, revision) = client.get_with_revision(key).await?;
    let from = revision.saturating_add(1);
    let watch = client.watch(WatchSpec::key(key), Some(from)).await?;
    let position = Position { incarnation: client.server_info().incarnation.clone(), from };
    let current = match current {
        Some(kv) => KeyState { value: Some(kv.value), revision: kv.mod_revision },
        None => KeyState { value: None, revision },
    };
    Ok((watch, position, Some(current)))
}

/// A followed key's loop, one value per [`next`](Self::next).
struct KeyFollower {
    registry: Reconnecting,
    key: String,
    position: Option<Position>,
    /// The watch, and the client it runs on; `None` until (re)started.
    live: Option<(RegistryClient, Watch)>,
    /// The value read when the watch was first started, not yet yielded.
    first: Option<KeyState>,
}

impl KeyFollower {
    /// Watches the key on `client`; returns its value when it was read again.
    async fn start(&mut self, client: RegistryClient) -> Result<Option<KeyState>, Error> {
        let (watch, position, current) = Box::pin(start_key(&client, &self.key, self.position.as_ref())).await?;
        self.position = Some(position);
        self.live = Some((client, watch));
        Ok(current)
    }

    /// The key's next value, resuming after reconnects from the last revision,
    /// or re-reading the key when the registry restarted with less state.
    async fn next(&mut self) -> Option<KeyState> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        let mut refusals = 0u32;
        loop {
            let Some((client, watch)) = &mut self.live else {
                let client = self.registry.connected().await?;
                match self.start(client).await {
                    Ok(Some(current)) => return Some(current),
                    Ok(None) => refusals = 0,
                    Err(error) if error.is_connection_lost() => {}
                    Err(error) => {
                        // Accepted earlier on another connection: say so loudly, retry slowly.
                        refusals += 1;
                        if refusals == 1 {
                            error!(subscription.key = %self.key, error = %error_chain(&error),
                                "the registry refused to watch a subscribed key after a reconnect; retrying");
                        }
                        tokio::time::sleep(REFUSED_RETRY).await;
                    }
                }
                continue;
            };
            let state = match watch.next().await {
                Some(Ok(WatchEvent::Put { value, revision, .. })) => KeyState { value: Some(value), revision },
                Some(Ok(WatchEvent::Delete { revision, .. })) => KeyState { value: None, revision },
                Some(Ok(WatchEvent::Compacted { revision, .. })) => {
                    // History was lost: a snapshot Put follows only if the key exists now.
                    if let Some(p) = self.position.as_mut() {
                        p.from = revision.saturating_add(1);
                    }
                    match Box::pin(client.get(&self.key)).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => KeyState { value: None, revision },
                        Err(_) => {
                            self.live = None;
                            continue;
                        }
                    }
                }
                ended => {
                    if let Some(Err(error)) = ended {
                        debug!(error = %error_chain(&error), subscription.key = %self.key, "watch ended; resuming");
                    }
                    self.live = None;
                    continue;
                }
            };
            if let Some(p) = self.position.as_mut() {
                p.from = p.from.max(state.revision.saturating_add(1));
            }
            return Some(state);
        }
    }
}

/// A followed service's loop, one instance list per [`next`](Self::next).
struct ServiceFollower {
    registry: Reconnecting,
    service: String,
    /// The watch, and the client it runs on; `None` until (re)started.
    live: Option<(RegistryClient, ServiceWatch)>,
    /// By id: the instances as last listed and changed.
    instances: BTreeMap<String, Instance>,
    /// Listed again and not yet yielded.
    fresh: bool,
}

impl ServiceFollower {
    /// Watches the service on `client`, then lists it (so no change falls in between).
    async fn start(&mut self, client: RegistryClient) -> Result<(), Error> {
        let watch = client.watch_service(&self.service).await?;
        let listed = client.discover(&self.service).await?;
        self.instances = listed.into_iter().map(|i| (i.id.clone(), i)).collect();
        (self.live, self.fresh) = (Some((client, watch)), true);
        Ok(())
    }

    async fn next(&mut self) -> Option<Vec<Instance>> {
        loop {
            if std::mem::take(&mut self.fresh) {
                return Some(self.instances.values().cloned().collect());
            }
            let Some((_, watch)) = &mut self.live else {
                let client = self.registry.connected().await?;
                if let Err(error) = self.start(client.clone()).await {
                    warn!(error = %error_chain(&error), service = %self.service, "service watch failed; retrying");
                    tokio::select! {
                        _ = client.closed() => {}
                        () = tokio::time::sleep(REFUSED_RETRY) => {}
                    }
                }
                continue;
            };
            // The watch opens with one Join per current instance: those change nothing.
            let changed = match watch.next().await {
                Some(Ok(ServiceEvent::Join(instance))) => {
                    self.instances.insert(instance.id.clone(), instance.clone()).as_ref() != Some(&instance)
                }
                Some(Ok(ServiceEvent::Leave { id, .. })) => self.instances.remove(&id).is_some(),
                ended => {
                    if let Some(Err(error)) = ended {
                        debug!(error = %error_chain(&error), service = %self.service, "service watch ended; resuming");
                    }
                    self.live = None;
                    false
                }
            };
            if changed {
                return Some(self.instances.values().cloned().collect());
            }
        }
    }
}
