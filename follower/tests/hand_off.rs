//! A leader that steps down hands off: its followers log it at INFO with the
//! old and the new epoch and re-elect at once; a leader that dies (or whose
//! process just ends) is still a fault, logged at WARN as `lost the leader`.
//!
//! Each connection is spawned inside a span of its own name, so the captured
//! log lines say whose they are.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Fixture, Kv, KvRequest, MemUpstream, TEST_TIMEOUT, follower, private_dir, standalone, within};
use futures::StreamExt;
use tandem_follower::{Connection, Error, LocalConnector};

/// Every log line of this test binary, as `tracing_subscriber::fmt` wrote it.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .init();
        logs
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured lines logged inside the span `who`.
fn lines_of(who: &str) -> Vec<String> {
    let logs = logs().lock().unwrap();
    let tag = format!("conn{{who=\"{who}\"}}");
    String::from_utf8_lossy(&logs).lines().filter(|l| l.contains(&tag)).map(str::to_owned).collect()
}

/// Waits until `who` logged a line at `level` containing every one of `parts`; returns it.
async fn logged(who: &str, level: &str, parts: &[&str]) -> String {
    let find = || lines_of(who).into_iter().find(|l| l.contains(level) && parts.iter().all(|p| l.contains(p)));
    let what = format!("{who} logging {level} {parts:?}");
    tandem_testkit::eventually(Duration::from_secs(10), &what, || async { find().is_some() }).await;
    find().expect("found above")
}

/// Makes a connection inside a span named `who`: its driver's lines carry the name.
fn named(who: &'static str, connect: impl FnOnce() -> Connection) -> Connection {
    logs();
    let span = tracing::info_span!("conn", who);
    let _entered = span.enter();
    // The span's name is the same for all; its field says whose: `conn{who="ho_b"}`.
    connect()
}

fn no_lost_leader(who: &str) {
    let lost: Vec<String> = lines_of(who).into_iter().filter(|l| l.contains("WARN")).collect();
    assert!(lost.is_empty(), "{who} logged a fault for a planned hand-off: {lost:#?}");
}

async fn leads_at(connection: &Connection, epoch: u64) {
    let mut status = connection.status();
    status.wait_for(|s| s.is_leader() && s.epoch() == Some(epoch)).await.expect("status");
}

async fn follows_at(connection: &Connection, epoch: u64) {
    let mut status = connection.status();
    status.wait_for(|s| !s.is_leader() && s.epoch() == Some(epoch)).await.expect("status");
}

#[tokio::test]
async fn a_leader_that_steps_down_hands_off_at_info_and_the_next_leads_at_the_next_epoch() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let run = dir.path().join("run");
        let upstream = MemUpstream::default();
        upstream.put("k", "v1");
        let a = named("ho_a", || standalone("app", &run, &upstream));
        a.client::<Kv>().ready().await.unwrap();
        let b = named("ho_b", || standalone("app", &run, &upstream));
        b.client::<Kv>().ready().await.unwrap();
        leads_at(&a, 1).await;
        follows_at(&b, 1).await;
        let mut values = b.client::<Kv>().subscribe("k".into()).await.unwrap();
        let first = values.next().await.unwrap();
        assert_eq!((first.value.as_str(), first.epoch), ("v1", 1));

        a.step_down().await.unwrap();
        leads_at(&b, 2).await;
        follows_at(&a, 2).await;
        upstream.put("k", "v2");
        let next = values.next().await.unwrap();
        assert_eq!((next.value.as_str(), next.epoch), ("v2", 2));
        assert!((next.epoch, next.seq) > (first.epoch, first.seq));
        assert_eq!(b.client::<Kv>().invoke(KvRequest::Get("k".into())).await.unwrap().as_deref(), Some("v2"));

        // Both ends said it at INFO, with the old and the new epoch; neither logged a fault.
        logged("ho_b", "INFO", &["the leader handed off", "epoch=1"]).await;
        logged("ho_b", "INFO", &["following the new leader after the hand-off", "epoch.previous=1", "epoch=2"]).await;
        logged("ho_a", "INFO", &["stepping down", "epoch=1"]).await;
        logged("ho_a", "INFO", &["following the new leader after the hand-off", "epoch=2"]).await;
        no_lost_leader("ho_a");
        no_lost_leader("ho_b");

        // A follower has nothing to step down from.
        assert!(matches!(a.step_down().await, Err(Error::NotLeader)));
        a.close().await;
        b.close().await;
    })
    .await
}

#[tokio::test]
async fn closing_the_leading_process_hands_off_too() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let run = dir.path().join("run");
        let upstream = MemUpstream::default();
        let a = named("close_a", || standalone("app", &run, &upstream));
        a.client::<Kv>().ready().await.unwrap();
        let b = named("close_b", || standalone("app", &run, &upstream));
        b.client::<Kv>().ready().await.unwrap();
        leads_at(&a, 1).await;

        a.close().await;
        leads_at(&b, 2).await;
        logged("close_b", "INFO", &["the leader handed off", "epoch=1"]).await;
        logged("close_b", "INFO", &["following the new leader after the hand-off", "epoch.previous=1", "epoch=2"])
            .await;
        no_lost_leader("close_b");
        b.close().await;
    })
    .await
}

#[tokio::test]
async fn a_leader_shut_down_is_logged_at_info_with_its_reason() {
    within(TEST_TIMEOUT, async {
        let fixture = Fixture::start(3);
        let f = named("sd_f", || follower(&fixture.path));
        f.client::<Kv>().ready().await.unwrap();
        fixture.leader.shutdown().await;
        logged("sd_f", "INFO", &["the leader stopped", "reason=leader shutting down", "epoch=3"]).await;
        no_lost_leader("sd_f");
        f.close().await;
    })
    .await
}

/// The leader's runtime ends under it, as when its process returns from
/// `main` without stepping down: no Goodbye, the socket just closes.
#[tokio::test]
async fn a_leader_that_just_ends_is_still_a_lost_leader_at_warn() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let (path_tx, path_rx) = tokio::sync::oneshot::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let run = dir.path().to_path_buf();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let leader = runtime.block_on(async {
                let (leader, path) = common::leader(&MemUpstream::default(), &run, 5);
                path_tx.send(path).unwrap();
                leader
            });
            // Serve until told to end, then drop the runtime: every task (and socket) with it.
            runtime.block_on(async {
                let ended = tokio::task::spawn_blocking(move || end_rx.recv());
                let _ = ended.await;
            });
            drop(runtime);
            drop(leader);
        });
        let path = path_rx.await.unwrap();
        let f = named("fault_f", || follower(&path));
        f.client::<Kv>().ready().await.unwrap();
        end_tx.send(()).unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
        logged("fault_f", "WARN", &["lost the leader", "the leader closed the connection"]).await;
        let said: Vec<String> = lines_of("fault_f").into_iter().filter(|l| l.contains("handed off")).collect();
        assert!(said.is_empty(), "a dead leader is no hand-off: {said:#?}");
        f.close().await;
    })
    .await
}

#[tokio::test]
async fn a_fixed_role_cannot_step_down() {
    within(TEST_TIMEOUT, async {
        let fixture = Fixture::start(1);
        let own = common::builder().connect(LocalConnector::new(fixture.leader.clone())).spawn();
        own.client::<Kv>().ready().await.unwrap();
        assert!(own.is_leader());
        assert!(matches!(own.step_down().await, Err(Error::NotLeader)));
        let remote = follower(&fixture.path);
        remote.client::<Kv>().ready().await.unwrap();
        assert!(matches!(remote.step_down().await, Err(Error::NotLeader)));
        // Still served: nothing was stopped.
        assert_eq!(own.client::<Kv>().invoke(KvRequest::Get("x".into())).await.unwrap(), None);
        own.close().await;
        remote.close().await;
        assert!(matches!(own.step_down().await, Err(Error::Closed)));
    })
    .await
}

#[tokio::test]
async fn a_lone_leader_that_steps_down_leads_again_at_the_next_epoch() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let upstream = MemUpstream::default();
        let a = named("lone_a", || standalone("app", &dir.path().join("run"), &upstream));
        a.client::<Kv>().ready().await.unwrap();
        leads_at(&a, 1).await;
        let stepped_at = tokio::time::Instant::now();
        a.step_down().await.unwrap();
        // Nobody else took the lock within the hand-off wait (500 ms): it leads again.
        leads_at(&a, 2).await;
        let waited = stepped_at.elapsed();
        assert!(waited >= Duration::from_millis(500), "it left the lock to the others first: {waited:?}");
        assert_eq!(a.client::<Kv>().invoke(KvRequest::Get("k".into())).await.unwrap(), None);
        logged("lone_a", "INFO", &["following the new leader after the hand-off", "epoch.previous=1", "epoch=2"]).await;
        no_lost_leader("lone_a");
        a.close().await;
    })
    .await
}
