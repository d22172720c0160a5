//! Reaching a leader: the connector's link, then `Hello` answered by
//! `Welcome` (or `Reject`) within the handshake timeout.

use std::io;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tandem_protocol::{Frame, Hello, RemoteError, Welcome};

use crate::StartupError;
use crate::connector::{Connected, Connector};
use crate::error::StartupFailure;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("cannot reach the leader: {0}")]
    Io(io::Error),
    #[error("{0}")]
    Startup(StartupFailure),
    #[error("the leader rejected this follower: {0}")]
    Rejected(RemoteError),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("handshake failed: no Welcome within {} ms", .0.as_millis())]
    NoWelcome(Duration),
}

/// Establishes a link and performs the handshake.
pub(crate) async fn connect<C: Connector>(
    connector: &mut C,
    hello: Hello,
    timeout: Duration,
) -> Result<(Connected, Welcome), ConnectError> {
    let mut connected = connector.connect().await.map_err(|error| match StartupError::from_io(error) {
        Ok(failure) => ConnectError::Startup(failure),
        Err(error) => ConnectError::Io(error),
    })?;
    let handshake = async {
        connected.link.tx.send(Frame::Hello(hello)).await.map_err(|e| ConnectError::Handshake(e.to_string()))?;
        match connected.link.rx.next().await {
            Some(Ok(Frame::Welcome(welcome))) => Ok(welcome),
            Some(Ok(Frame::Reject(reject))) => Err(ConnectError::Rejected(reject.error)),
            Some(Ok(other)) => Err(ConnectError::Handshake(format!("expected Welcome, got {}", other.kind()))),
            Some(Err(error)) => Err(ConnectError::Handshake(error.to_string())),
            None => Err(ConnectError::Handshake("the leader closed the connection".into())),
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(welcome)) => Ok((connected, welcome)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ConnectError::NoWelcome(timeout)),
    }
}
