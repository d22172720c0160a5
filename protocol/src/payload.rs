//! Opaque payloads: the MessagePack bytes of a user's key, request, response or event.
//!
//! The leader routes payloads without knowing their types; only the two ends
//! that share an API definition encode and decode them, with these helpers.

use crate::ErrorCode;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::RemoteError;

/// Encodes a value as a payload.
///
/// Keys are compared byte-for-byte, so a key type must serialize deterministically
/// (structs, enums, strings and numbers do; a `HashMap` does not).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, RemoteError> {
    // Into a buffer that freezes without a copy or a shrinking reallocation
    // (a `Vec` turned into `Bytes` is reallocated to its length).
    let mut buf = BytesMut::with_capacity(128).writer();
    rmp_serde::encode::write(&mut buf, value)
        .map_err(|e| RemoteError::bad_request(format!("cannot encode payload: {e}")).with_code(ErrorCode::ENCODE))?;
    Ok(buf.into_inner().freeze())
}

/// Decodes a payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RemoteError> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| RemoteError::bad_request(format!("cannot decode payload: {e}")).with_code(ErrorCode::DECODE))
}
