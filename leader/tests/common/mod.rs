//! What the Leader's wire tests share: an in-process follower link past its handshake.

use futures::{SinkExt, StreamExt};
use tandem_leader::Leader;
use tandem_protocol::{Frame, Hello, Link, PROTOCOL_VERSION, uuid::Uuid};

/// The next frame that is not a heartbeat or a status.
pub async fn next(link: &mut Link) -> Frame {
    loop {
        match link.rx.next().await.expect("link open").expect("a valid frame") {
            Frame::Ping(_) | Frame::Pong(_) | Frame::Status(_) => continue,
            frame => return frame,
        }
    }
}

/// A link to `leader` for `channel`: Hello sent, Welcome received.
pub async fn connect(leader: &Leader, channel: &str) -> Link {
    let mut link = leader.connect_local();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec![channel.into()],
        token: None,
    };
    link.tx.send(Frame::Hello(hello)).await.unwrap();
    match next(&mut link).await {
        Frame::Welcome(_) => link,
        other => panic!("expected Welcome, got {other:?}"),
    }
}
