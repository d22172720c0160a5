//! A server that restarts with less state: the hello tells the client, and a
//! watch that resumes from a revision the new server never reached gets a
//! snapshot instead of silence.

mod common;

use bytes::Bytes;
use common::{LIMIT, next, start};
use tandem_registry::{Config, RegistryClient, WatchEvent, WatchSpec};
use tandem_testkit::within;

#[tokio::test]
async fn the_hello_carries_the_incarnation_and_the_revision() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let first = RegistryClient::connect(server.local_addr()).await.unwrap();
        assert_eq!(first.server_info().revision, 1);
        for i in 0..5 {
            first.put("k", format!("v{i}")).await.unwrap();
        }
        let second = RegistryClient::connect(server.local_addr()).await.unwrap();
        assert_eq!(second.server_info().revision, 6);
        assert_eq!(second.server_info().incarnation, first.server_info().incarnation);
        assert_eq!(first.server_info().incarnation.len(), 36, "a UUID");

        let other = start(Config::default()).await;
        let third = RegistryClient::connect(other.local_addr()).await.unwrap();
        assert_ne!(third.server_info().incarnation, first.server_info().incarnation);
        assert_eq!(third.server_info().revision, 1);
    })
    .await
}

#[tokio::test]
async fn a_watch_from_beyond_the_revision_gets_a_snapshot_then_live_changes() {
    within(LIMIT, async {
        // The old server reached revision 31 for "k"; the new one only has revision 3.
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        client.put("k", "after-restart").await.unwrap(); // 2
        client.put("other", "x").await.unwrap(); // 3

        let mut watch = client.watch(WatchSpec::key("k"), Some(32)).await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap(), WatchEvent::Compacted { compact_revision: 31, revision: 3 });
        assert_eq!(
            next(&mut watch).await.unwrap(),
            WatchEvent::Put { key: "k".into(), value: Bytes::from("after-restart"), revision: 2 }
        );
        // The watch's position is the new server's, so a resume would not skip anything.
        client.put("k", "live").await.unwrap(); // 4
        assert_eq!(
            next(&mut watch).await.unwrap(),
            WatchEvent::Put { key: "k".into(), value: Bytes::from("live"), revision: 4 }
        );
        assert_eq!(watch.revision(), 4);

        // An absent key: the snapshot is empty, then live changes flow.
        let mut absent = client.watch(WatchSpec::key("gone"), Some(32)).await.unwrap();
        assert_eq!(next(&mut absent).await.unwrap(), WatchEvent::Compacted { compact_revision: 31, revision: 4 });
        client.put("gone", "back").await.unwrap(); // 5
        assert_eq!(next(&mut absent).await.unwrap().revision(), 5);

        // The next revision is still a plain resume point: no snapshot.
        let mut plain = client.watch(WatchSpec::key("k"), Some(6)).await.unwrap();
        client.put("k", "next").await.unwrap(); // 6
        assert_eq!(
            next(&mut plain).await.unwrap(),
            WatchEvent::Put { key: "k".into(), value: Bytes::from("next"), revision: 6 }
        );
    })
    .await
}
