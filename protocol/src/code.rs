//! The codes tandem itself writes in [`RemoteError::code`](crate::RemoteError::code),
//! as constants: set and compare them through these (with
//! [`RemoteError::has_code`](crate::RemoteError::has_code)), never as string
//! literals. An upstream's own codes (`"E_DENIED"`, `"503"`, ...) pass through
//! unchanged beside them. PROTOCOL.md lists the ones on the wire.

/// A typed error code: one of the constants below, written on the wire as its
/// string. An upstream's own codes stay plain strings beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(&'static str);

impl ErrorCode {
    /// The peers speak no common protocol version (`Reject`).
    pub const VERSION: ErrorCode = ErrorCode("version");
    /// A missing or wrong token (`Reject`).
    pub const TOKEN: ErrorCode = ErrorCode("token");
    /// A channel this leader does not serve, or that was not opened.
    pub const CHANNEL: ErrorCode = ErrorCode("channel");
    /// A frame not allowed at this point of the conversation.
    pub const PROTOCOL: ErrorCode = ErrorCode("protocol");
    /// A frame over the receiver's length limit.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode("frame_too_large");
    /// A request, answer or event too large to send in one frame.
    pub const TOO_LARGE: ErrorCode = ErrorCode("too_large");
    /// A value that could not be encoded as MessagePack.
    pub const ENCODE: ErrorCode = ErrorCode("encode");
    /// Bytes that do not decode as the channel's type.
    pub const DECODE: ErrorCode = ErrorCode("decode");

    /// The code as written on the wire.
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        self.0
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl From<ErrorCode> for String {
    fn from(code: ErrorCode) -> String {
        code.0.to_owned()
    }
}

impl PartialEq<ErrorCode> for String {
    fn eq(&self, code: &ErrorCode) -> bool {
        self == code.0
    }
}

impl PartialEq<ErrorCode> for str {
    fn eq(&self, code: &ErrorCode) -> bool {
        self == code.0
    }
}
