//! The floor's wire: a u32 big-endian length, then that many bytes. No tandem
//! code, no serialization library: the least any framed protocol must do.
//!
//! A connection's first frame is one byte: [`ECHO`] (every frame is sent back)
//! or [`FANOUT`] (the server answers an empty frame once the connection is
//! registered, then streams events). An event's body is
//! `key u32 | idx u64 | sent_ns u64 | padding`.

use std::io;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const ECHO: u8 = b'E';
pub const FANOUT: u8 = b'F';
const MAX_FRAME: usize = 16 << 20;
const EVENT_HEADER: usize = 4 + 8 + 8;

/// Reads one frame's body into `body`; false on a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(read: &mut R, body: &mut Vec<u8>) -> io::Result<bool> {
    let len = match read.read_u32().await {
        Ok(len) => len as usize,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    };
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    body.resize(len, 0);
    read.read_exact(body).await?;
    Ok(true)
}

/// Whether `buffered` starts with a whole frame (so the reader will not wait for more bytes).
pub fn has_frame(buffered: &[u8]) -> bool {
    buffered.len() >= 4
        && buffered.len() >= 4 + u32::from_be_bytes([buffered[0], buffered[1], buffered[2], buffered[3]]) as usize
}

pub fn put_frame(out: &mut BytesMut, body: &[u8]) {
    out.put_u32(body.len() as u32);
    out.put_slice(body);
}

pub fn put_event(out: &mut BytesMut, key: u32, idx: u64, sent_ns: u64, pad: &[u8]) {
    out.put_u32((EVENT_HEADER + pad.len()) as u32);
    out.put_u32(key);
    out.put_u64(idx);
    out.put_u64(sent_ns);
    out.put_slice(pad);
}

/// (key, idx, sent_ns) of an event body.
pub fn parse_event(body: &[u8]) -> Option<(u32, u64, u64)> {
    let header = body.get(..EVENT_HEADER)?;
    let key = u32::from_be_bytes(header[0..4].try_into().ok()?);
    let idx = u64::from_be_bytes(header[4..12].try_into().ok()?);
    let sent_ns = u64::from_be_bytes(header[12..20].try_into().ok()?);
    Some((key, idx, sent_ns))
}
