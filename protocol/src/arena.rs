//! Where a connection's decoder copies events' small keys and payloads to:
//! shared chunks of [`CHUNK`] bytes, carved into one [`Bytes`] per value.
//!
//! A decoded value must not borrow the read buffer (a kept value would pin
//! the connection's whole 64 KiB buffer, and the next read would need a new
//! one). Copying each value into its own allocation costs a `malloc` per
//! value, and a second one the first time the `Bytes` is cloned (a `Bytes`
//! made from a `Vec` allocates its shared counter then). A chunk costs those
//! two once per [`CHUNK`] bytes: carving a value out of it is a copy and a
//! reference count, and so is every clone.
//!
//! The price, bounded: a value kept alive keeps its chunk alive, so a kept
//! value of `n` bytes holds at most [`CHUNK`] bytes (values over [`SMALL`]
//! bytes get their own allocation, as before). A follower keeping the last
//! value of 1,000 keys, each arrived at a different time, holds at most
//! 4 MiB that way.

use bytes::{Bytes, BytesMut};

use crate::name::{ChannelName, Names};

/// Bytes in one chunk.
pub const CHUNK: usize = 4 * 1024;

/// The largest value carved from a chunk; longer ones are copied on their own.
pub const SMALL: usize = 512;

/// A decoder's current chunk (empty until the first small value arrives),
/// and the channel names it read lately.
#[derive(Debug, Default)]
pub(crate) struct Arena {
    chunk: BytesMut,
    names: Names,
}

impl Clone for Arena {
    /// A fresh arena: two decoders never share a chunk.
    fn clone(&self) -> Self {
        Arena::default()
    }
}

impl Arena {
    /// `bytes`, copied into the current chunk (or on their own if long).
    pub(crate) fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if bytes.len() > SMALL {
            return Bytes::copy_from_slice(bytes);
        }
        if self.chunk.capacity() - self.chunk.len() < bytes.len() {
            // The old chunk lives on in the values carved from it, and is freed with the last.
            self.chunk = BytesMut::with_capacity(CHUNK);
        }
        // Within the capacity: no reallocation, so the values already carved stay where they are.
        self.chunk.extend_from_slice(bytes);
        self.chunk.split().freeze()
    }
}

/// A channel name read as `bytes`, shared with the arena's copy when it has
/// one; `None` if the bytes are not UTF-8.
pub(crate) fn name(arena: Option<&mut Arena>, bytes: &[u8]) -> Option<ChannelName> {
    match arena {
        Some(arena) => arena.names.get(bytes),
        None => std::str::from_utf8(bytes).ok().map(ChannelName::from),
    }
}

/// Copies for a decoder without an arena (one-off decodes).
pub(crate) fn copy(arena: Option<&mut Arena>, bytes: &[u8]) -> Bytes {
    match arena {
        Some(arena) => arena.copy(bytes),
        None => Bytes::copy_from_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_copied_whole_and_stay_intact_as_chunks_fill() {
        let mut arena = Arena::default();
        let values: Vec<Vec<u8>> = (0..200u32).map(|i| vec![i as u8; (i as usize * 37) % (SMALL + 100)]).collect();
        let copies: Vec<Bytes> = values.iter().map(|v| arena.copy(v)).collect();
        for (value, copy) in values.iter().zip(&copies) {
            assert_eq!(&copy[..], &value[..]);
        }
    }

    #[test]
    fn small_values_share_a_chunk_and_long_ones_do_not() {
        let mut arena = Arena::default();
        let a = arena.copy(&[1; 64]);
        let b = arena.copy(&[2; 64]);
        // Adjacent in one chunk.
        assert_eq!(a.as_ptr().wrapping_add(64), b.as_ptr());
        let long = arena.copy(&[3; SMALL + 1]);
        let c = arena.copy(&[4; 64]);
        assert_eq!(b.as_ptr().wrapping_add(64), c.as_ptr(), "a long value is not carved from the chunk");
        assert_eq!(&long[..], &[3; SMALL + 1][..]);
    }

    #[test]
    fn a_full_chunk_is_replaced_and_what_it_held_survives() {
        let mut arena = Arena::default();
        let first = arena.copy(&[9; SMALL]);
        let kept: Vec<Bytes> = (0..CHUNK / SMALL * 3).map(|i| arena.copy(&[i as u8; SMALL])).collect();
        drop(arena);
        assert_eq!(&first[..], &[9; SMALL][..]);
        for (i, value) in kept.iter().enumerate() {
            assert_eq!(&value[..], &[i as u8; SMALL][..]);
        }
    }
}
