//! Misbehaving peers, slow watchers and lost connections.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{LIMIT, SETTLE, next, start};
use futures::StreamExt;
use futures::future::join_all;
use tandem_registry::{Config, Error, ErrorKind, RegistryClient, WatchEvent, WatchSpec};
use tandem_testkit::{eventually, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `Request { id: 1, op: Watch { spec: Prefix(""), from_revision: None } }`, framed:
/// `[1, {"Watch": [{"Prefix": ""}, nil]}]`.
const RAW_WATCH_EVERYTHING: &[u8] = b"\x00\x00\x00\x14\x92\x01\x81\xa5Watch\x92\x81\xa6Prefix\xa0\xc0";

/// A small deterministic generator of garbage.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Reads until the peer closes; returns everything read (an error counts as closed).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_4_gib_length_prefix_leave_the_server_serving_others() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut watch = client.watch(WatchSpec::prefix("app/"), None).await.unwrap();
        client.put("app/before", "1").await.unwrap();

        let garbage = (0..50u64).map(|i| {
            let addr = server.local_addr();
            tokio::spawn(async move {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (i + 1));
                let mut stream = TcpStream::connect(addr).await.unwrap();
                // Every other peer frames its garbage with a plausible length, so the body is
                // read and fails to decode; the rest send raw noise.
                let len = 1 + (rng.next() % 4096) as usize;
                let body = rng.bytes(len);
                let mut bytes = Vec::new();
                if i % 2 == 0 {
                    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
                }
                bytes.extend_from_slice(&body);
                // The server may hang up mid-write: that is what it should do.
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
                read_to_close(&mut stream).await
            })
        });
        let huge = async {
            let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
            stream.write_all(&[0xFF; 4]).await.unwrap();
            read_to_close(&mut stream).await
        };
        let (garbage, huge) = tokio::join!(join_all(garbage), huge);

        // The 4 GiB prefix is refused with a BadRequest goodbye naming the limit.
        assert!(contains(&huge, b"Goodbye") && contains(&huge, b"BadRequest"), "{huge:?}");
        assert!(contains(&huge, b"frame_too_large"), "{}", String::from_utf8_lossy(&huge));
        // Framed garbage that reached the decoder got a goodbye too.
        let replies: Vec<Vec<u8>> = garbage.into_iter().map(Result::unwrap).collect();
        let told = replies.iter().step_by(2).filter(|r| contains(r, b"malformed")).count();
        assert!(told >= 20, "only {told} of 25 framed garbage peers were told their frame is malformed");

        // Every bad peer is gone; the good client kept its one connection and its watch.
        eventually(SETTLE, "every garbage connection is closed", || async { server.stats().connections == 1 }).await;
        client.put("app/after", "2").await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap().key(), "app/before");
        assert_eq!(next(&mut watch).await.unwrap().key(), "app/after");
        assert_eq!(client.get("app/after").await.unwrap().unwrap().value, Bytes::from("2"));
        let stats = client.stats().await.unwrap();
        assert_eq!((stats.connections, stats.accepted_total, stats.watches), (0, 52, 1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_is_dropped_without_blocking_anyone() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.outbound_queue_bytes = 4 * 1024 * 1024;
        let server = start(config).await;
        let mut slow = TcpStream::connect(server.local_addr()).await.unwrap();
        slow.write_all(RAW_WATCH_EVERYTHING).await.unwrap();
        let writer = RegistryClient::connect(server.local_addr()).await.unwrap();
        let reader = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut fast = reader.watch(WatchSpec::prefix(""), None).await.unwrap();
        eventually(SETTLE, "both watches are registered", || async { server.stats().watches == 2 }).await;

        // 64 KiB values: the slow peer's socket buffers fill within a few hundred puts,
        // then its 4 MiB queue. Every put must still complete promptly.
        let value = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut puts = 0u64;
        while server.stats().connections == 3 {
            assert!(puts < 5_000, "the slow watcher was never disconnected");
            let put = tokio::time::timeout(Duration::from_secs(5), writer.put("big", value.clone()));
            put.await.expect("a put was blocked by the slow watcher").unwrap();
            puts += 1;
        }
        assert_eq!(server.stats().watches, 1, "the slow watcher's watch is gone");
        // The fast watcher saw every change, in order.
        for revision in 2..2 + puts {
            assert_eq!(next(&mut fast).await.unwrap().revision(), revision);
        }
        // The slow peer finds its connection closed once it drains what was sent.
        let received = read_to_close(&mut slow).await;
        assert!(received.len() < (puts as usize) * value.len(), "the slow peer cannot have received everything");
    })
    .await
}

#[tokio::test]
async fn in_flight_calls_fail_at_once_when_the_connection_dies() {
    within(LIMIT, async {
        // A "registry" that reads requests and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            // A hello first, as every registry sends: {"Hello": ["i", 3]}.
            peer.write_all(b"\x00\x00\x00\x0b\x81\xa5Hello\x92\xa1i\x03").await.unwrap();
            peer
        });
        let client = RegistryClient::connect(addr).await.unwrap();
        assert_eq!((client.server_info().incarnation.as_str(), client.server_info().revision), ("i", 3));
        let mut peer = accept.await.unwrap();
        let calls: Vec<_> = (0..10)
            .map(|i| {
                tokio::spawn({
                    let client = client.clone();
                    async move { client.put(&format!("k{i}"), "v").await }
                })
            })
            .collect();
        // Wait until every request reached the peer (each is at least 10 bytes long).
        let mut read = 0;
        let mut buf = [0u8; 4096];
        while read < 100 {
            read += peer.read(&mut buf).await.unwrap();
        }
        drop(peer);
        for call in calls {
            let error = call.await.unwrap().unwrap_err();
            assert!(error.is_connection_lost() && error.is_retryable(), "{error:?}");
        }
        assert!(client.is_closed());
        assert!(client.get("k").await.unwrap_err().is_connection_lost(), "later calls fail immediately");
        assert!(client.closed().await.is_connection_lost());
    })
    .await
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_not_a_registry() {
    within(LIMIT, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Speaks first, but not a hello: a reply to a request nobody sent.
        let accept = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            // {"Goodbye": ["BadRequest", "", "x"]} where a hello belongs.
            peer.write_all(b"\x00\x00\x00\x18\x81\xa7Goodbye\x93\xaaBadRequest\xa0\xa1x").await.unwrap();
            peer
        });
        let error = RegistryClient::connect(addr).await.unwrap_err();
        assert!(matches!(error, Error::Connect { .. }) && error.is_retryable(), "{error:?}");
        let _peer = accept.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn shutdown_says_goodbye_and_ends_watches_with_a_retryable_error() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut watch = client.watch(WatchSpec::prefix(""), None).await.unwrap();
        client.put("k", "v").await.unwrap();
        server.shutdown().await;
        assert_eq!(next(&mut watch).await.unwrap().revision(), 2);
        let error = next(&mut watch).await.unwrap_err();
        assert!(error.is_connection_lost() && error.is_retryable());
        let Error::ConnectionLost { source: Some(source) } = &error else { panic!("{error:?}") };
        let goodbye = source.downcast_ref::<tandem_registry::RemoteError>().expect("the server's goodbye");
        assert_eq!((goodbye.kind, goodbye.code.as_str()), (ErrorKind::Unavailable, "shutdown"));
        assert!(watch.next().await.is_none(), "the stream ends after its error");
        assert!(client.put("k", "v").await.unwrap_err().is_connection_lost());
    })
    .await
}

#[tokio::test]
async fn a_watch_resumes_on_a_new_connection_without_gaps_or_duplicates() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let writer = RegistryClient::connect(server.local_addr()).await.unwrap();
        let first = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut watch = first.watch(WatchSpec::prefix("app/"), None).await.unwrap();
        let mut seen = Vec::new();
        for i in 0..5 {
            writer.put(&format!("app/{i}"), "v").await.unwrap();
            seen.push(next(&mut watch).await.unwrap().revision());
        }
        first.close();
        assert!(next(&mut watch).await.unwrap_err().is_connection_lost());
        // Changes while disconnected.
        for i in 5..10 {
            writer.put(&format!("app/{i}"), "v").await.unwrap();
        }
        let second = RegistryClient::connect(server.local_addr()).await.unwrap();
        let mut resumed = second.watch(WatchSpec::prefix("app/"), Some(watch.revision() + 1)).await.unwrap();
        writer.put("app/10", "v").await.unwrap();
        for _ in 5..11 {
            match next(&mut resumed).await.unwrap() {
                WatchEvent::Put { revision, .. } => seen.push(revision),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, (2..13).collect::<Vec<u64>>());
    })
    .await
}
