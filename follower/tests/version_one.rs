//! A version 2 follower meets a version 1 leader (PROTOCOL.md §5 and §7.1):
//! it offers version 2, is rejected with the leader's version, connects again
//! offering 1, and then works as before — calls answer — while
//! `subscribe_one`, which version 1 lacks, fails with a `Rejected` error of
//! code `version` without a frame of version 2 ever reaching the leader.

mod common;

use common::{Kv, KvRequest, TEST_TIMEOUT, follower, private_dir, within};
use futures::{SinkExt, StreamExt};
use tandem_follower::Error;
use tandem_protocol::{
    ChannelStatus, ErrorCode, ErrorKind, Frame, FrameCodec, PROTOCOL_VERSION, Reject, RemoteError, Response,
    UpstreamState, Welcome, payload, uuid::Uuid,
};
use tokio::net::UnixListener;
use tokio_util::codec::Framed;

#[tokio::test]
async fn a_version_2_follower_falls_back_to_a_version_1_leader_and_deliver_to_one_is_refused_typed() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let path = dir.path().join("leader.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let kv = follower(&path).client::<Kv>();

        // First connection: the follower offers the newest version; a version 1
        // leader refuses it, naming its own.
        let (stream, _) = listener.accept().await.unwrap();
        let mut link = Framed::new(stream, FrameCodec::new());
        let Some(Ok(Frame::Hello(hello))) = link.next().await else { panic!("no Hello") };
        assert_eq!(hello.version, PROTOCOL_VERSION);
        let error = RemoteError::rejected("unsupported protocol version 2: this leader speaks versions 1 to 1")
            .with_code(ErrorCode::VERSION);
        link.send(Frame::Reject(Reject { version: 1, error })).await.unwrap();
        drop(link);

        // Second connection: version 1, welcomed.
        let (stream, _) = listener.accept().await.unwrap();
        let mut link = Framed::new(stream, FrameCodec::new());
        let Some(Ok(Frame::Hello(hello))) = link.next().await else { panic!("no second Hello") };
        assert_eq!(hello.version, 1, "the follower offers the leader's version");
        let welcome = Welcome { version: 1, leader_id: Uuid::new_v4(), epoch: 1, pid: 1, heartbeat_ms: 60_000 };
        link.send(Frame::Welcome(welcome)).await.unwrap();
        // As a leader does after its Welcome: the state of the channel served.
        let ready = ChannelStatus { channel: "kv".into(), state: UpstreamState::Ready };
        link.send(Frame::Status(ready)).await.unwrap();

        // A call works as before.
        let call = tokio::spawn({
            let kv = kv.clone();
            async move { kv.invoke(KvRequest::Get("k".into())).await }
        });
        let id = loop {
            match link.next().await {
                Some(Ok(Frame::Invoke(invoke))) => break invoke.id,
                Some(Ok(_)) => continue,
                other => panic!("the call never came: {other:?}"),
            }
        };
        let answer = payload::encode(&Some("v".to_string())).unwrap();
        link.send(Frame::Response(Response { id, result: Ok(answer) })).await.unwrap();
        assert_eq!(call.await.unwrap().unwrap(), Some("v".to_string()));

        // Deliver-to-one is version 2: refused here, typed, before anything is sent.
        match kv.subscribe_one("jobs".into()).await {
            Err(Error::Remote(error)) => {
                assert_eq!((error.kind, &error.code), (ErrorKind::Rejected, &ErrorCode::VERSION), "{error}");
            }
            Err(other) => panic!("expected a Rejected error of code version, got {other:?}"),
            Ok(_) => panic!("subscribe_one succeeded against a version 1 leader"),
        }
        // Nothing of version 2 reached the leader: the next frame it reads is
        // the follower's next call.
        let call = tokio::spawn({
            let kv = kv.clone();
            async move { kv.invoke(KvRequest::Get("after".into())).await }
        });
        match link.next().await {
            Some(Ok(Frame::Invoke(invoke))) => {
                let answer = payload::encode(&None::<String>).unwrap();
                link.send(Frame::Response(Response { id: invoke.id, result: Ok(answer) })).await.unwrap();
            }
            other => panic!("a version 2 frame, or nothing, reached the version 1 leader: {other:?}"),
        }
        assert_eq!(call.await.unwrap().unwrap(), None);
    })
    .await
}
