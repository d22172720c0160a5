//! Opaque payloads: the MessagePack bytes of a user's key, request, response or event.
//!
//! The leader routes payloads without knowing their types; only the two ends
//! that share an API definition encode and decode them, with these helpers.

use std::io;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ErrorCode, RemoteError};

/// Encodes a value as a payload.
///
/// Keys are compared byte-for-byte, so a key type must serialize deterministically
/// (structs, enums, strings and numbers do; a `HashMap` does not).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, RemoteError> {
    let mut out = Spill { head: [0; STACK], len: 0, rest: None };
    rmp_serde::encode::write(&mut out, value)
        .map_err(|e| RemoteError::bad_request(format!("cannot encode payload: {e}")).with_code(ErrorCode::ENCODE))?;
    Ok(out.into_bytes())
}

/// Payloads up to this many bytes are written on the stack, then copied out
/// at their exact length: one allocation, and a second (`Bytes`' shared
/// counter) only if the payload is ever cloned. A buffer with room to spare
/// costs both at once, as `Bytes` adds the counter to it when frozen.
const STACK: usize = 256;

/// A writer that keeps the first [`STACK`] bytes on the stack and moves to
/// the heap once they do not fit.
struct Spill {
    head: [u8; STACK],
    len: usize,
    rest: Option<BytesMut>,
}

impl Spill {
    fn into_bytes(self) -> Bytes {
        match self.rest {
            Some(rest) => rest.freeze(),
            None => Bytes::copy_from_slice(&self.head[..self.len]),
        }
    }
}

impl io::Write for Spill {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Some(rest) = &mut self.rest {
            rest.extend_from_slice(buf);
            return Ok(());
        }
        let end = self.len + buf.len();
        if end <= STACK {
            self.head[self.len..end].copy_from_slice(buf);
            self.len = end;
        } else {
            // What is known so far; later writes grow it as a `Vec` grows.
            let mut rest = BytesMut::with_capacity(end.max(2 * STACK));
            rest.extend_from_slice(&self.head[..self.len]);
            rest.extend_from_slice(buf);
            self.rest = Some(rest);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes a payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RemoteError> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| RemoteError::bad_request(format!("cannot decode payload: {e}")).with_code(ErrorCode::DECODE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_of_every_length_are_what_rmp_serde_writes() {
        // On the stack, at its edge, and spilled to the heap part way through a value.
        for len in [0, 1, 100, STACK - 3, STACK - 2, STACK - 1, STACK, STACK + 1, 3 * STACK, 100_000] {
            let value = (len as u64, "x".repeat(len), counting(len));
            let bytes = encode(&value).unwrap();
            assert_eq!(&bytes[..], &rmp_serde::to_vec(&value).unwrap()[..], "length {len}");
            assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), value);
        }
    }

    fn counting(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    #[test]
    fn a_value_serde_cannot_write_is_an_encode_error() {
        struct Refuses;
        impl Serialize for Refuses {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let error = encode(&Refuses).unwrap_err();
        assert_eq!(error.code, ErrorCode::ENCODE.as_str(), "{error}");
        assert!(error.to_string().contains("no"), "{error}");
    }
}
