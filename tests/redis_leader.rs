//! A Leader over Redis in this process, followers over its Unix socket, a real
//! redis-server: calls map to GET/SET/DEL, a subscription is live once
//! acknowledged, refusals are typed errors, Redis may be down at start, and
//! the Leader holds two Redis connections however many followers subscribe.
#![cfg(feature = "redis")]

mod redis_support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use redis_support::{Redis, eventually, free_port, within};
use tandem::protocol::UpstreamState;
use tandem::redis_upstream::RedisUpstream;
use tandem::registry_upstream::{ConfigApi, ConfigRequest, ConfigResponse, ConfigValue};
use tandem::{Client, Connection, Error, ErrorKind, Leader, Subscription, UnixConnector, Upstream};

const LIMIT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);

struct Host {
    _leader: Leader,
    upstream: RedisUpstream,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

async fn host(url: &str) -> Host {
    let upstream = RedisUpstream::connect(url).await.unwrap();
    let leader = Leader::builder()
        .channel_from::<ConfigApi, _>({
            let upstream = upstream.clone();
            async move { Ok(upstream) }
        })
        .start();
    let dir = tempfile::Builder::new().prefix("tandem-redis-it").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
    Host { _leader: leader, upstream, path, _dir: dir }
}

async fn follower(host: &Host) -> Client<ConfigApi> {
    let connection = Connection::builder().channel::<ConfigApi>().connect(UnixConnector::new(&host.path)).spawn();
    let client = connection.client::<ConfigApi>();
    client.ready().await.unwrap();
    client
}

async fn next_value(sub: &mut Subscription<ConfigApi>) -> Option<String> {
    let update = tokio::time::timeout(WAIT, sub.next()).await.expect("no value in 10 s").expect("stream ended");
    update.value.value
}

fn health(upstream: &RedisUpstream) -> tokio::sync::watch::Receiver<UpstreamState> {
    Upstream::<ConfigApi>::health(upstream).expect("the Redis adapter reports its health")
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn get_put_delete_are_get_set_del() {
    within(LIMIT, async {
        let redis = Redis::start().await;
        let host = host(&redis.url()).await;
        let client = follower(&host).await;
        let put = client.invoke(ConfigRequest::Put("a".into(), "1".into())).await.unwrap();
        assert_eq!(put, ConfigResponse::Revision(0));
        assert_eq!(redis.cli(&["get", "a"]), "1");
        redis.cli(&["set", "b", "from-cli"]);
        let got = client.invoke(ConfigRequest::Get("b".into())).await.unwrap();
        assert_eq!(got, ConfigResponse::Value(Some(ConfigValue { value: Some("from-cli".into()), revision: 0 })));
        assert_eq!(client.invoke(ConfigRequest::Get("none".into())).await.unwrap(), ConfigResponse::Value(None));
        assert_eq!(client.invoke(ConfigRequest::Delete("a".into())).await.unwrap(), ConfigResponse::Deleted(Some(0)));
        assert_eq!(client.invoke(ConfigRequest::Delete("a".into())).await.unwrap(), ConfigResponse::Deleted(None));
        assert_eq!(redis.cli(&["exists", "a"]), "0");
        // A Redis error (a hash where a string is expected) comes back typed.
        redis.cli(&["hset", "h", "f", "v"]);
        match client.invoke(ConfigRequest::Get("h".into())).await {
            Err(Error::Remote(error)) => {
                assert_eq!((error.kind, error.code.as_str()), (ErrorKind::Upstream, "redis"), "{error}");
                assert!(error.message.contains("WRONGTYPE"), "{error}");
            }
            other => panic!("expected a typed Redis error, got {other:?}"),
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn an_acknowledged_subscription_sees_the_very_next_set_and_many_followers_cost_two_connections() {
    within(LIMIT, async {
        let redis = Redis::start().await;
        let host = host(&redis.url()).await;
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(follower(&host).await);
        }
        // Each key: subscribe, then SET at once from redis-cli. Were the
        // subscription acknowledged before Redis confirmed its SUBSCRIBE, the
        // notification could be missed and the value would never come.
        for i in 0..20 {
            let key = format!("k{i}");
            let mut sub = clients[i % clients.len()].subscribe(key.clone()).await.unwrap();
            assert_eq!(next_value(&mut sub).await, None, "{key}: a new subscriber gets the current state");
            redis.cli(&["set", &key, "set-right-after"]);
            assert_eq!(next_value(&mut sub).await.as_deref(), Some("set-right-after"), "{key}");
        }
        // Every follower on one key: one SET reaches all; SET to the same value is not delivered again.
        let mut subs = Vec::new();
        for client in &clients {
            let mut sub = client.subscribe("shared".to_string()).await.unwrap();
            assert_eq!(next_value(&mut sub).await, None);
            subs.push(sub);
        }
        redis.cli(&["set", "shared", "x"]);
        for sub in &mut subs {
            assert_eq!(next_value(sub).await.as_deref(), Some("x"));
        }
        redis.cli(&["set", "shared", "x"]);
        redis.cli(&["set", "shared", "y"]);
        for sub in &mut subs {
            assert_eq!(next_value(sub).await.as_deref(), Some("y"), "the unchanged x is not delivered twice");
        }
        assert_eq!(redis.clients(), 2, "{}", redis.cli(&["client", "list"]));
        assert_eq!(redis.cli(&["pubsub", "numsub", "__keyspace@0__:shared"]), "__keyspace@0__:shared\n1");
        // The last subscriber gone, the Leader unsubscribes from Redis.
        drop(subs);
        eventually(WAIT, "the keyspace channel to be unsubscribed", || async {
            redis.cli(&["pubsub", "numsub", "__keyspace@0__:shared"]) == "__keyspace@0__:shared\n0"
        })
        .await;
    })
    .await
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn redis_down_at_start_the_leader_starts_down_and_serves_once_redis_is_up() {
    within(LIMIT, async {
        let port = free_port();
        let host = host(&format!("redis://127.0.0.1:{port}")).await;
        let mut health = health(&host.upstream);
        match &*health.borrow_and_update() {
            UpstreamState::Down(error) => assert_eq!(error.kind, ErrorKind::Unavailable, "{error}"),
            other => panic!("expected Down with nothing on port {port}, got {other:?}"),
        }
        let mut redis = Redis::not_started(port);
        redis.restart().await;
        redis.cli(&["set", "k", "v"]);
        tokio::time::timeout(WAIT, health.wait_for(|state| *state == UpstreamState::Ready)).await.unwrap().unwrap();
        let client = follower(&host).await;
        let mut sub = client.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut sub).await.as_deref(), Some("v"));
        redis.cli(&["set", "k", "w"]);
        assert_eq!(next_value(&mut sub).await.as_deref(), Some("w"));
        assert_eq!(redis.clients(), 2, "{}", redis.cli(&["client", "list"]));
    })
    .await
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn a_redis_that_refuses_config_must_have_notifications_on() {
    within(LIMIT, async {
        // Like a managed Redis: CONFIG is not available.
        let locked = Redis::with_args(&["--rename-command", "CONFIG", ""]).await;
        let error = RedisUpstream::connect(&locked.url()).await.expect_err("notifications are off and cannot be set");
        assert_eq!((error.kind, error.code.as_str()), (ErrorKind::Upstream, "redis-notifications"), "{error}");
        assert!(error.message.contains("notify-keyspace-events must include Kg$xe"), "{error}");

        // The same lock with notifications on in the server's configuration: it works.
        let on = Redis::with_args(&["--rename-command", "CONFIG", "", "--notify-keyspace-events", "KA"]).await;
        let host = host(&on.url()).await;
        assert_eq!(on.cli(&["dbsize"]), "0", "the probe key is gone");
        let client = follower(&host).await;
        let mut sub = client.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut sub).await, None);
        on.cli(&["set", "k", "v"]);
        assert_eq!(next_value(&mut sub).await.as_deref(), Some("v"));
    })
    .await
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn a_subscribe_redis_refuses_is_a_typed_error_and_is_not_kept() {
    within(LIMIT, async {
        let redis = Redis::start().await;
        let host = host(&redis.url()).await;
        let client = follower(&host).await;
        // An ACL that allows no channel: Redis answers SUBSCRIBE with NOPERM.
        assert_eq!(redis.cli(&["acl", "setuser", "default", "resetchannels"]), "OK");
        match client.subscribe("k".to_string()).await {
            Err(Error::Remote(error)) => {
                assert_eq!((error.kind, error.code.as_str()), (ErrorKind::Upstream, "redis"), "{error}");
                assert!(error.message.contains("no permissions"), "{error}");
            }
            other => panic!("expected a typed refusal, got {:?}", other.map(|_| "a subscription")),
        }
        assert_eq!(health(&host.upstream).borrow().clone(), UpstreamState::Ready, "a refusal is not an outage");
        // Allowed again, the same key subscribes and follows changes.
        assert_eq!(redis.cli(&["acl", "setuser", "default", "allchannels"]), "OK");
        let mut sub = client.subscribe("k".to_string()).await.unwrap();
        assert_eq!(next_value(&mut sub).await, None);
        redis.cli(&["set", "k", "v"]);
        assert_eq!(next_value(&mut sub).await.as_deref(), Some("v"));
    })
    .await
}
