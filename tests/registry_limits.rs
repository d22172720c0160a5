//! A Leader over the real registry server with a low watches-per-connection
//! limit: a subscribe the registry refuses fails at once with a typed error to
//! the follower that asked; it is never acknowledged and then dead.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures::StreamExt;
use tandem::registry::{Config, Server};
use tandem::registry_upstream::{ConfigApi, ConfigRequest, RegistryUpstream};
use tandem::{Client, Connection, ErrorKind, Leader, Subscription, UnixConnector};

const LIMIT: Duration = Duration::from_secs(30);

async fn next_value(sub: &mut Subscription<ConfigApi>) -> Option<String> {
    let update = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("no value in 10 s").unwrap();
    update.value.value.clone()
}

#[tokio::test]
async fn a_subscribe_over_the_registry_limit_fails_at_once_and_typed() {
    tokio::time::timeout(LIMIT, async {
        let mut config = Config::default();
        config.max_watches_per_connection = 3;
        let server = Server::bind("127.0.0.1:0", config).await.unwrap().spawn();
        let addr = server.local_addr().to_string();
        let upstream = RegistryUpstream::connect(addr.clone()).await.unwrap();
        let leader = Leader::builder().channel_from::<ConfigApi, _>(async move { Ok(upstream) }).start();
        let dir = tempfile::Builder::new().prefix("tandem-limit-it").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let follower = |_: u8| {
            let connection = Connection::builder().channel::<ConfigApi>().connect(UnixConnector::new(&path)).spawn();
            connection.client::<ConfigApi>()
        };
        let a: Client<ConfigApi> = follower(1);
        let b: Client<ConfigApi> = follower(2);
        a.ready().await.unwrap();
        b.ready().await.unwrap();

        let mut subs = Vec::new();
        for key in ["k1", "k2", "k3"] {
            let mut sub = a.subscribe(key.to_string()).await.unwrap();
            assert_eq!(next_value(&mut sub).await, None, "the current state comes first");
            subs.push(sub);
        }
        // The fourth key is over the registry's limit: both followers are told, at once.
        for client in [&a, &b] {
            let started = tokio::time::Instant::now();
            let Err(error) = client.subscribe("k4".to_string()).await else {
                panic!("k4 must be refused, not acknowledged")
            };
            let remote = error.remote().expect("the registry's refusal, typed");
            assert_eq!((remote.kind, remote.code.as_str()), (ErrorKind::Rejected, "too_many_watches"), "{error}");
            assert!(started.elapsed() < Duration::from_secs(2), "at once, not after a timeout");
        }
        // The accepted ones are alive.
        a.invoke(ConfigRequest::Put("k1".into(), "one".into())).await.unwrap();
        a.invoke(ConfigRequest::Put("k3".into(), "three".into())).await.unwrap();
        assert_eq!(next_value(&mut subs[0]).await.as_deref(), Some("one"));
        assert_eq!(next_value(&mut subs[2]).await.as_deref(), Some("three"));

        // A slot freed (the last subscriber of k2 left): k4 is accepted and live.
        drop(subs.remove(1));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut k4 = loop {
            match b.subscribe("k4".to_string()).await {
                Ok(sub) => break sub,
                Err(error) => {
                    assert!(tokio::time::Instant::now() < deadline, "k4 still refused: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert_eq!(next_value(&mut k4).await, None);
        a.invoke(ConfigRequest::Put("k4".into(), "four".into())).await.unwrap();
        assert_eq!(next_value(&mut k4).await.as_deref(), Some("four"));
        leader.shutdown().await;
        server.shutdown().await;
    })
    .await
    .expect("test timed out")
}
