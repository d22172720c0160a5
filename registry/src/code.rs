//! The codes the bundled registry server writes in its errors' [`ErrorCode`]:
//! match on these (with `RemoteError::has_code`), never on string literals.
//! `docs/limits.md` ("The bundled registry") says when each is sent.

use tandem_protocol::ErrorCode;

/// A connection that sent nothing for the idle timeout (no watch, no lease).
pub const IDLE_TIMEOUT: ErrorCode = ErrorCode::named("idle_timeout");
/// A request that did not arrive whole within the frame timeout.
pub const FRAME_TIMEOUT: ErrorCode = ErrorCode::named("frame_timeout");
/// A request that does not fit the server's budget for partly received frames.
pub const FRAME_BUDGET: ErrorCode = ErrorCode::named("frame_budget");
/// A new connection that sent no complete request within the first-request timeout.
pub const FIRST_REQUEST_TIMEOUT: ErrorCode = ErrorCode::named("first_request_timeout");
/// The server is shutting down.
pub const SHUTDOWN: ErrorCode = ErrorCode::named("shutdown");
/// The server is serving its limit of connections.
pub const TOO_MANY_CONNECTIONS: ErrorCode = ErrorCode::named("too_many_connections");
/// A value over the server's `max_value_size`.
pub const VALUE_TOO_LARGE: ErrorCode = ErrorCode::named("value_too_large");
/// A service name or instance id that is empty.
pub const EMPTY_NAME: ErrorCode = ErrorCode::named("empty_name");
/// An instance (address plus metadata) over the server's `max_value_size`.
pub const INSTANCE_TOO_LARGE: ErrorCode = ErrorCode::named("instance_too_large");
/// A lease time-to-live outside the server's bounds.
pub const BAD_TTL: ErrorCode = ErrorCode::named("bad_ttl");
/// A watch id this connection does not have.
pub const UNKNOWN_WATCH: ErrorCode = ErrorCode::named("unknown_watch");
/// More watches on one connection than the server allows.
pub const TOO_MANY_WATCHES: ErrorCode = ErrorCode::named("too_many_watches");
/// A watch id already in use on this connection.
pub const DUPLICATE_WATCH: ErrorCode = ErrorCode::named("duplicate_watch");
/// An empty key or prefix.
pub const EMPTY_KEY: ErrorCode = ErrorCode::named("empty_key");
/// A key, prefix, service name or instance id over the server's `max_key_size`.
pub const KEY_TOO_LARGE: ErrorCode = ErrorCode::named("key_too_large");
/// Bytes that are not a request.
pub const MALFORMED: ErrorCode = ErrorCode::named("malformed");
/// A reply too large for one frame.
pub const REPLY_TOO_LARGE: ErrorCode = ErrorCode::named("reply_too_large");
/// A lease that does not exist (expired, revoked, or never granted).
pub const UNKNOWN_LEASE: ErrorCode = ErrorCode::named("unknown_lease");
