//! Redis behind a Leader (feature `redis`): the [`ConfigApi`] channel of
//! [`crate::registry_upstream`] over GET / SET / DEL, so workers do not change.
//!
//! ```text
//! worker ──Get/Put/Delete──> Leader ── commands connection: GET / SET / DEL ──────────> Redis
//! worker <──values────────── Leader <─ pub/sub connection: __keyspace@<db>__:<key> ──── Redis
//!                                      each notification: MGET the keys, deliver what changed
//!                                      each reconnect: SUBSCRIBE all keys again, MGET them all
//! ```
//!
//! - **Two Redis connections per Leader**, however many followers: one for
//!   commands (a [`ConnectionManager`], which reconnects by itself) and one for
//!   pub/sub.
//! - **Keyspace notifications** must cover `K`, `g`, `$`, `x`, `e` (keyspace events of
//!   generic and string commands, expiry, eviction). On every (re)connect the
//!   adapter reads `notify-keyspace-events` and adds what is missing with
//!   `CONFIG SET` (a restarted Redis forgets it). A server that refuses CONFIG
//!   (a managed Redis) must have them on already: the adapter then checks that a
//!   probe key's SET and DEL (`tandem:probe:<pid>:<nanos>`, gone at once) are
//!   notified; if not, [`RedisUpstream::connect`] and every subscription fail
//!   with the code `redis-notifications`, saying what must be on.
//! - A subscription is acknowledged once Redis confirmed its SUBSCRIBE, with the
//!   key's current value (absence included); a notification is followed by a read,
//!   and only a changed value is delivered. After a reconnect every subscribed
//!   key is read again, so a change made while the connection was down is not missed.
//! - Health is `Down` while the pub/sub connection is down (reconnecting with a
//!   backoff up to 2 s), `Ready` once it is back and every key was re-read.
//!   Redis may be down when the Leader starts.
//! - Redis keeps no revisions: `revision` is always 0 (the Leader's `(epoch, seq)`
//!   orders the values). A key that is not a string reads as absent.
//!
//! ```no_run
//! use tandem::redis_upstream::RedisUpstream;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let upstream = RedisUpstream::connect("redis://127.0.0.1:6379").await?;
//! let leader = tandem::Leader::builder().channel(upstream).start();
//! # Ok(()) }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use tandem_leader::{CallContext, EventSender, Events, Health, Upstream};
use tandem_protocol::{ErrorKind, RemoteError, UpstreamState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apis::{ConfigApi, ConfigRequest, ConfigResponse, ConfigValue};

/// The Redis client crate this adapter wraps.
pub use redis;

/// The code of the error that says keyspace notifications are off and cannot be turned on.
pub const NOTIFICATIONS_OFF: &str = "redis-notifications";
/// The notification classes a subscription needs (see the module doc).
const NOTIFY: &str = "Kg$xe";
/// Each Redis round trip (connect, command, SUBSCRIBE, PING) fails after this long.
const TIMEOUT: Duration = Duration::from_secs(3);
/// The longest pause between two reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle pub/sub connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Redis serving [`ConfigApi`] over two connections. Cheap to clone; the
/// pub/sub task ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct RedisUpstream {
    commands: ConnectionManager,
    /// To the pub/sub task (unbounded: a dropped stream's unsubscribe cannot wait).
    requests: mpsc::UnboundedSender<Request>,
    health: watch::Receiver<UpstreamState>,
}

type Values = EventSender<ConfigValue>;

enum Request {
    Subscribe(String, Values, oneshot::Sender<Result<(), RemoteError>>),
    Unsubscribe(String),
}

/// The subscribed keys: where their values go, and the last value delivered (`None`: none yet).
type Keys = HashMap<String, (Values, Option<Option<String>>)>;

/// The wire error of a Redis failure: a lost or refused connection is `Unavailable`.
pub fn remote_error(error: redis::RedisError) -> RemoteError {
    let message = format!("redis: {error}");
    let unavailable = error.is_io_error() || error.is_connection_dropped();
    if unavailable { RemoteError::unavailable(message) } else { RemoteError::upstream(message) }.with_code("redis")
}

async fn within<T>(work: impl Future<Output = redis::RedisResult<T>>) -> Result<T, RemoteError> {
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(result) => result.map_err(remote_error),
        Err(_) => Err(RemoteError::unavailable(format!("redis did not answer within {TIMEOUT:?}")).with_code("redis")),
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

impl RedisUpstream {
    /// Connects to Redis at `url` (`redis://HOST:PORT[/DB]`). Redis being down
    /// is no error (the channel starts `Down` and reconnects); a bad URL is, and
    /// so is a Redis that refuses to turn keyspace notifications on.
    pub async fn connect(url: &str) -> Result<Self, RemoteError> {
        let client = redis::Client::open(url)
            .map_err(|e| RemoteError::bad_request(format!("redis URL {url:?}: {e}")).with_code("redis"))?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX)
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(remote_error)?;
        let (requests, queue) = mpsc::unbounded_channel();
        let health = Health::with_backoff(
            format!("redis at {}", client.get_connection_info().addr()),
            Duration::from_millis(50),
            BACKOFF_MAX,
        );
        let mut first = health.watch();
        tokio::spawn(follow(client, commands.clone(), queue, health));
        match first.wait_for(|state| *state != UpstreamState::Starting).await.map(|state| state.clone()) {
            Ok(UpstreamState::Down(error)) if error.has_code(NOTIFICATIONS_OFF) => Err(error),
            _ => Ok(RedisUpstream { commands, requests, health: first }),
        }
    }
}

/// Makes sure keyspace notifications are on: adds what is missing with CONFIG
/// SET or, where CONFIG is refused (a managed Redis), checks that a probe key's
/// SET and DEL are notified on `stream` (a fresh connection, subscribed to nothing else).
async fn ensure_notifications(
    commands: &mut ConnectionManager,
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    prefix: &str,
) -> Result<(), RemoteError> {
    let get = redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").to_owned();
    let refusal = match get.query_async::<HashMap<String, String>>(commands).await {
        Ok(config) => {
            let current = config.get("notify-keyspace-events").cloned().unwrap_or_default();
            let have = current.replace('A', "g$lshzxetd");
            let missing: String = NOTIFY.chars().filter(|c| !have.contains(*c)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            let set = redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(format!("{current}{missing}"))
                .to_owned();
            match set.query_async::<()>(commands).await {
                Ok(()) => {
                    tracing::info!(before = %current, added = %missing, "keyspace notifications turned on");
                    return Ok(());
                }
                Err(error) => remote_error(error),
            }
        }
        Err(error) => remote_error(error),
    };
    if refusal.kind == ErrorKind::Unavailable {
        return Err(refusal);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let key = format!("tandem:probe:{}:{nanos}", std::process::id());
    within(sink.subscribe(format!("{prefix}{key}"))).await?;
    let probe = redis::pipe().cmd("SET").arg(&key).arg(1).arg("PX").arg(60_000).cmd("DEL").arg(&key).to_owned();
    probe.query_async::<()>(commands).await.map_err(remote_error)?;
    // The events: `set` (and `expire`, for the PX), then `del`.
    let (mut set, mut del) = (false, false);
    let _ = tokio::time::timeout(TIMEOUT, async {
        while let Some(message) = stream.next().await {
            set |= message.get_payload_bytes() == b"set";
            del = message.get_payload_bytes() == b"del";
            if del {
                break;
            }
        }
    })
    .await;
    within(sink.unsubscribe(format!("{prefix}{key}"))).await?;
    if set && del {
        return Ok(());
    }
    Err(RemoteError::upstream(format!(
        "keyspace notifications are off and Redis refused to turn them on ({refusal}): \
         notify-keyspace-events must include {NOTIFY} (for example `notify-keyspace-events KA`)"
    ))
    .with_code(NOTIFICATIONS_OFF))
}

/// Reads `dirty` (those still subscribed) in one MGET; delivers the values that changed.
async fn deliver(commands: &mut ConnectionManager, keys: &mut Keys, dirty: Vec<String>) -> Result<(), RemoteError> {
    let dirty: Vec<String> = dirty.into_iter().filter(|key| keys.contains_key(key)).collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let values: Vec<Option<Vec<u8>>> =
        redis::cmd("MGET").arg(&dirty).query_async(commands).await.map_err(remote_error)?;
    for (key, value) in dirty.into_iter().zip(values) {
        let value = value.map(text);
        if let Some((values, last)) = keys.get_mut(&key)
            && last.as_ref() != Some(&value)
        {
            values.send(ConfigValue { value: value.clone(), revision: 0 });
            *last = Some(value);
        }
    }
    Ok(())
}

/// The pub/sub task: (re)connects, then serves notifications and (un)subscriptions until the connection drops.
async fn follow(
    client: redis::Client,
    mut commands: ConnectionManager,
    mut queue: mpsc::UnboundedReceiver<Request>,
    mut health: Health,
) {
    let db = client.get_connection_info().redis_settings().db();
    let prefix = format!("__keyspace@{db}__:");
    let mut keys = Keys::new();
    loop {
        let all: Vec<String> = keys.keys().cloned().collect();
        let connected = async {
            let (mut sink, mut stream) = within(client.get_async_pubsub()).await?.split();
            ensure_notifications(&mut commands, &mut sink, &mut stream, &prefix).await?;
            if !all.is_empty() {
                within(sink.subscribe(all.iter().map(|key| format!("{prefix}{key}")).collect::<Vec<_>>())).await?;
            }
            // Every subscribed key read again: a change made while the connection was down is not missed.
            deliver(&mut commands, &mut keys, all).await?;
            Ok::<_, RemoteError>((sink, stream))
        };
        let (mut sink, mut stream) = match connected.await {
            Ok(connection) => connection,
            Err(error) => {
                // Subscribes are refused with the reason while Redis cannot serve them.
                let pause = health.failed(error.clone());
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        request = queue.recv() => match request {
                            Some(Request::Subscribe(.., reply)) => drop(reply.send(Err(error.clone()))),
                            Some(Request::Unsubscribe(key)) => drop(keys.remove(&key)),
                            None => return,
                        },
                    }
                }
                continue;
            }
        };
        health.ready();
        let mut ping = tokio::time::interval(PING_EVERY);
        let lost = loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break RemoteError::unavailable("redis: the pub/sub connection closed") };
                    let mut dirty = BTreeSet::from([message.get_channel_name().to_string()]);
                    while let Some(Some(message)) = stream.next().now_or_never() {
                        dirty.insert(message.get_channel_name().to_string());
                    }
                    let dirty = dirty.iter().filter_map(|c| c.strip_prefix(&prefix)).map(str::to_string).collect();
                    if let Err(error) = deliver(&mut commands, &mut keys, dirty).await {
                        break error;
                    }
                }
                request = queue.recv() => match request {
                    Some(Request::Subscribe(key, values, reply)) => {
                        let result = subscribe(&mut sink, &mut commands, &mut keys, &prefix, key, values).await;
                        let lost = result.as_ref().err().filter(|e| e.kind == ErrorKind::Unavailable).cloned();
                        let _ = reply.send(result);
                        if let Some(error) = lost {
                            break error;
                        }
                    }
                    Some(Request::Unsubscribe(key)) => {
                        keys.remove(&key);
                        if let Err(error) = within(sink.unsubscribe(format!("{prefix}{key}"))).await {
                            break error;
                        }
                    }
                    None => return,
                },
                _ = ping.tick() => if let Err(error) = within(sink.ping::<redis::Value>()).await {
                    break error;
                },
            }
        };
        health.lost(lost.with_code("redis"));
    }
}

/// SUBSCRIBE (confirmed by Redis), then the current value; on failure the key is not kept.
async fn subscribe(
    sink: &mut PubSubSink,
    commands: &mut ConnectionManager,
    keys: &mut Keys,
    prefix: &str,
    key: String,
    values: Values,
) -> Result<(), RemoteError> {
    within(sink.subscribe(format!("{prefix}{key}"))).await?;
    keys.insert(key.clone(), (values, None));
    let result = deliver(commands, keys, vec![key.clone()]).await;
    if result.is_err() {
        keys.remove(&key);
        let _ = within(sink.unsubscribe(format!("{prefix}{key}"))).await;
    }
    result
}

impl Upstream<ConfigApi> for RedisUpstream {
    async fn invoke(&self, request: ConfigRequest, _ctx: CallContext) -> Result<ConfigResponse, RemoteError> {
        let mut commands = self.commands.clone();
        Ok(match request {
            ConfigRequest::Get(key) => {
                let value: Option<Vec<u8>> =
                    redis::cmd("GET").arg(&key).query_async(&mut commands).await.map_err(remote_error)?;
                ConfigResponse::Value(value.map(|value| ConfigValue { value: Some(text(value)), revision: 0 }))
            }
            ConfigRequest::Put(key, value) => {
                redis::cmd("SET").arg(&key).arg(value).query_async::<()>(&mut commands).await.map_err(remote_error)?;
                ConfigResponse::Revision(0)
            }
            ConfigRequest::Delete(key) => {
                let deleted: u64 =
                    redis::cmd("DEL").arg(&key).query_async(&mut commands).await.map_err(remote_error)?;
                ConfigResponse::Deleted((deleted > 0).then_some(0))
            }
        })
    }

    async fn subscribe(&self, key: String) -> Result<Events<ConfigValue>, RemoteError> {
        let (values, events) = Events::channel();
        let (reply, answer) = oneshot::channel();
        let gone = || RemoteError::internal("the Redis adapter's task has ended");
        self.requests.send(Request::Subscribe(key.clone(), values, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())??;
        let requests = self.requests.clone();
        Ok(events.on_drop(move || drop(requests.send(Request::Unsubscribe(key)))))
    }

    fn health(&self) -> Option<watch::Receiver<UpstreamState>> {
        Some(self.health.clone())
    }

}
