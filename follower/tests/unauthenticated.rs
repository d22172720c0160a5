//! What peers that never complete a handshake can cost the leader: a bounded
//! number of handshake slots and a small first frame, while its followers are
//! served all along.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{Kv, KvRequest, MemUpstream, TEST_TIMEOUT, follower, private_dir, within};
use futures::future::join_all;
use tandem_leader::Leader;
use tandem_protocol::{Frame, FrameCodec, Hello, PROTOCOL_VERSION, uuid::Uuid};
use tandem_testkit::{Lines, ProcessGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder};

fn hello() -> BytesMut {
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec!["kv".into()],
        token: None,
    });
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(hello, &mut buf).unwrap();
    buf
}

fn serve(upstream: &MemUpstream, dir: &Path, config: tandem_leader::Config) -> (Leader, PathBuf) {
    let up = upstream.clone();
    let leader = Leader::builder().config(config).channel_from::<Kv, _>(async move { Ok(up) }).start();
    let path = leader.bind_unix(dir.join("leader.sock")).expect("bind");
    (leader, path)
}

/// Reads until the leader closes the connection; returns everything it sent.
async fn read_to_close(stream: &mut UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// The first frame the leader sent.
fn first_frame(bytes: &[u8]) -> Frame {
    FrameCodec::new().decode(&mut BytesMut::from(bytes)).expect("a frame").expect("a whole frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_first_frame_is_refused_at_its_length_prefix() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let (leader, path) = serve(&upstream, dir.path(), tandem_leader::Config::default());
        let bystander = follower(&path).client::<Kv>();
        bystander.invoke(KvRequest::Put("k".into(), "v".into())).await.unwrap();

        // 60 peers each announce a 16 MiB frame (the most a follower may send once
        // admitted) and try to send it all before any Hello.
        let peers = (0..60).map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                let mut peer = UnixStream::connect(&path).await.unwrap();
                let (mut rx, mut tx) = peer.split();
                let send = async {
                    tx.write_all(&(16u32 << 20).to_be_bytes()).await?;
                    let chunk = vec![0u8; 1 << 20];
                    let mut sent = 4;
                    for _ in 0..16 {
                        tx.write_all(&chunk).await?;
                        sent += chunk.len();
                    }
                    Ok::<usize, std::io::Error>(sent)
                };
                let mut told = Vec::new();
                let (sent, _) = tokio::join!(send, async {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n @ 1..) = rx.read(&mut buf).await {
                        told.extend_from_slice(&buf[..n]);
                    }
                });
                (sent.is_err(), told)
            })
        });
        for peer in join_all(peers).await {
            let (cut_off, told) = peer.unwrap();
            assert!(cut_off, "the leader stopped reading the 16 MiB frame");
            let Frame::Reject(reject) = first_frame(&told) else { panic!("expected a Reject") };
            assert_eq!(reject.error.code, "frame_too_large");
            assert!(reject.error.message.contains("first frame of 16777216 bytes"), "{}", reject.error);
        }
        // The follower was served all along.
        assert_eq!(bystander.invoke(KvRequest::Get("k".into())).await.unwrap(), Some("v".into()));
        assert_eq!(leader.stats().followers, 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_the_hello_limit_is_read_before_the_hello() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let mut config = tandem_leader::Config::default();
        config.max_hello_length = 1000;
        let (_leader, path) = serve(&upstream, dir.path(), config);

        // A first frame within the limit that is not a Hello is refused as such...
        let mut peer = UnixStream::connect(&path).await.unwrap();
        let mut frame = vec![0, 0, 0x03, 0xE8];
        frame.resize(4 + 1000, 0xc1);
        peer.write_all(&frame).await.unwrap();
        let told = read_to_close(&mut peer).await;
        assert!(told.is_empty() || matches!(first_frame(&told), Frame::Reject(_)));

        // ...one over it, even by a byte, is refused at its prefix.
        let mut peer = UnixStream::connect(&path).await.unwrap();
        peer.write_all(&[0, 0, 0x03, 0xE9]).await.unwrap();
        let Frame::Reject(reject) = first_frame(&read_to_close(&mut peer).await) else { panic!("expected a Reject") };
        assert_eq!(reject.error.code, "frame_too_large");
        assert!(reject.error.message.contains("limit of 1000 bytes"), "{}", reject.error);

        // A real follower, whose Hello is far smaller, is served.
        let kv = follower(&path).client::<Kv>();
        kv.invoke(KvRequest::Put("k".into(), "x".repeat(100_000))).await.unwrap();
        assert_eq!(kv.invoke(KvRequest::Get("k".into())).await.unwrap().map(|v| v.len()), Some(100_000));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_hold_at_most_the_handshake_slots_and_only_until_their_timeout() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let mut config = tandem_leader::Config::default();
        config.max_handshakes = 4;
        config.handshake_timeout = Duration::from_millis(800);
        let (leader, path) = serve(&upstream, dir.path(), config);

        // Slots are freed on admission: one follower after another, all served at once.
        let followers: Vec<_> = (0..6).map(|_| follower(&path).client::<Kv>()).collect();
        for kv in &followers {
            kv.invoke(KvRequest::Get("k".into())).await.unwrap();
        }
        assert_eq!(leader.stats().followers, 6);

        // Four silent peers take every slot: a Hello behind them waits in the backlog
        // until they time out, then is answered.
        let silent_since = Instant::now();
        let mut silent = join_all((0..4).map(|_| UnixStream::connect(&path))).await;
        // The admitted followers are served meanwhile.
        for kv in &followers {
            kv.invoke(KvRequest::Get("k".into())).await.unwrap();
        }
        let mut late = UnixStream::connect(&path).await.unwrap();
        late.write_all(&hello()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = late.read(&mut buf).await.unwrap();
        assert!(matches!(first_frame(&buf[..n]), Frame::Welcome(_)));
        let waited = silent_since.elapsed();
        assert!(waited >= Duration::from_millis(800), "answered after {waited:?}, before the silent peers timed out");
        for peer in &mut silent {
            assert!(read_to_close(peer.as_mut().unwrap()).await.is_empty(), "closed without a word");
        }
    })
    .await
}

/// Where [`child_leader`] serves, when it runs as the child of
/// [`out_of_descriptors_the_leader_backs_off_and_keeps_serving`].
const CHILD_DIR: &str = "TANDEM_TEST_CHILD_LEADER_DIR";

/// The leader process of the test below, run by it in a child process whose
/// open-file limit is lowered (this test process keeps its own). On its own it
/// does nothing.
#[tokio::test]
#[ignore = "run as a child process by out_of_descriptors_the_leader_backs_off_and_keeps_serving"]
async fn child_leader() {
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    tracing_subscriber::fmt()
        .with_env_filter("info,tandem_leader=debug")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let upstream = MemUpstream::default();
    let mut config = tandem_leader::Config::default();
    config.handshake_timeout = Duration::from_millis(500);
    let (_leader, _path) = serve(&upstream, Path::new(&dir), config);
    // Until the parent kills it.
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_leader_backs_off_and_keeps_serving() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["child_leader", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(CHILD_DIR, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec the closure only calls `setrlimit`, which is
        // async-signal-safe, and touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: 48, rlim_max: 48 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Killed (by PID) and reaped on drop.
        let mut child = ProcessGuard::new(command.spawn().unwrap());
        let mut log = Lines::new("the child leader's log");
        log.read_blocking(child.child().stderr.take().unwrap());
        const LINE: Duration = Duration::from_secs(10);
        log.expect_line(LINE, |l| l.contains("leader listening")).await;
        let path = dir.path().join("leader.sock");
        let kv = follower(&path).client::<Kv>();
        kv.invoke(KvRequest::Put("k".into(), "before".into())).await.unwrap();

        // More silent peers than the leader has descriptors left: accept fails with EMFILE.
        let mut silent = Vec::new();
        for _ in 0..60 {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        log.expect_line(LINE, |l| l.contains("Too many open files")).await;
        // The admitted follower is served while accept fails.
        kv.invoke(KvRequest::Put("k".into(), "during".into())).await.unwrap();
        // Each silent peer is accepted in turn and closed at its handshake timeout.
        for peer in &mut silent {
            assert!(read_to_close(peer).await.is_empty());
        }
        log.expect_line(LINE, |l| l.contains("accepting connections again")).await;
        // A new follower gets in.
        let late = follower(&path).client::<Kv>();
        assert_eq!(late.invoke(KvRequest::Get("k".into())).await.unwrap(), Some("during".into()));
        assert!(log.drain().iter().all(|line| !line.contains("accept failed")), "rate-limited to one line per 10 s");
    })
    .await
}
