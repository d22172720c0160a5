//! What a peer may cost the Leader before its `Hello` is accepted.
//!
//! Until then the peer is nobody: any process that can reach the socket. So:
//! - at most [`Config::max_handshakes`] connections are between `accept` and
//!   `Welcome` at once; the accept loop waits for a free slot before taking the
//!   next connection (it stays in the listen backlog meanwhile), so a flood of
//!   silent peers costs a bounded number of descriptors and buffers, each for
//!   at most [`Config::handshake_timeout`];
//! - a peer may send at most [`Config::max_hello_length`] bytes of frame body
//!   (plus its length prefix) before its `Hello` is accepted: a first frame that
//!   announces more is refused as soon as its prefix is read, and no more bytes
//!   than that are read from it.
//!
//! Together they bound the memory unauthenticated peers can make the Leader
//! hold to about `max_handshakes × (max_hello_length + 64 KiB of read buffer)`:
//! 16 MiB with the defaults.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tandem_protocol::LENGTH_PREFIX;
use tandem_protocol::internal::Throttle;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Config;

/// The most bytes read from a peer in one call before its `Hello` is accepted.
const PRE_HELLO_READ: usize = 8 * 1024;

/// The handshake slots shared by all of a Leader's listeners.
#[derive(Debug)]
pub(crate) struct Handshakes {
    slots: Arc<Semaphore>,
    max: usize,
    full: Mutex<Throttle>,
}

impl Handshakes {
    pub(crate) fn new(config: &Config) -> Self {
        let max = config.max_handshakes.clamp(1, Semaphore::MAX_PERMITS);
        Handshakes { slots: Arc::new(Semaphore::new(max)), max, full: Mutex::default() }
    }

    /// A slot for one more connection in its handshake; waits for one when all
    /// are taken (saying so at WARN, rate-limited).
    pub(crate) async fn slot(&self) -> Admission {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let suppressed = self.full.lock().unwrap_or_else(PoisonError::into_inner).hit();
                if let Some(suppressed) = suppressed {
                    tracing::warn!(
                        max_handshakes = self.max,
                        suppressed,
                        "every handshake slot is taken by a peer that has not sent its Hello yet: \
                         new connections wait in the backlog until one finishes or times out"
                    );
                }
                match self.slots.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    // The semaphore is never closed; were it, the byte limit would still hold.
                    Err(_) => return Admission { permit: None, open: Arc::new(AtomicBool::new(false)) },
                }
            }
        };
        Admission { permit: Some(permit), open: Arc::new(AtomicBool::new(false)) }
    }
}

/// One connection's handshake slot and the gate of its pre-`Hello` byte limit:
/// [`Admission::admit`] (or dropping it) frees the slot; `admit` also lifts the limit.
#[derive(Debug)]
pub(crate) struct Admission {
    permit: Option<OwnedSemaphorePermit>,
    open: Arc<AtomicBool>,
}

impl Admission {
    /// For links whose peer the transport already vouches for: no slot, no limit.
    pub(crate) fn trusted() -> Self {
        Admission { permit: None, open: Arc::new(AtomicBool::new(true)) }
    }

    /// Wraps the reading half of the connection in the pre-`Hello` limit.
    pub(crate) fn limit<R>(&self, read: R, max_hello_length: usize) -> PreHello<R> {
        PreHello {
            inner: read,
            open: self.open.clone(),
            left: max_hello_length.saturating_add(LENGTH_PREFIX),
            max_hello_length,
            prefix: [0; LENGTH_PREFIX],
            seen: 0,
            refused: None,
        }
    }

    /// The `Hello` was accepted: the peer may send full-size frames, and its
    /// handshake slot is free for the next connection.
    pub(crate) fn admit(&mut self) {
        self.open.store(true, Ordering::Release);
        self.permit = None;
    }
}

/// The reading half of a connection, limited to one small frame until the
/// [`Admission`] is admitted.
#[derive(Debug)]
pub(crate) struct PreHello<R> {
    inner: R,
    open: Arc<AtomicBool>,
    /// Bytes that may still be read before the `Hello` is accepted.
    left: usize,
    max_hello_length: usize,
    /// The first frame's length prefix, as it arrives.
    prefix: [u8; LENGTH_PREFIX],
    seen: usize,
    /// Why reading stopped before the `Hello` was accepted.
    refused: Option<String>,
}

/// Why a peer's bytes were refused before its `Hello` was accepted (inside the
/// `io::Error` its link reports).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HelloTooLong(String);

impl HelloTooLong {
    /// The refusal inside `error`, if that is what it is.
    pub(crate) fn find(error: &io::Error) -> Option<&HelloTooLong> {
        error.get_ref()?.downcast_ref()
    }
}

impl<R> PreHello<R> {
    fn refusal(&self) -> io::Error {
        let reason = self.refused.clone().unwrap_or_else(|| {
            format!("more than {} bytes before the Hello was accepted", self.max_hello_length + LENGTH_PREFIX)
        });
        io::Error::new(io::ErrorKind::InvalidData, HelloTooLong(reason))
    }

    /// Notes the first frame's prefix among `bytes`, just read.
    fn watch_prefix(&mut self, bytes: &[u8]) {
        if self.seen >= LENGTH_PREFIX {
            return;
        }
        let take = (LENGTH_PREFIX - self.seen).min(bytes.len());
        self.prefix[self.seen..self.seen + take].copy_from_slice(&bytes[..take]);
        self.seen += take;
        if self.seen == LENGTH_PREFIX {
            let len = u32::from_be_bytes(self.prefix) as usize;
            if len > self.max_hello_length {
                self.refused = Some(format!(
                    "a first frame of {len} bytes exceeds the limit of {} bytes before the Hello is accepted",
                    self.max_hello_length
                ));
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for PreHello<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.open.load(Ordering::Acquire) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.refused.is_some() || this.left == 0 {
            return Poll::Ready(Err(this.refusal()));
        }
        // Read into a small buffer of our own so that no more than `left` bytes are taken.
        let mut chunk = [0u8; PRE_HELLO_READ];
        let want = this.left.min(buf.remaining()).min(PRE_HELLO_READ);
        let mut limited = ReadBuf::new(&mut chunk[..want]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let read = limited.filled();
                this.left -= read.len();
                this.watch_prefix(read);
                buf.put_slice(read);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn before_the_hello_only_one_small_frame_is_read() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut admission = Admission { permit: None, open: Arc::new(AtomicBool::new(false)) };
        let mut read = admission.limit(rx, 100);
        // A 100-byte frame and 50 bytes of the next: 104 bytes may be read, no more.
        let mut bytes = vec![0, 0, 0, 100];
        bytes.resize(4 + 100 + 50, 7);
        tx.write_all(&bytes).await.unwrap();
        let mut got = vec![0u8; 1000];
        let mut total = 0;
        let error = loop {
            match read.read(&mut got[total..]).await {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert_eq!(total, 104);
        assert!(error.to_string().contains("more than 104 bytes"), "{error}");
        assert!(HelloTooLong::find(&error).is_some());
        // Once admitted, the rest flows.
        admission.admit();
        let n = read.read(&mut got[total..]).await.unwrap();
        assert_eq!(n, 50);
    }

    #[tokio::test]
    async fn a_first_frame_announcing_more_than_the_limit_is_refused_at_its_prefix() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let admission = Admission { permit: None, open: Arc::new(AtomicBool::new(false)) };
        let mut read = admission.limit(rx, 1000);
        tx.write_all(&16_777_216u32.to_be_bytes()).await.unwrap();
        tx.write_all(&[0; 10]).await.unwrap();
        let mut got = [0u8; 64];
        let mut total = 0;
        let error = loop {
            match read.read(&mut got[total..]).await {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert!(total < 64, "stopped early ({total} bytes read)");
        assert!(error.to_string().contains("first frame of 16777216 bytes exceeds the limit of 1000"), "{error}");
    }

    #[tokio::test]
    async fn slots_are_freed_by_admission_or_drop() {
        let config = Config { max_handshakes: 2, ..Config::default() };
        let handshakes = Handshakes::new(&config);
        let mut first = handshakes.slot().await;
        let second = handshakes.slot().await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), handshakes.slot()).await.is_err());
        first.admit();
        let third = handshakes.slot().await;
        drop(second);
        let _fourth = handshakes.slot().await;
        drop(third);
    }
}
