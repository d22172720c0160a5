//! The start of a session: the follower's `Hello` checked, then `Welcome` and
//! each channel's status sent, or a `Reject`.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tandem_protocol::internal::check_hello;
use tandem_protocol::{
    ChannelStatus, CodecError, ErrorCode, Frame, Hello, Link, PROTOCOL_VERSION, Reject, RemoteError, UpstreamState,
    Welcome,
};
use tokio::sync::watch;

use crate::admission::HelloTooLong;
use crate::channel::Channel;
use crate::peer::PeerInfo;
use crate::session_end::SessionEnd;
use crate::shared::Shared;

/// The channels a follower named, each with a watch of its upstream state
/// positioned at the state the follower was told.
type ChannelStates = Vec<(Arc<Channel>, watch::Receiver<UpstreamState>)>;

/// Reads and checks the `Hello`; answers `Welcome` and each channel's status, or `Reject`.
pub(super) async fn handshake(
    shared: &Shared,
    link: &mut Link,
    peer: &PeerInfo,
) -> Result<(Hello, ChannelStates), SessionEnd> {
    let config = &shared.config;
    let first = match tokio::time::timeout(config.handshake_timeout, link.rx.next()).await {
        Err(_) => return Err(SessionEnd::NoHello(config.handshake_timeout)),
        Ok(None) => return Err(SessionEnd::ClosedBeforeHello),
        Ok(Some(Err(CodecError::Io(error)))) if HelloTooLong::find(&error).is_some() => {
            let error = RemoteError::bad_request(error.to_string()).with_code(ErrorCode::FRAME_TOO_LARGE);
            return Err(reject(link, config.write_stall_timeout, Reject { version: PROTOCOL_VERSION, error }).await);
        }
        Ok(Some(Err(error))) => return Err(SessionEnd::BadHello(Arc::new(error))),
        Ok(Some(Ok(frame))) => frame,
    };
    let hello = match first {
        Frame::Hello(hello) => hello,
        other => {
            let error =
                RemoteError::rejected(format!("expected Hello, got {}", other.kind())).with_code(ErrorCode::PROTOCOL);
            return Err(reject(link, config.write_stall_timeout, Reject { version: PROTOCOL_VERSION, error }).await);
        }
    };
    let token = if peer.trusted { None } else { shared.token.as_deref() };
    let checked = check_hello(&hello, token).and_then(|version| {
        match hello.channels.iter().find(|name| !shared.channels.contains_key(*name)) {
            Some(unknown) => Err(Reject {
                version: PROTOCOL_VERSION,
                error: RemoteError::rejected(format!("this leader does not serve channel {unknown:?}"))
                    .with_code(ErrorCode::CHANNEL),
            }),
            None => Ok(version),
        }
    });
    let version = match checked {
        Ok(version) => version,
        Err(rejection) => return Err(reject(link, config.write_stall_timeout, rejection).await),
    };
    let welcome = Frame::Welcome(Welcome {
        version,
        leader_id: shared.id,
        epoch: shared.epoch,
        pid: std::process::id(),
        heartbeat_ms: u32::try_from(config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
    });
    // Watch each state BEFORE reading it: a change after this point is seen by
    // `forward_status`, so the follower never misses a transition to Ready.
    let mut states: ChannelStates = Vec::new();
    let mut statuses = Vec::new();
    for name in &hello.channels {
        if let Some(channel) = shared.channels.get(name) {
            let mut state = channel.state.subscribe();
            let current = state.borrow_and_update().clone();
            statuses.push(Frame::Status(ChannelStatus { channel: name.clone().into(), state: current }));
            states.push((channel.clone(), state));
        }
    }
    let send = async {
        link.tx.feed(welcome).await?;
        for status in statuses {
            link.tx.feed(status).await?;
        }
        SinkExt::<Frame>::flush(&mut link.tx).await
    };
    match tokio::time::timeout(config.write_stall_timeout, send).await {
        Ok(Ok(())) => Ok((hello, states)),
        Ok(Err(error)) => Err(SessionEnd::WelcomeFailed(Arc::new(error))),
        Err(_) => Err(SessionEnd::WelcomeStalled),
    }
}

/// Sends a `Reject` (best effort) and returns the reason to log.
async fn reject(link: &mut Link, stall: Duration, rejection: Reject) -> SessionEnd {
    let reason = SessionEnd::Rejected(rejection.error.clone());
    let _ = tokio::time::timeout(stall, link.tx.send(Frame::Reject(rejection))).await;
    reason
}
