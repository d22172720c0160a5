//! Reaching a leader: the connector's link, then `Hello` answered by
//! `Welcome` (or `Reject`) within the handshake timeout.

use std::io;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tandem_protocol::{ErrorCode, Frame, Hello, MIN_PROTOCOL_VERSION, RemoteError, Welcome};

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

/// Establishes a link and performs the handshake. A leader that rejects the
/// offered version naming an older one this build speaks (a version 1 leader)
/// is asked again, on a new link, offering that version.
pub(crate) async fn connect<C: Connector>(
    connector: &mut C,
    mut hello: Hello,
    timeout: Duration,
) -> Result<(Connected, Welcome), ConnectError> {
    loop {
        match attempt(connector, hello.clone(), timeout).await {
            Err(Retry::Older(version)) => {
                tracing::debug!(
                    offered = hello.version,
                    version,
                    "the leader speaks an older protocol version; offering it"
                );
                hello.version = version;
            }
            Err(Retry::No(error)) => return Err(error),
            Ok(connected) => return Ok(connected),
        }
    }
}

enum Retry {
    /// Offer this (older, supported) version instead.
    Older(u16),
    No(ConnectError),
}

async fn attempt<C: Connector>(
    connector: &mut C,
    hello: Hello,
    timeout: Duration,
) -> Result<(Connected, Welcome), Retry> {
    let offered = hello.version;
    let mut connected = connector.connect().await.map_err(|error| {
        Retry::No(match StartupError::from_io(error) {
            Ok(failure) => ConnectError::Startup(failure),
            Err(error) => ConnectError::Io(error),
        })
    })?;
    // Err(Ok(error)): failed; Err(Err(version)): offer `version` instead.
    let handshake = async {
        connected.link.tx.send(Frame::Hello(hello)).await.map_err(|e| Ok(ConnectError::Handshake(e.to_string())))?;
        match connected.link.rx.next().await {
            Some(Ok(Frame::Welcome(welcome))) => Ok(welcome),
            Some(Ok(Frame::Reject(reject)))
                if reject.error.code == ErrorCode::VERSION
                    && (MIN_PROTOCOL_VERSION..offered).contains(&reject.version) =>
            {
                Err(Err(reject.version))
            }
            Some(Ok(Frame::Reject(reject))) => Err(Ok(ConnectError::Rejected(reject.error))),
            Some(Ok(other)) => Err(Ok(ConnectError::Handshake(format!("expected Welcome, got {}", other.kind())))),
            Some(Err(error)) => Err(Ok(ConnectError::Handshake(error.to_string()))),
            None => Err(Ok(ConnectError::Handshake("the leader closed the connection".into()))),
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(welcome)) => Ok((connected, welcome)),
        Ok(Err(Ok(error))) => Err(Retry::No(error)),
        Ok(Err(Err(version))) => Err(Retry::Older(version)),
        Err(_) => Err(Retry::No(ConnectError::NoWelcome(timeout))),
    }
}
