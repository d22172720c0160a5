//! A Unix stream split in halves that ask the kernel for writability only
//! while a write is actually waiting for room.
//!
//! tokio's `UnixStream` registers every socket for readable AND writable
//! events, edge-triggered. On a Unix stream socket the kernel signals "writable"
//! each time the peer reads some of what was sent (`unix_write_space` wakes
//! every waiter, whether or not any writer ever saw a full buffer), so a
//! process that sends a request and sleeps until the answer is woken once for
//! nothing in between: the peer's read of the request. In a ping-pong that is
//! a wasted context switch per hop, and on a shared CPU the woken process runs
//! ahead of the one that is about to answer. A relay (the cluster master)
//! pays it on both of its sockets.
//!
//! These halves register the socket for readable events only. A write goes
//! straight to the socket; only when it would block does the write half
//! register a duplicate of the descriptor for writable events, wait on it,
//! and drop it as soon as a write gets through. The bytes and the errors are
//! the socket's own: this changes which wake-ups happen, nothing else.

use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a connected tokio Unix stream into halves registered for readable
/// events only (see the module's documentation). Must run inside a tokio
/// runtime with I/O enabled.
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(UnixReadHalf, UnixWriteHalf)> {
    // `into_std` leaves the socket non-blocking, as the halves need it.
    split_std(stream.into_std()?)
}

/// [`split`] for a std Unix stream (a socketpair end, an inherited
/// descriptor); sets it non-blocking.
pub fn split_std(stream: StdUnixStream) -> io::Result<(UnixReadHalf, UnixWriteHalf)> {
    stream.set_nonblocking(true)?;
    let io = Arc::new(register(stream, Interest::READABLE)?);
    Ok((UnixReadHalf { io: io.clone() }, UnixWriteHalf { io, waiting: None }))
}

/// Registers an owned descriptor with the runtime's reactor for `interest`.
fn register<T: AsRawFd>(owner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `owner` owns its descriptor (a std socket or an `OwnedFd`): it
    // stays open and the same until the `AsyncFd` that holds the owner drops
    // it, and nothing here hands out a way to close or replace it.
    unsafe { AsyncFd::register_with_interest(owner, interest) }.map_err(io::Error::from)
}

/// The reading half of [`split`].
#[derive(Debug)]
pub struct UnixReadHalf {
    io: Arc<AsyncFd<StdUnixStream>>,
}

/// The writing half of [`split`]. Dropping it does not shut the socket down;
/// [`AsyncWrite::poll_shutdown`](https://docs.rs/tokio/1/tokio/io/trait.AsyncWrite.html#tymethod.poll_shutdown) does.
#[derive(Debug)]
pub struct UnixWriteHalf {
    io: Arc<AsyncFd<StdUnixStream>>,
    /// A duplicate of the descriptor registered for writable events, while a
    /// write waits for room in the socket's buffer.
    waiting: Option<AsyncFd<OwnedFd>>,
}

impl UnixWriteHalf {
    /// Runs `write` on the socket; when it would block, waits (registered for
    /// writability only now) and tries again.
    fn poll_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&StdUnixStream) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            match write(self.io.get_ref()) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                done => {
                    // Room again: stop asking for writable events.
                    self.waiting = None;
                    return Poll::Ready(done);
                }
            }
            if self.waiting.is_none() {
                // Registering polls the socket at once, so room that appeared
                // since the write above is not missed.
                let fd = self.io.get_ref().as_fd().try_clone_to_owned()?;
                self.waiting = Some(register(fd, Interest::WRITABLE)?);
            }
            let waiting = self.waiting.as_ref().expect("registered above");
            let mut guard = ready!(waiting.poll_write_ready(cx))?;
            // The next write tells whether the room is real; if not, the
            // readiness is cleared and this waits for the next event.
            guard.clear_ready();
        }
    }
}

impl AsyncRead for UnixReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // Read into the buffer's spare room as it is, not zeroed first: a
            // connection's 64 KiB read buffer then only costs the pages that
            // bytes ever land in (zeroing it made every idle connection
            // resident at full size).
            // SAFETY: only `read(2)` writes through this pointer, and
            // `assume_init` below covers just the bytes it wrote.
            let unfilled = unsafe { buf.unfilled_mut() };
            let wanted = unfilled.len();
            let dst = unfilled.as_mut_ptr().cast::<libc::c_void>();
            let result = guard.try_io(|io| {
                // SAFETY: `dst` is valid for `wanted` bytes of writes (the
                // unfilled part of `buf`, borrowed for this call).
                let n = unsafe { libc::read(io.get_ref().as_raw_fd(), dst, wanted) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match result {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: the next read waits for
                    // the next event instead of asking the kernel first (as
                    // tokio's own streams do). Readiness that arrived meanwhile
                    // is kept: the guard clears only what it saw.
                    if n > 0 && n < wanted {
                        guard.clear_ready();
                    }
                    // SAFETY: `read(2)` wrote these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                // Would block: readiness cleared, wait for the next event.
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for UnixWriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_with(cx, |mut io| io.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_with(cx, |mut io| io.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.get_ref().shutdown(Shutdown::Write) {
            // Already gone: nothing is left to shut.
            Err(error) if error.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Halves = (UnixReadHalf, UnixWriteHalf);

    /// Both ends of a connected pair, each split.
    fn pair() -> (Halves, Halves) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (split(a).unwrap(), split(b).unwrap())
    }

    async fn within_10s(test: impl std::future::Future<Output = ()>) {
        tokio::time::timeout(std::time::Duration::from_secs(10), test).await.expect("within the timeout")
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_eof_after_shutdown() {
        within_10s(async {
            let ((mut ar, mut aw), (mut br, mut bw)) = pair();
            aw.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            br.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            bw.write_all(b"pong").await.unwrap();
            ar.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            aw.shutdown().await.unwrap();
            let mut rest = Vec::new();
            assert_eq!(br.read_to_end(&mut rest).await.unwrap(), 0, "EOF after the peer's shutdown");
        })
        .await;
    }

    /// The read buffer's spare room is read into as it is: nothing past the
    /// bytes received is written (so idle connections' buffers stay
    /// unbacked by memory; zeroing them cost 64 KiB of RSS per connection).
    #[tokio::test]
    async fn a_read_initializes_only_the_bytes_it_received() {
        within_10s(async {
            let ((_ar, mut aw), (mut br, _bw)) = pair();
            aw.write_all(b"hello").await.unwrap();
            let mut storage = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 * 1024];
            let mut buf = ReadBuf::uninit(&mut storage);
            std::future::poll_fn(|cx| Pin::new(&mut br).poll_read(cx, &mut buf)).await.unwrap();
            assert_eq!(buf.filled(), b"hello");
            assert_eq!(buf.initialized().len(), 5, "only the received bytes are initialized");
        })
        .await;
    }

    /// A writer that fills the socket's buffer waits (registered for
    /// writability only then) and finishes once the reader drains it.
    #[tokio::test]
    async fn a_full_buffer_waits_for_room_then_completes() {
        within_10s(async {
            let ((_ar, mut aw), (mut br, _bw)) = pair();
            // Far more than a Unix socket buffers (a few hundred KiB).
            let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
            let expected = data.clone();
            let writer = tokio::spawn(async move {
                aw.write_all(&data).await.unwrap();
                assert!(aw.waiting.is_none(), "writability is not watched once the write is through");
                aw.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            br.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            assert_eq!(got.len(), expected.len());
            assert!(got == expected, "every byte, in order");
        })
        .await;
    }

    #[tokio::test]
    async fn writing_to_a_closed_peer_is_an_error_not_a_hang() {
        within_10s(async {
            let ((_ar, mut aw), peer) = pair();
            drop(peer);
            let mut result = Ok(());
            // The first write may land in the buffer; a later one must fail.
            for _ in 0..64 {
                result = aw.write_all(&[0u8; 4096]).await;
                if result.is_err() {
                    break;
                }
            }
            assert!(result.is_err(), "EPIPE once the peer is gone");
        })
        .await;
    }
}
