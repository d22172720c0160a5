//! The slots path against a real leader (in memory) and a scripted one (a
//! Unix socket the test speaks the protocol on), each guarantee checked
//! against the queue path where both must agree.

use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::payload::encode;
use tandem_protocol::uuid::Uuid;
use tandem_protocol::{Api, Frame, FrameCodec, PROTOCOL_VERSION, RemoteError, RequestId, Response, Welcome};
use tandem_testkit::{private_dir, within};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

use super::is_slot_id;
use crate::{CallPath, Config, Connection, Error, LocalConnector, UnixConnector};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_millis(300);

struct Echo;

impl Api for Echo {
    const NAME: &'static str = "echo";
    type Key = String;
    type Event = String;
    /// (value, milliseconds to wait before answering it)
    type Request = (u64, u64);
    type Response = u64;
}

struct EchoUpstream;

impl Upstream<Echo> for EchoUpstream {
    async fn invoke(&self, (value, wait_ms): (u64, u64), _ctx: CallContext) -> Result<u64, RemoteError> {
        if wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        Ok(value)
    }

    async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
        Err(RemoteError::bad_request("no keys here"))
    }
}

fn config(calls: CallPath) -> Config {
    // peer_timeout: far beyond any test, so a silent scripted leader is not given up.
    Config { calls, peer_timeout: Duration::from_secs(120), ..Config::default() }
}

fn in_memory(calls: CallPath) -> (Leader, Connection) {
    let leader = Leader::builder().channel(EchoUpstream).start();
    let connection = Connection::builder().config(config(calls)).connect(LocalConnector::new(leader.clone())).spawn();
    (leader, connection)
}

/// A follower on a socket nobody accepts on yet, and the listener to play its leader.
fn scripted(calls: CallPath, dir: &tempfile::TempDir) -> (UnixListener, Connection) {
    let path = dir.path().join("leader.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let connection = Connection::builder().config(config(calls)).connect(UnixConnector::new(path)).spawn();
    (listener, connection)
}

/// Accepts one follower and completes its handshake.
async fn accept_one(listener: &UnixListener) -> Framed<UnixStream, FrameCodec> {
    let (stream, _) = listener.accept().await.unwrap();
    let mut link = Framed::new(stream, FrameCodec::new());
    let Some(Ok(Frame::Hello(_))) = link.next().await else { panic!("no Hello") };
    let welcome =
        Welcome { version: PROTOCOL_VERSION, leader_id: Uuid::new_v4(), epoch: 1, pid: 1, heartbeat_ms: 60_000 };
    link.send(Frame::Welcome(welcome)).await.unwrap();
    link
}

async fn next_invoke(link: &mut Framed<UnixStream, FrameCodec>) -> RequestId {
    loop {
        match link.next().await {
            Some(Ok(Frame::Invoke(invoke))) => return invoke.id,
            Some(Ok(_)) => continue,
            other => panic!("no Invoke: {other:?}"),
        }
    }
}

async fn next_cancel(link: &mut Framed<UnixStream, FrameCodec>) -> RequestId {
    loop {
        match link.next().await {
            Some(Ok(Frame::Cancel(id))) => return id,
            Some(Ok(_)) => continue,
            other => panic!("no Cancel: {other:?}"),
        }
    }
}

fn slots_of(connection: &Connection) -> &super::Slots {
    &connection.inner.slots
}

#[tokio::test]
async fn pipelined_calls_from_one_task_each_get_their_own_answer() {
    within(TEST_TIMEOUT, async {
        let (leader, connection) = in_memory(CallPath::Slots);
        let echo = connection.client::<Echo>();
        echo.ready().await.unwrap();
        // 64 calls in flight from this one task, the first ones answered last.
        let mut calls: FuturesUnordered<_> = (0..64u64)
            .map(|n| {
                let echo = &echo;
                async move { (n, echo.invoke((n, 64 - n)).await) }
            })
            .collect();
        let mut order = Vec::new();
        while let Some((n, answer)) = calls.next().await {
            assert_eq!(answer.unwrap(), n, "call {n} got another call's answer");
            order.push(n);
        }
        assert_eq!(order.len(), 64);
        assert!(order[0] > order[63], "answered in the leader's order, not the calls': {order:?}");
        assert_eq!(slots_of(&connection).live(), 0);
        assert!(slots_of(&connection).allocated() <= 64);
        connection.close().await;
        leader.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_dropped_call_frees_its_slot_and_is_cancelled_at_the_leader() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let (listener, connection) = scripted(CallPath::Slots, &dir);
        let echo = connection.client::<Echo>();
        let call = tokio::spawn({
            let echo = echo.clone();
            async move { echo.invoke((7, 0)).await }
        });
        let mut link = accept_one(&listener).await;
        let id = next_invoke(&mut link).await;
        assert!(is_slot_id(id), "a slot's id: {id:#x}");
        assert_eq!(slots_of(&connection).live(), 1);
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        assert_eq!(slots_of(&connection).live(), 0, "the dropped call's slot is free at once");
        assert_eq!(next_cancel(&mut link).await, id);

        // The slot is used again under another id; a late answer to the old one changes nothing.
        let call = tokio::spawn(async move { echo.invoke((8, 0)).await });
        let again = next_invoke(&mut link).await;
        assert_ne!(again, id);
        assert_eq!(slots_of(&connection).allocated(), 1, "the freed slot was reused");
        let old = Response { id, result: Ok(encode(&7u64).unwrap()) };
        link.send(Frame::Response(old)).await.unwrap();
        let answer = Response { id: again, result: Ok(encode(&8u64).unwrap()) };
        link.send(Frame::Response(answer)).await.unwrap();
        assert_eq!(call.await.unwrap().unwrap(), 8);
        assert_eq!(slots_of(&connection).live(), 0);
        connection.close().await;
    })
    .await
}

/// What a call to a leader that never answers ends with, on `calls`'s path:
/// its error, and whether the leader was told to cancel the very call it got.
async fn never_answered(calls: CallPath) -> (Error, bool) {
    let dir = private_dir();
    let (listener, connection) = scripted(calls, &dir);
    let echo = connection.client::<Echo>();
    let call = tokio::spawn(async move { echo.invoke_with_deadline((1, 0), DEADLINE).await });
    let mut link = accept_one(&listener).await;
    let id = next_invoke(&mut link).await;
    let error = call.await.unwrap().unwrap_err();
    let cancelled = next_cancel(&mut link).await == id;
    assert_eq!(slots_of(&connection).live(), 0);
    connection.close().await;
    (error, cancelled)
}

#[tokio::test]
async fn an_expired_call_ends_with_the_same_typed_error_on_both_paths() {
    within(TEST_TIMEOUT, async {
        for calls in [CallPath::Queue, CallPath::Slots] {
            let (error, cancelled) = never_answered(calls).await;
            assert!(matches!(error, Error::DeadlineExceeded(d) if d == DEADLINE), "{calls:?}: {error:?}");
            assert!(error.is_timeout() && error.is_retryable());
            assert!(cancelled, "{calls:?}: the expired call is cancelled at the leader");
        }
    })
    .await
}

/// The frames a scripted leader sees up to the first call, on `calls`'s path,
/// when the call's channel was never opened by a command (the client's `Open`
/// travels apart from its calls and may be handled after the link is up).
async fn frames_before_the_first_call(calls: CallPath) -> Vec<Frame> {
    let dir = private_dir();
    let (listener, connection) = scripted(calls, &dir);
    let mut link = accept_one(&listener).await;
    // Connected first, then a client built without `Connection::client`'s `Open`.
    let mut status = connection.status();
    status.wait_for(|status| status.epoch().is_some()).await.unwrap();
    let echo = crate::Client::<Echo>::new(connection.clone());
    let call = tokio::spawn(async move { echo.invoke_with_deadline((1, 0), DEADLINE).await });
    let mut frames = Vec::new();
    loop {
        let frame = link.next().await.expect("the link stays up").unwrap();
        let invoke = matches!(frame, Frame::Invoke(_));
        frames.push(frame);
        if invoke {
            break;
        }
    }
    drop(call);
    connection.close().await;
    frames
}

#[tokio::test]
async fn a_call_on_a_channel_not_yet_open_on_the_link_goes_behind_its_open_on_both_paths() {
    within(TEST_TIMEOUT, async {
        for calls in [CallPath::Queue, CallPath::Slots] {
            let frames = frames_before_the_first_call(calls).await;
            let open = frames.iter().position(|f| matches!(f, Frame::Open(names) if names == &["echo".to_string()]));
            assert_eq!(open, Some(frames.len() - 2), "{calls:?}: Open right before the Invoke: {frames:?}");
        }
    })
    .await
}

/// What three calls in flight, and one made after, end with when the leader's
/// link dies, on `calls`'s path.
async fn link_lost(calls: CallPath) -> Vec<Error> {
    let dir = private_dir();
    let (listener, connection) = scripted(calls, &dir);
    let echo = connection.client::<Echo>();
    let pending: Vec<_> = (0..3u64)
        .map(|n| {
            let echo = echo.clone();
            tokio::spawn(async move { echo.invoke((n, 0)).await })
        })
        .collect();
    let mut link = accept_one(&listener).await;
    for _ in 0..3 {
        next_invoke(&mut link).await;
    }
    drop(link);
    let mut errors = Vec::new();
    for call in pending {
        errors.push(call.await.unwrap().unwrap_err());
    }
    // No leader now (nobody accepts): a new call fails at once, as on the queue path.
    errors.push(echo.invoke((9, 0)).await.unwrap_err());
    assert_eq!(slots_of(&connection).live(), 0);
    connection.close().await;
    errors
}

#[tokio::test]
async fn a_lost_link_fails_every_pending_call_with_the_same_error_on_both_paths() {
    within(TEST_TIMEOUT, async {
        for calls in [CallPath::Queue, CallPath::Slots] {
            let errors = link_lost(calls).await;
            assert_eq!(errors.len(), 4);
            for error in errors {
                assert!(matches!(error, Error::LeaderLost), "{calls:?}: {error:?}");
            }
        }
    })
    .await
}

#[tokio::test]
async fn calls_waiting_for_a_first_leader_keep_their_deadline_past_the_queue_limit_too() {
    within(TEST_TIMEOUT, async {
        for calls in [CallPath::Queue, CallPath::Slots] {
            let dir = private_dir();
            let path = dir.path().join("leader.sock");
            // Bound, never accepted: the follower waits for its first leader.
            let _listener = UnixListener::bind(&path).unwrap();
            let mut config = config(calls);
            config.command_queue = 2;
            let connection = Connection::builder().config(config).connect(UnixConnector::new(path)).spawn();
            let echo = connection.client::<Echo>();
            let waiting: FuturesUnordered<_> = (0..5u64).map(|n| echo.invoke_with_deadline((n, 0), DEADLINE)).collect();
            let errors: Vec<_> = waiting.collect().await;
            for error in errors {
                let error = error.unwrap_err();
                assert!(matches!(error, Error::DeadlineExceeded(d) if d == DEADLINE), "{calls:?}: {error:?}");
            }
            assert_eq!(slots_of(&connection).live(), 0);
            connection.close().await;
            // Closed: new calls fail with the same error on both paths.
            let error = echo.invoke((1, 0)).await.unwrap_err();
            assert!(matches!(error, Error::Closed), "{calls:?}: {error:?}");
        }
    })
    .await
}

#[tokio::test]
async fn a_hundred_thousand_calls_leave_no_slot_behind() {
    within(TEST_TIMEOUT, many_calls(100_000)).await
}

/// Callers on two threads at once: the slab is shared under its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_two_threads_leave_no_slot_behind() {
    within(TEST_TIMEOUT, many_calls(20_000)).await
}

/// `calls` calls from 16 tasks, one in a thousand dropped after its first
/// poll; every answer is the caller's own, and every slot is free at the end.
async fn many_calls(calls: u64) {
    const TASKS: u64 = 16;
    let (leader, connection) = in_memory(CallPath::Slots);
    let echo = connection.client::<Echo>();
    echo.ready().await.unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let echo = echo.clone();
            tokio::spawn(async move {
                let (mut answered, mut dropped) = (0u64, 0u64);
                for n in (task..calls).step_by(TASKS as usize) {
                    if n % 1000 == 0 {
                        // Dropped after its first poll (queued, not yet
                        // sent), or a moment later (sent: cancelled at the leader).
                        let mut call = std::pin::pin!(echo.invoke((n, 0)));
                        assert!(futures::poll!(call.as_mut()).is_pending());
                        if n % 2000 == 0 {
                            tokio::task::yield_now().await;
                            tokio::task::yield_now().await;
                        }
                        dropped += 1;
                    } else {
                        assert_eq!(echo.invoke((n, 0)).await.unwrap(), n);
                        answered += 1;
                    }
                }
                (answered, dropped)
            })
        })
        .collect();
    let (mut answered, mut dropped) = (0, 0);
    for task in tasks {
        let (a, d) = task.await.unwrap();
        answered += a;
        dropped += d;
    }
    assert_eq!((answered, dropped), (calls - calls / 1000, calls / 1000));
    let slots = slots_of(&connection);
    assert_eq!(slots.live(), 0, "every slot is free again");
    assert!(slots.allocated() <= TASKS as usize, "{} slots for {TASKS} callers", slots.allocated());
    connection.close().await;
    leader.shutdown().await;
}

#[test]
fn a_call_dropped_before_it_is_sent_gives_its_room_back_at_once() {
    let slots = super::Slots::new(2);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let start = |cx: &mut std::task::Context<'_>| slots.start("echo", bytes::Bytes::new(), deadline, DEADLINE, cx);
    let (a, b) = (start(&mut cx).unwrap(), start(&mut cx).unwrap());
    assert!(matches!(start(&mut cx), Err(super::Refused::Full(_))), "two calls fill a batch of two");
    slots.abandon(a);
    slots.abandon(b);
    assert_eq!(slots.live(), 0);
    let c = start(&mut cx).expect("room again, with no driver pass");
    assert!(!matches!(slots.poll_answer(c, &mut cx), std::task::Poll::Ready(_)), "still waiting");
    slots.complete(c, Ok(bytes::Bytes::from_static(b"x")));
    let answer = slots.poll_answer(c, &mut cx);
    assert!(matches!(answer, std::task::Poll::Ready(Ok(ref bytes)) if bytes.as_ref() == b"x"), "{answer:?}");
    assert_eq!((slots.live(), slots.allocated()), (0, 2));
}
