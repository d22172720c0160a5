//! A caller that never reads its answers: the session that writes them (from
//! its own task, between reads) ends it at its bounds, and every other
//! follower is answered meanwhile.

mod common;

use std::time::Duration;

use common::next;
use futures::{SinkExt, StreamExt};
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{Api, Frame, Invoke, Link, RemoteError, Response};

const TIMEOUT: Duration = Duration::from_secs(30);

struct Echo;
impl Api for Echo {
    const NAME: &'static str = "echo";
    type Key = String;
    type Event = String;
    type Request = String;
    type Response = String;
}

/// Answers at once (so the session answers inline, from its own task).
struct Upstream_;
impl Upstream<Echo> for Upstream_ {
    async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> {
        Ok(request)
    }
    async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
        Err(RemoteError::rejected("no events here"))
    }
}

fn invoke(id: u64, body: &str) -> Frame {
    Frame::Invoke(Invoke {
        id,
        channel: Echo::NAME.into(),
        deadline_ms: 10_000,
        oneway: false,
        payload: encode(&body.to_string()).unwrap(),
    })
}

/// One call on `link`, answered with its own body.
async fn call(link: &mut Link, id: u64) {
    link.tx.send(invoke(id, &format!("call {id}"))).await.unwrap();
    match next(link).await {
        Frame::Response(Response { id: answered, result }) => {
            assert_eq!(answered, id);
            let body: String = decode(&result.expect("an answer")).unwrap();
            assert_eq!(body, format!("call {id}"));
        }
        other => panic!("expected a Response, got {other:?}"),
    }
}

async fn a_caller_that_never_reads_is_cut_off(config: tandem_leader::Config) {
    let leader = Leader::builder().epoch(1).config(config).channel::<Echo, _>(Upstream_).start();
    let mut reader = common::connect(&leader, Echo::NAME).await;
    let mut stalled = common::connect(&leader, Echo::NAME).await;
    // Calls until the leader stops taking them (its session ended), never
    // reading an answer; a reading follower's calls go on being answered.
    let mut sent = 0u64;
    while sent < 1_000_000 {
        if stalled.tx.send(invoke(sent + 1, "unread")).await.is_err() {
            break;
        }
        sent += 1;
        if sent.is_multiple_of(1_000) {
            call(&mut reader, sent).await;
        }
    }
    assert!(sent < 1_000_000, "the leader kept taking calls from a follower that reads none");
    // The stalled link ends: what was buffered, then the end.
    let mut answers = 0u64;
    while let Some(Ok(_)) = stalled.rx.next().await {
        answers += 1;
    }
    assert!(answers < sent, "the stalled follower was cut off ({answers} of {sent} answers)");
    call(&mut reader, u64::MAX).await;
    leader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_overflows_its_queue_and_holds_nobody_else() {
    let mut config = tandem_leader::Config::default();
    config.max_queued_frames = 256;
    config.write_stall_timeout = Duration::from_secs(60);
    tokio::time::timeout(TIMEOUT, a_caller_that_never_reads_is_cut_off(config)).await.expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_is_too_slow_and_holds_nobody_else() {
    let mut config = tandem_leader::Config::default();
    config.max_queued_frames = 1 << 20;
    config.write_stall_timeout = Duration::from_millis(300);
    tokio::time::timeout(TIMEOUT, a_caller_that_never_reads_is_cut_off(config)).await.expect("timed out");
}
