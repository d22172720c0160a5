//! Why one follower's session ended (or never started): logged by the session,
//! and sent to the follower in its `Goodbye` when the follower is at fault.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::internal::error_chain;
use tandem_protocol::{CodecError, RemoteError, RequestId};

/// Why a session ended. `Display` is the reason as logged (and as sent in a
/// `Goodbye`); `source()` is the underlying error, where there is one.
#[derive(Debug, Clone)]
pub(crate) enum SessionEnd {
    /// The follower closed its end.
    FollowerClosed,
    /// The follower said `Goodbye`, with its reason.
    FollowerGoodbye(String),
    /// The follower sent bytes that are not a frame.
    BadFrame(Arc<CodecError>),
    /// The follower sent a frame it may not send.
    ProtocolViolation(Violation),
    /// Nothing arrived from the follower for longer than the peer timeout.
    PeerTimeout { silent: Duration, timeout: Duration },
    /// Writing to the follower failed.
    WriteFailed(Arc<CodecError>),
    /// The follower took no bytes for this long (the write stall timeout).
    TooSlow(Duration),
    /// The follower's outbound queue went over this many frames.
    OutboxOverflow { max_frames: usize },
    /// The outbox closed without saying why (not expected: every close names its reason).
    OutboxClosed,
    /// The leader stops on purpose (shut down, or handing off to another
    /// process); the follower was told with this `Goodbye`.
    LeaderLeaving(crate::LeaderGoodbye),
    /// Another process took this leader's place (its fence said so).
    Fenced,
    /// No `Hello` arrived within the handshake timeout.
    NoHello(Duration),
    /// The connection closed before its `Hello`.
    ClosedBeforeHello,
    /// Bytes before the `Hello` were not a frame.
    BadHello(Arc<CodecError>),
    /// The `Hello` was refused; the follower was sent a `Reject` with this error.
    Rejected(RemoteError),
    /// The `Welcome` (or a channel's status) could not be written.
    WelcomeFailed(Arc<CodecError>),
    /// The follower took none of the `Welcome` within the write stall timeout.
    WelcomeStalled,
}

/// What a follower did that the protocol forbids.
#[derive(Debug, Clone)]
pub(crate) enum Violation {
    /// A frame of this kind, which only a leader sends.
    Forbidden(&'static str),
    /// A call with the id of one still in flight.
    DuplicateRequest(RequestId),
}

impl SessionEnd {
    /// The session ended as sessions do (the follower closed or said goodbye,
    /// or the leader stops on purpose): not worth a warning.
    pub(crate) fn is_normal(&self) -> bool {
        matches!(self, SessionEnd::FollowerClosed | SessionEnd::FollowerGoodbye(_) | SessionEnd::LeaderLeaving(_))
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::FollowerClosed => f.write_str("follower closed the connection"),
            SessionEnd::Fenced => f.write_str("another process took this leader's place"),
            SessionEnd::FollowerGoodbye(reason) => write!(f, "follower said goodbye: {reason}"),
            SessionEnd::BadFrame(error) => write!(f, "bad frame from follower: {error}"),
            SessionEnd::ProtocolViolation(violation) => write!(f, "protocol violation: {violation}"),
            SessionEnd::PeerTimeout { silent, timeout } => write!(
                f,
                "no frame from follower for {} ms (peer timeout {} ms)",
                silent.as_millis(),
                timeout.as_millis()
            ),
            SessionEnd::WriteFailed(error) => write!(f, "write to follower failed: {error}"),
            SessionEnd::TooSlow(stall) => {
                write!(f, "follower accepted no bytes for {} ms: too slow", stall.as_millis())
            }
            SessionEnd::OutboxOverflow { max_frames } => {
                write!(f, "outbound queue over {max_frames} frames: follower too slow")
            }
            SessionEnd::OutboxClosed => f.write_str("outbox closed"),
            SessionEnd::LeaderLeaving(goodbye) => f.write_str(goodbye.reason()),
            SessionEnd::NoHello(timeout) => write!(f, "no Hello within {} ms", timeout.as_millis()),
            SessionEnd::ClosedBeforeHello => f.write_str("connection closed before Hello"),
            SessionEnd::BadHello(error) => write!(f, "bad bytes before Hello: {}", error_chain(&**error)),
            SessionEnd::Rejected(error) => error.fmt(f),
            SessionEnd::WelcomeFailed(error) => write!(f, "could not send Welcome: {error}"),
            SessionEnd::WelcomeStalled => f.write_str("could not send Welcome: follower accepts no bytes"),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Forbidden(kind) => write!(f, "a follower may not send {kind}"),
            Violation::DuplicateRequest(id) => write!(f, "request id {id} is already in flight"),
        }
    }
}

impl std::error::Error for SessionEnd {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SessionEnd::BadFrame(error)
            | SessionEnd::WriteFailed(error)
            | SessionEnd::BadHello(error)
            | SessionEnd::WelcomeFailed(error) => Some(&**error),
            SessionEnd::Rejected(error) => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;

    use super::*;

    #[test]
    fn reasons_read_as_before() {
        let io = || Arc::new(CodecError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "gone")));
        let cases = [
            (SessionEnd::FollowerClosed, "follower closed the connection"),
            (SessionEnd::FollowerGoodbye("bye".into()), "follower said goodbye: bye"),
            (SessionEnd::BadFrame(io()), "bad frame from follower: connection I/O failed"),
            (
                SessionEnd::ProtocolViolation(Violation::Forbidden("Welcome")),
                "protocol violation: a follower may not send Welcome",
            ),
            (
                SessionEnd::ProtocolViolation(Violation::DuplicateRequest(7)),
                "protocol violation: request id 7 is already in flight",
            ),
            (
                SessionEnd::PeerTimeout { silent: Duration::from_millis(1500), timeout: Duration::from_secs(1) },
                "no frame from follower for 1500 ms (peer timeout 1000 ms)",
            ),
            (SessionEnd::WriteFailed(io()), "write to follower failed: connection I/O failed"),
            (SessionEnd::TooSlow(Duration::from_secs(5)), "follower accepted no bytes for 5000 ms: too slow"),
            (SessionEnd::OutboxOverflow { max_frames: 8 }, "outbound queue over 8 frames: follower too slow"),
            (SessionEnd::LeaderLeaving(crate::LeaderGoodbye::ShuttingDown), "leader shutting down"),
            (SessionEnd::LeaderLeaving(crate::LeaderGoodbye::HandOff), "leader handing off"),
            (SessionEnd::NoHello(Duration::from_secs(2)), "no Hello within 2000 ms"),
            (SessionEnd::BadHello(io()), "bad bytes before Hello: connection I/O failed: gone"),
            (SessionEnd::WelcomeStalled, "could not send Welcome: follower accepts no bytes"),
        ];
        for (end, text) in cases {
            assert_eq!(end.to_string(), text);
        }
    }

    #[test]
    fn the_cause_is_the_source() {
        let end = SessionEnd::WriteFailed(Arc::new(CodecError::TooLarge { len: 9, max: 8 }));
        let source = end.source().expect("a source");
        assert_eq!(source.to_string(), "frame of 9 bytes exceeds the limit of 8 bytes");
        assert!(SessionEnd::TooSlow(Duration::from_secs(1)).source().is_none());
        assert!(SessionEnd::FollowerGoodbye("x".into()).is_normal());
        assert!(SessionEnd::LeaderLeaving(crate::LeaderGoodbye::HandOff).is_normal());
        assert!(!SessionEnd::Fenced.is_normal());
        assert!(!SessionEnd::TooSlow(Duration::from_secs(1)).is_normal());
    }
}
