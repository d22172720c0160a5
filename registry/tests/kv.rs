//! The config center: keys, revisions and watches, through the public client.

mod common;

use bytes::Bytes;
use common::{LIMIT, SETTLE, next, start};
use futures::future::join_all;
use tandem_registry::{Config, RegistryClient, WatchEvent, WatchSpec};
use tandem_testkit::{eventually, within};

fn put(key: &str, value: &str, revision: u64) -> WatchEvent {
    WatchEvent::Put { key: key.into(), value: Bytes::from(value.to_owned()), revision }
}

fn delete(key: &str, revision: u64) -> WatchEvent {
    WatchEvent::Delete { key: key.into(), revision }
}

#[tokio::test]
async fn put_get_delete_track_revisions() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        assert_eq!(client.revision().await.unwrap(), 1);
        assert_eq!(client.get("a").await.unwrap(), None);

        assert_eq!(client.put("a", "1").await.unwrap(), 2);
        assert_eq!(client.put("b", Bytes::from_static(b"\x00\xff")).await.unwrap(), 3);
        assert_eq!(client.put("a", "2").await.unwrap(), 4);

        let a = client.get("a").await.unwrap().unwrap();
        assert_eq!((a.key.as_str(), &a.value[..], a.mod_revision), ("a", &b"2"[..], 4));
        let (b, revision) = client.get_with_revision("b").await.unwrap();
        assert_eq!((b.unwrap().value, revision), (Bytes::from_static(b"\x00\xff"), 4));

        assert_eq!(client.delete("a").await.unwrap(), Some(5));
        assert_eq!(client.delete("a").await.unwrap(), None, "deleting an absent key is not a mutation");
        assert_eq!(client.revision().await.unwrap(), 5);
        assert_eq!(client.get("a").await.unwrap(), None);
        assert_eq!(server.stats().keys, 1);
    })
    .await
}

#[tokio::test]
async fn many_calls_in_flight_share_one_connection() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let puts = (0..200).map(|i| {
            let client = client.clone();
            async move { client.put(&format!("k/{i}"), format!("v{i}")).await.unwrap() }
        });
        let mut revisions = join_all(puts).await;
        revisions.sort_unstable();
        assert_eq!(revisions, (2..202).collect::<Vec<u64>>());
        let gets = (0..200).map(|i| {
            let client = client.clone();
            async move { client.get(&format!("k/{i}")).await.unwrap().unwrap().value }
        });
        let values = join_all(gets).await;
        assert!(values.iter().enumerate().all(|(i, v)| v == format!("v{i}").as_bytes()));
        let stats = server.stats();
        assert_eq!((stats.accepted_total, stats.connections, stats.keys), (1, 1, 200));
    })
    .await
}

#[tokio::test]
async fn a_prefix_watch_sees_its_puts_and_deletes_in_order() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let watcher = RegistryClient::connect(server.local_addr()).await.unwrap();
        let writer = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut app = watcher.watch(WatchSpec::prefix("app/"), None).await.unwrap();
        let mut key = watcher.watch(WatchSpec::key("app/a"), None).await.unwrap();

        writer.put("app/a", "1").await.unwrap(); // 2
        writer.put("other/x", "1").await.unwrap(); // 3
        writer.put("app/b", "2").await.unwrap(); // 4
        writer.delete("app/a").await.unwrap(); // 5
        writer.delete("other/x").await.unwrap(); // 6
        writer.delete("app/zzz").await.unwrap(); // absent: no event
        writer.put("app/a", "3").await.unwrap(); // 7

        let expected = [put("app/a", "1", 2), put("app/b", "2", 4), delete("app/a", 5), put("app/a", "3", 7)];
        for want in &expected {
            assert_eq!(&next(&mut app).await.unwrap(), want);
        }
        assert_eq!(app.revision(), 7);
        for want in [&expected[0], &expected[2], &expected[3]] {
            assert_eq!(&next(&mut key).await.unwrap(), want);
        }
        // Nothing else is pending: the next event is the next change.
        writer.put("app/c", "4").await.unwrap();
        assert_eq!(next(&mut app).await.unwrap(), put("app/c", "4", 8));
    })
    .await
}

#[tokio::test]
async fn a_watch_from_a_revision_gets_what_it_missed_then_live_changes() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        for i in 0..600 {
            client.put(&format!("app/{}", i % 7), format!("{i}")).await.unwrap(); // revisions 2..=601
        }
        client.delete("app/3").await.unwrap(); // 602
        let mut watch = client.watch(WatchSpec::prefix("app/"), Some(300)).await.unwrap();
        for revision in 300..=601u64 {
            let i = revision - 2;
            assert_eq!(next(&mut watch).await.unwrap(), put(&format!("app/{}", i % 7), &i.to_string(), revision));
        }
        assert_eq!(next(&mut watch).await.unwrap(), delete("app/3", 602));
        client.put("app/live", "x").await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap(), put("app/live", "x", 603));
        assert_eq!(watch.revision(), 603);

        // From beyond the server's revision (a revision of an earlier incarnation):
        // never silence, but a snapshot of now, then every change.
        let mut later = client.watch(WatchSpec::key("app/live"), Some(700)).await.unwrap();
        let mut now = client.watch(WatchSpec::key("app/live"), None).await.unwrap();
        client.put("app/live", "y").await.unwrap(); // 604
        assert_eq!(next(&mut now).await.unwrap(), put("app/live", "y", 604));
        assert_eq!(now.revision(), 604);
        assert_eq!(next(&mut later).await.unwrap(), WatchEvent::Compacted { compact_revision: 699, revision: 603 });
        assert_eq!(next(&mut later).await.unwrap(), put("app/live", "x", 603));
        assert_eq!(next(&mut later).await.unwrap(), put("app/live", "y", 604));
        assert_eq!(later.revision(), 604);
    })
    .await
}

#[tokio::test]
async fn a_watch_older_than_the_history_gets_compacted_then_the_current_values() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.history = 4;
        let server = start(config).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        client.put("app/a", "a1").await.unwrap(); // 2
        client.put("app/b", "b1").await.unwrap(); // 3
        client.put("app/gone", "x").await.unwrap(); // 4
        client.put("other", "o").await.unwrap(); // 5
        client.put("app/a", "a2").await.unwrap(); // 6
        client.delete("app/gone").await.unwrap(); // 7
        client.put("app/c", "c1").await.unwrap(); // 8: history now holds 5..=8

        // Still in the history: a plain replay.
        let mut recent = client.watch(WatchSpec::prefix("app/"), Some(5)).await.unwrap();
        assert_eq!(next(&mut recent).await.unwrap(), put("app/a", "a2", 6));
        assert_eq!(next(&mut recent).await.unwrap(), delete("app/gone", 7));
        assert_eq!(next(&mut recent).await.unwrap(), put("app/c", "c1", 8));

        let mut old = client.watch(WatchSpec::prefix("app/"), Some(2)).await.unwrap();
        assert_eq!(next(&mut old).await.unwrap(), WatchEvent::Compacted { compact_revision: 4, revision: 8 });
        assert_eq!(next(&mut old).await.unwrap(), put("app/a", "a2", 6));
        assert_eq!(next(&mut old).await.unwrap(), put("app/b", "b1", 3));
        assert_eq!(next(&mut old).await.unwrap(), put("app/c", "c1", 8));
        client.put("app/d", "d1").await.unwrap();
        assert_eq!(next(&mut old).await.unwrap(), put("app/d", "d1", 9), "live events follow the snapshot");
        assert_eq!(old.revision(), 9);
    })
    .await
}

#[tokio::test]
async fn a_dropped_watch_is_cancelled_on_the_server() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let first = client.watch(WatchSpec::prefix(""), None).await.unwrap();
        let mut second = client.watch(WatchSpec::prefix(""), None).await.unwrap();
        assert_eq!(client.stats().await.unwrap().watches, 2);
        drop(first);
        eventually(SETTLE, "the dropped watch is gone", || async { client.stats().await.unwrap().watches == 1 }).await;
        client.put("k", "v").await.unwrap();
        assert_eq!(next(&mut second).await.unwrap(), put("k", "v", 2));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catching_up_watch_sees_every_change_exactly_once_while_writes_continue() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let writer = RegistryClient::connect(server.local_addr()).await.unwrap();
        for i in 0..2000 {
            writer.put(&format!("k/{}", i % 10), "old").await.unwrap(); // revisions 2..=2001
        }
        let more = tokio::spawn(async move {
            for i in 0..1000 {
                writer.put(&format!("k/{}", i % 10), "new").await.unwrap(); // 2002..=3001
            }
        });
        let watcher = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut watch = watcher.watch(WatchSpec::prefix("k/"), Some(2)).await.unwrap();
        for revision in 2..=3001u64 {
            assert_eq!(next(&mut watch).await.unwrap().revision(), revision);
        }
        more.await.unwrap();
        assert_eq!(watch.revision(), 3001);
    })
    .await
}
