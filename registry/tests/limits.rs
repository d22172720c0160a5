//! Stats and limits.

mod common;

use std::time::Duration;

use common::{LIMIT, SETTLE, next, start};
use futures::future::join_all;
use tandem_registry::{Config, ErrorKind, Instance, RegistryClient, Stats, WatchSpec};
use tandem_testkit::{eventually, within};

fn refusal(error: tandem_registry::Error) -> (ErrorKind, String) {
    let remote = error.remote().expect("a refusal from the registry").clone();
    assert!(!remote.message.is_empty());
    (remote.kind, remote.code.into())
}

#[tokio::test]
async fn stats_count_other_connections_watches_keys_and_instances() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let asker = RegistryClient::connect(server.local_addr()).await.unwrap();
        let expected = Stats { connections: 0, accepted_total: 1, watches: 0, keys: 0, instances: 0 };
        assert_eq!(asker.stats().await.unwrap(), expected);

        let others = join_all((0..3).map(|_| RegistryClient::connect(server.local_addr()))).await;
        let others: Vec<RegistryClient> = others.into_iter().map(Result::unwrap).collect();
        let w1 = others[0].watch(WatchSpec::prefix("a/"), None).await.unwrap();
        let w2 = others[0].watch(WatchSpec::key("b"), None).await.unwrap();
        let w3 = others[1].watch_service("billing").await.unwrap();
        others[1].put("a/1", "x").await.unwrap();
        others[1].put("a/2", "x").await.unwrap();
        others[1].put("a/2", "y").await.unwrap();
        let registration =
            others[2].register(Instance::new("billing", "b1", "a:1"), Duration::from_secs(30)).await.unwrap();
        let expected = Stats { connections: 3, accepted_total: 4, watches: 3, keys: 2, instances: 1 };
        assert_eq!(asker.stats().await.unwrap(), expected);
        assert_eq!(server.stats(), Stats { connections: 4, ..expected }, "in-process stats count every connection");

        drop((w1, w2));
        others[0].close();
        drop(registration);
        eventually(SETTLE, "the dropped watches and instance are gone", || async {
            let stats = asker.stats().await.unwrap();
            (stats.connections, stats.watches, stats.instances) == (2, 1, 0)
        })
        .await;
        drop(w3);
        drop(others);
        eventually(SETTLE, "every other connection is closed", || async {
            asker.stats().await.unwrap()
                == Stats { connections: 0, accepted_total: 4, watches: 0, keys: 2, instances: 0 }
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn oversized_keys_and_values_are_refused_and_the_connection_keeps_working() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let long_key = "k".repeat(4 * 1024 + 1);
        let big_value = vec![0u8; 1024 * 1024 + 1];

        let e = client.put(&long_key, "v").await.unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(refusal(e), (ErrorKind::BadRequest, "key_too_large".into()));
        assert_eq!(refusal(client.get(&long_key).await.unwrap_err()).1, "key_too_large");
        assert_eq!(refusal(client.put("k", big_value).await.unwrap_err()).1, "value_too_large");
        assert_eq!(refusal(client.put("", "v").await.unwrap_err()).1, "empty_key");
        assert_eq!(refusal(client.watch(WatchSpec::prefix(long_key), None).await.unwrap_err()).1, "key_too_large");

        // The limits themselves are accepted, on the same connection.
        let key = "k".repeat(4 * 1024);
        assert_eq!(client.put(&key, vec![7u8; 1024 * 1024]).await.unwrap(), 2);
        assert_eq!(client.get(&key).await.unwrap().unwrap().value.len(), 1024 * 1024);
        let stats = client.stats().await.unwrap();
        assert_eq!((stats.accepted_total, stats.keys, stats.watches), (1, 1, 0));
    })
    .await
}

#[tokio::test]
async fn a_request_over_the_frame_limit_fails_alone() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        // Over the client's 16 MiB frame limit: refused before anything is sent.
        let e = client.put("k", vec![0u8; 17 * 1024 * 1024]).await.unwrap_err();
        assert!(matches!(e, tandem_registry::Error::RequestTooLarge(_)), "{e:?}");
        assert_eq!(client.put("k", "v").await.unwrap(), 2);
    })
    .await
}

#[tokio::test]
async fn too_many_watches_on_one_connection_are_refused() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.max_watches_per_connection = 3;
        let server = start(config).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut watches = Vec::new();
        for i in 0..2 {
            watches.push(client.watch(WatchSpec::key(format!("k{i}")), None).await.unwrap());
        }
        let service = client.watch_service("billing").await.unwrap();
        let refused = client.watch(WatchSpec::key("k9"), None).await.unwrap_err();
        assert_eq!(refusal(refused), (ErrorKind::Rejected, "too_many_watches".into()));
        assert_eq!(refusal(client.watch_service("other").await.unwrap_err()).1, "too_many_watches");

        // Another connection has its own budget, and the full one still works.
        let other = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut other_watch = other.watch(WatchSpec::key("k0"), None).await.unwrap();
        client.put("k0", "v").await.unwrap();
        assert_eq!(next(&mut watches[0]).await.unwrap().revision(), 2);
        assert_eq!(next(&mut other_watch).await.unwrap().revision(), 2);

        // Dropping a watch frees its slot.
        drop(service);
        eventually(SETTLE, "a slot is free", || async { client.stats().await.unwrap().watches == 3 }).await;
        let _again = client.watch(WatchSpec::key("k9"), None).await.unwrap();
    })
    .await
}
