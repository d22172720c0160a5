//! Redis behind a Leader (feature `redis`): [`ConfigApi`] over GET / SET / DEL (`revision` always 0; a non-string
//! reads as absent) on two connections, commands and RESP3 pub/sub on `__keyspace@<db>__:<key>`. A subscription is
//! acknowledged once Redis confirmed its SUBSCRIBE, with the key's value; a notification is followed by an MGET of the
//! keys notified, only changes are delivered. Each (re)connect adds `Kg$xe` to `notify-keyspace-events`, proves them on
//! with a probe key's SET and DEL (or `connect` and subscriptions fail with [`NOTIFICATIONS_OFF`]), reads every key
//! again. Health: `Down` while disconnected (retried, backoff up to 2 s; the pub/sub link is PINGed), then `Ready`.

use std::{collections::HashMap, future::ready, time::Duration};
use tandem_protocol::ErrorCode;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncCommands, AsyncConnectionConfig, IntoConnectionInfo, Msg, ProtocolVersion, PushInfo};
use tandem_leader::{CallContext, EventSender, Events, Health, Upstream};
use tandem_protocol::{RemoteError, UpstreamState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apis::{ConfigApi, ConfigRequest, ConfigResponse, ConfigValue};

/// The code of every error this adapter raises itself (an unreachable or
/// refusing Redis): match with `RemoteError::has_code(CODE)`.
pub const CODE: ErrorCode = ErrorCode::named("redis");

/// The Redis client crate this adapter wraps.
pub use redis;

/// The code of the error that says Redis refused the credentials (`WRONGPASS`,
/// `NOAUTH`): the adapter does not retry them, as no retry can help.
pub const AUTH: ErrorCode = ErrorCode::named("redis-auth");

/// The code of the error that says keyspace notifications are off and cannot be turned on.
pub const NOTIFICATIONS_OFF: ErrorCode = ErrorCode::named("redis-notifications");
const NOTIFY: &str = "Kg$xe";
const EVENTS: &str = "notify-keyspace-events";
const PROBE: &str = "tandem:probe";
const TIMEOUT: Duration = Duration::from_secs(3); // of each command; PINGs are that far apart

type Request = (String, Option<(EventSender<ConfigValue>, oneshot::Sender<Result<(), RemoteError>>)>);

/// Redis serving [`ConfigApi`]. Cheap to clone; its task ends with the last clone.
#[derive(Clone, Debug)]
pub struct RedisUpstream {
    commands: ConnectionManager,
    requests: mpsc::UnboundedSender<Request>,
    health: watch::Receiver<UpstreamState>,
}

/// The wire error of a Redis failure: a lost or refused connection is `Unavailable`; refused credentials are
/// `Rejected` with [`AUTH`].
pub fn remote_error(error: redis::RedisError) -> RemoteError {
    let why = format!("redis: {error}");
    if is_auth_refusal(&error) {
        return RemoteError::rejected(format!("{why}: Redis refused the credentials")).with_code(AUTH);
    }
    if error.is_io_error() { RemoteError::unavailable(why) } else { RemoteError::upstream(why) }.with_code(CODE)
}

fn is_auth_refusal(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// TLS and credentials for [`RedisUpstream::connect_with`], beside what the URL says. `Debug` shows neither the
/// password nor the key.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct RedisSecurity {
    /// The PEM certificate of the CA that signed the server's certificate, for `rediss://` URLs. The default is the
    /// platform's trusted roots.
    pub ca_pem: Option<Vec<u8>>,
    /// This client's PEM certificate and key, for a server started with `--tls-auth-clients yes`. The default is none.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The ACL user. The default is the URL's, or Redis's `default` user.
    pub user: Option<String>,
    /// The password, kept out of the URL (and so out of `ps` and logs). The default is the URL's, or none.
    pub password: Option<String>,
}

impl RedisSecurity {
    /// Reads the CA and, when given, the client certificate and key from PEM files; a file that cannot be read is a
    /// `BadRequest` naming it.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self, RemoteError> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                RemoteError::bad_request(format!("cannot read the Redis {what} {}: {e}", path.display()))
                    .with_code(CODE)
            })
        };
        let ca_pem = ca.map(|ca| read(ca, "CA certificate")).transpose()?;
        let identity = match identity {
            Some((cert, key)) => Some((read(cert, "client certificate")?, read(key, "client key")?)),
            None => None,
        };
        Ok(RedisSecurity { ca_pem, identity, user: None, password: None })
    }

    /// These settings, authenticating as `user` (an ACL user) with `password`.
    pub fn credentials(mut self, user: Option<String>, password: impl Into<String>) -> Self {
        self.user = user;
        self.password = Some(password.into());
        self
    }
}

impl std::fmt::Debug for RedisSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSecurity")
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| format!("{} bytes", pem.len())))
            .field("identity", &self.identity.as_ref().map(|_| "<certificate and key>"))
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl RedisUpstream {
    /// Connects to `redis://HOST:PORT[/DB]` (or `rediss://` for TLS with the platform's roots; a user and password
    /// may be in the URL), down or not; fails on a bad URL, credentials Redis refuses, or notifications Redis will
    /// not turn on.
    pub async fn connect(url: &str) -> Result<Self, RemoteError> {
        RedisUpstream::connect_with(url, RedisSecurity::default()).await
    }

    /// [`connect`](Self::connect), with TLS settings (a CA, a client certificate) and credentials kept out of the
    /// URL. TLS settings need a `rediss://` URL.
    pub async fn connect_with(url: &str, security: RedisSecurity) -> Result<Self, RemoteError> {
        let bad = |e: redis::RedisError| RemoteError::bad_request(format!("redis URL {url:?}: {e}")).with_code(CODE);
        let info = url.into_connection_info().map_err(bad)?;
        let mut settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        if let Some(user) = &security.user {
            settings = settings.set_username(user);
        }
        if let Some(password) = &security.password {
            settings = settings.set_password(password);
        }
        let info = info.set_redis_settings(settings);
        let tls = security.ca_pem.is_some() || security.identity.is_some();
        let client = if tls {
            if !url.starts_with("rediss://") {
                let why = format!("redis URL {url:?}: TLS settings are given, so the URL must be rediss://");
                return Err(RemoteError::bad_request(why).with_code(CODE));
            }
            let certificates = redis::TlsCertificates {
                client_tls: security
                    .identity
                    .map(|(client_cert, client_key)| redis::ClientTlsConfig { client_cert, client_key }),
                root_cert: security.ca_pem,
            };
            redis::Client::build_with_tls(info, certificates).map_err(bad)?
        } else {
            redis::Client::open(info).map_err(bad)?
        };
        let config = ConnectionManagerConfig::new().set_number_of_retries(1).set_response_timeout(Some(TIMEOUT));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(remote_error)?;
        let health = Health::new(format!("redis at {}", client.get_connection_info().addr()));
        let mut first = health.watch();
        let prefix = format!("__keyspace@{}__:", client.get_connection_info().redis_settings().db());
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(Follower { client, commands: commands.clone(), keys: HashMap::new(), prefix }.run(queue, health));
        match first.wait_for(|state| *state != UpstreamState::Starting).await.map(|state| state.clone()) {
            Ok(UpstreamState::Down(error)) if error.has_code(NOTIFICATIONS_OFF) || error.has_code(AUTH) => Err(error),
            _ => Ok(RedisUpstream { commands, requests, health: first }),
        }
    }
}

/// The task: the pub/sub connection, the subscribed keys and their last value delivered.
struct Follower {
    client: redis::Client,
    commands: ConnectionManager,
    keys: HashMap<String, (EventSender<ConfigValue>, Option<Option<String>>)>,
    prefix: String,
}

impl Follower {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Request>, mut health: Health) {
        while !queue.is_closed() {
            let (mut pubsub, mut pushes) = match self.resume().await {
                Ok(connection) => connection,
                Err(error) if error.has_code(AUTH) => return health.gave_up(error),
                Err(error) => {
                    health.failed(error).await;
                    continue;
                }
            };
            health.ready();
            let (mut ping, mut batch) = (tokio::time::interval(TIMEOUT), Vec::new());
            health.lost(loop {
                if let Err(lost) = tokio::select! {
                    n = pushes.recv_many(&mut batch, 1024) => {
                        let msgs = batch.drain(..).filter_map(Msg::from_push_info);
                        let keys = msgs.filter_map(|m| Some(m.get_channel_name().strip_prefix(&self.prefix)?.into()));
                        if n > 0 { self.read(keys.collect()).await } else { Err(RemoteError::unavailable("closed")) }
                    }
                    request = queue.recv() => match request {
                        Some(request) => { self.request(&mut pubsub, request).await; Ok(()) }
                        None => return,
                    },
                    _ = ping.tick() => redis::cmd("PING").exec_async(&mut pubsub).await.map_err(remote_error),
                } {
                    break lost.with_code(CODE);
                }
            });
        }
    }

    async fn resume(&mut self) -> Result<(MultiplexedConnection, mpsc::UnboundedReceiver<PushInfo>), RemoteError> {
        let (sender, mut pushes) = mpsc::unbounded_channel();
        let config = AsyncConnectionConfig::new().set_push_sender(sender).set_response_timeout(Some(TIMEOUT));
        let mut sub = self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(remote_error)?;
        let keys: Vec<String> = self.keys.keys().cloned().collect();
        let channels = keys.iter().map(String::as_str).chain([PROBE]).map(|key| format!("{}{key}", self.prefix));
        sub.subscribe(channels.collect::<Vec<_>>()).await.map_err(remote_error)?;
        let refusal = async {
            let on: HashMap<String, String> = redis::cmd("CONFIG").arg("GET").arg(EVENTS).query_async(&mut sub).await?;
            let events = format!("{}{NOTIFY}", on.get(EVENTS).map_or("", String::as_str)); // a class twice is once
            redis::cmd("CONFIG").arg("SET").arg(EVENTS).arg(events).exec_async(&mut sub).await
        };
        let refusal = refusal.await.err().map(remote_error);
        redis::pipe().pset_ex(PROBE, 1, 60_000).del(PROBE).exec_async(&mut sub).await.map_err(remote_error)?;
        // Any key's `set`, then a `del`: the classes `K`, `$` and `g` are on.
        let events = futures::stream::poll_fn(|cx| pushes.poll_recv(cx)).filter_map(|p| ready(Msg::from_push_info(p)));
        let events = events.map(|m| m.get_payload_bytes().to_vec()).skip_while(|event| ready(event != b"set"));
        if tokio::time::timeout(TIMEOUT, events.any(|event| ready(event == b"del"))).await != Ok(true) {
            let why = refusal.map_or("?".into(), |e| e.message);
            let off = format!("keyspace notifications are off, CONFIG refused ({why}): {EVENTS} must include {NOTIFY}");
            return Err(RemoteError::upstream(off).with_code(NOTIFICATIONS_OFF));
        }
        // Not left subscribed: Redis drops a connection on an ACL change that forbids one of its channels.
        sub.unsubscribe(format!("{}{PROBE}", self.prefix)).await.map_err(remote_error)?;
        self.read(keys).await.map(|()| (sub, pushes))
    }

    async fn request(&mut self, pubsub: &mut MultiplexedConnection, (key, to): Request) {
        let channel = format!("{}{key}", self.prefix);
        let Some((tx, reply)) = to else { return drop((self.keys.remove(&key), pubsub.unsubscribe(&channel).await)) };
        self.keys.insert(key.clone(), (tx, None));
        let subscribed = pubsub.subscribe(&channel).await.map_err(remote_error);
        let _ = reply.send(if subscribed.is_ok() { self.read(vec![key]).await } else { subscribed });
    }

    async fn read(&mut self, keys: Vec<String>) -> Result<(), RemoteError> {
        let values: Vec<Option<Vec<u8>>> = self.commands.mget((&keys, PROBE)).await.map_err(remote_error)?;
        for (key, value) in keys.iter().zip(values) {
            let value = value.map(|value| String::from_utf8_lossy(&value).into_owned());
            let Some((values, last)) = self.keys.get_mut(key) else { continue };
            if last.replace(value.clone()).as_ref() != Some(&value) {
                values.send(ConfigValue { value, revision: 0 });
            }
        }
        Ok(())
    }
}

impl Upstream<ConfigApi> for RedisUpstream {
    async fn invoke(&self, request: ConfigRequest, _ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let mut conn = self.commands.clone();
        let value = |v: Vec<u8>| ConfigValue { value: Some(String::from_utf8_lossy(&v).into_owned()), revision: 0 };
        match request {
            ConfigRequest::Get(key) => conn.get(key).await.map(|got: Option<_>| ConfigResponse::Value(got.map(value))),
            ConfigRequest::Put(key, value) => conn.set(key, value).await.map(|()| ConfigResponse::Revision(0)),
            ConfigRequest::Delete(key) => conn.del(key).await.map(|d: bool| ConfigResponse::Deleted(d.then_some(0))),
        }
        .map_err(remote_error)
    }

    async fn subscribe(&self, key: String) -> Result<Events<ConfigValue>, RemoteError> {
        if let UpstreamState::Down(error) = &*self.health.borrow() {
            return Err(error.clone()); // while Redis is down a subscription is refused with the reason
        }
        let ((values, events), (reply, answer)) = (Events::channel(), oneshot::channel());
        let (requests, gone) = (self.requests.clone(), key.clone());
        let events = events.on_drop(move || drop(requests.send((gone, None)))); // also if refused or given up on
        let _ = self.requests.send((key, Some((values, reply))));
        answer.await.unwrap_or_else(|_| Err(RemoteError::internal("redis: the adapter's task ended"))).map(|()| events)
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.health.clone())
    }
}
