//! `CallContext::cancelled` on the wire: work an upstream hands off to another
//! task hears that its caller gave up (a Cancel frame, or the deadline).

mod common;

use std::time::Duration;

use futures::SinkExt;
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::payload::encode;
use tandem_protocol::{Api, Frame, Invoke, RemoteError};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(20);

struct Work;
impl Api for Work {
    const NAME: &'static str = "work";
    type Key = String;
    type Event = String;
    type Request = String;
    type Response = String;
}

/// Hands every call to a task that waits for its cancellation and reports it.
#[derive(Clone)]
struct HandOff {
    cancelled: mpsc::UnboundedSender<String>,
}

impl Upstream<Work> for HandOff {
    async fn invoke(&self, request: String, ctx: CallContext) -> Result<String, RemoteError> {
        let (token, cancelled) = (ctx.cancelled().clone(), self.cancelled.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            let _ = cancelled.send(request);
        });
        std::future::pending().await
    }
    async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
        Err(RemoteError::bad_request("no keys"))
    }
}

fn invoke(id: u64, request: &str, deadline_ms: u32) -> Frame {
    let payload = encode(&request.to_string()).unwrap();
    Frame::Invoke(Invoke { id, channel: Work::NAME.into(), deadline_ms, oneway: false, payload })
}

#[tokio::test]
async fn handed_off_work_hears_a_cancel_frame_and_a_deadline() {
    tokio::time::timeout(TIMEOUT, async {
        let (tx, mut cancelled) = mpsc::unbounded_channel();
        let leader = Leader::builder().epoch(1).channel::<Work, _>(HandOff { cancelled: tx }).start();
        let mut link = common::connect(&leader, Work::NAME).await;
        link.tx.send(invoke(1, "cancel me", 60_000)).await.unwrap();
        link.tx.send(Frame::Cancel(1)).await.unwrap();
        assert_eq!(cancelled.recv().await.as_deref(), Some("cancel me"));
        link.tx.send(invoke(2, "too slow", 50)).await.unwrap();
        assert_eq!(cancelled.recv().await.as_deref(), Some("too slow"));
        leader.shutdown().await;
    })
    .await
    .expect("timed out");
}
