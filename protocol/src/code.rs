//! The machine-readable code of a [`RemoteError`](crate::RemoteError): a typed
//! [`ErrorCode`]. tandem's own codes are the constants below; other crates name
//! theirs as constants too ([`ErrorCode::named`], in a `const`), and an
//! upstream's own codes (`"E_DENIED"`, `"503"`, ...) pass through unchanged
//! ([`ErrorCode::upstream`]). Codes are never string literals at the place an
//! error is raised. PROTOCOL.md lists the ones on the wire.

use std::borrow::Cow;

/// A typed error code, written on the wire as its string (possibly empty).
///
/// Two codes are equal when their strings are, whichever way they were made.
///
/// ```
/// use tandem_protocol::{ErrorCode, RemoteError};
///
/// /// A code of your own adapter, named once.
/// const DENIED: ErrorCode = ErrorCode::named("E_DENIED");
///
/// let error = RemoteError::rejected("no access").with_code(DENIED);
/// assert!(error.has_code(DENIED));
/// assert_eq!(error.code, "E_DENIED");
/// // An upstream's code known only at run time:
/// let passed = RemoteError::upstream("HTTP 503").with_code(ErrorCode::upstream(format!("{}", 503)));
/// assert_eq!(passed.code.as_str(), "503");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ErrorCode(Cow<'static, str>);

impl ErrorCode {
    /// No code (the empty string).
    pub const NONE: ErrorCode = ErrorCode(Cow::Borrowed(""));
    /// The peers speak no common protocol version (`Reject`).
    pub const VERSION: ErrorCode = ErrorCode(Cow::Borrowed("version"));
    /// A missing or wrong token (`Reject`).
    pub const TOKEN: ErrorCode = ErrorCode(Cow::Borrowed("token"));
    /// A channel this leader does not serve, or that was not opened.
    pub const CHANNEL: ErrorCode = ErrorCode(Cow::Borrowed("channel"));
    /// A frame not allowed at this point of the conversation.
    pub const PROTOCOL: ErrorCode = ErrorCode(Cow::Borrowed("protocol"));
    /// A frame over the receiver's length limit.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(Cow::Borrowed("frame_too_large"));
    /// A request, answer or event too large to send in one frame.
    pub const TOO_LARGE: ErrorCode = ErrorCode(Cow::Borrowed("too_large"));
    /// A value that could not be encoded as MessagePack.
    pub const ENCODE: ErrorCode = ErrorCode(Cow::Borrowed("encode"));
    /// Bytes that do not decode as the channel's type.
    pub const DECODE: ErrorCode = ErrorCode(Cow::Borrowed("decode"));
    /// A second `Mirror` on a connection that mirrors already (version 3).
    pub const MIRROR: ErrorCode = ErrorCode(Cow::Borrowed("mirror"));

    /// A code named by a constant of another crate (an adapter, the bundled
    /// registry): `const DENIED: ErrorCode = ErrorCode::named("E_DENIED");`.
    pub const fn named(code: &'static str) -> ErrorCode {
        ErrorCode(Cow::Borrowed(code))
    }

    /// An upstream's own code, known only at run time (an HTTP status, a
    /// server's error name), passed through unchanged.
    pub fn upstream(code: impl Into<String>) -> ErrorCode {
        ErrorCode(Cow::Owned(code.into()))
    }

    /// The code as written on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether there is no code.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ErrorCode> for String {
    fn from(code: ErrorCode) -> String {
        code.0.into_owned()
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for ErrorCode {
    fn eq(&self, other: &String) -> bool {
        self.0 == other.as_str()
    }
}

impl PartialEq<ErrorCode> for String {
    fn eq(&self, code: &ErrorCode) -> bool {
        self.as_str() == code.0
    }
}

impl PartialEq<ErrorCode> for str {
    fn eq(&self, code: &ErrorCode) -> bool {
        self == code.0
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(ErrorCode::upstream)
    }
}
