//! Reading a connection's requests within the server's limits.
//!
//! The reader takes frames apart itself (the length prefix first) so that it
//! can, before a body is buffered:
//! - refuse a length over [`Config::max_frame`](crate::Config::max_frame);
//! - count a body longer than [`SMALL_FRAME`] against the budget shared by all
//!   connections ([`Config::partial_frame_budget`](crate::Config::partial_frame_budget)),
//!   in full, and allocate it once; the count is returned when the frame is
//!   decoded or the connection ends;
//! - time the frame: once its first byte has arrived, the whole frame must
//!   within [`Config::frame_timeout`](crate::Config::frame_timeout);
//! - time the silence between requests, when the session asks for an idle timeout.
//!
//! The body is then decoded by [`tandem_protocol::Codec`], like every frame of tandem.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tandem_protocol::{Codec, CodecError, LENGTH_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use super::config::SMALL_FRAME;
use crate::wire::Request;

/// How much room the reader makes for a read when no (small) frame needs more.
const READ_CHUNK: usize = 8 * 1024;

/// Bytes of frames being read, across connections, against a fixed limit.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget { limit, used: AtomicUsize::new(0) })
    }

    /// Counts `bytes`, unless that would pass the limit.
    fn try_reserve(self: &Arc<Self>, bytes: usize) -> Result<Reservation, usize> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let total = used.checked_add(bytes).filter(|total| *total <= self.limit).ok_or(used)?;
            match self.used.compare_exchange_weak(used, total, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(Reservation { budget: self.clone(), bytes }),
                Err(now) => used = now,
            }
        }
    }

    /// The bytes counted now.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes counted against a [`Budget`] until dropped.
#[derive(Debug)]
struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What reading produced.
#[derive(Debug)]
pub(crate) enum Read {
    Request(Request),
    /// The client closed the connection between two frames.
    Eof,
    /// No byte arrived within the idle timeout the session asked for.
    Idle,
}

/// Why reading stopped for good.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The bytes are not a frame within the limits, or reading failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A frame had started but did not complete in time.
    #[error("a frame was started ({received} bytes received) but not finished within {} ms", .timeout.as_millis())]
    Stalled { received: usize, timeout: Duration },
    /// The frame does not fit in what remains of the budget for partial frames.
    #[error(
        "the registry is already buffering {used} bytes of partial requests (limit {limit} bytes); a {len}-byte request does not fit now"
    )]
    OverBudget { len: usize, used: usize, limit: usize },
}

/// Reads one connection's requests.
#[derive(Debug)]
pub(crate) struct RequestReader<R> {
    io: R,
    buf: BytesMut,
    codec: Codec<Request>,
    frame_timeout: Duration,
    budget: Arc<Budget>,
    /// The current frame's share of the budget (a frame over [`SMALL_FRAME`] only).
    held: Option<Reservation>,
    /// When the current frame's first byte arrived.
    started: Option<Instant>,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    pub(crate) fn new(io: R, max_frame: usize, frame_timeout: Duration, budget: Arc<Budget>) -> Self {
        RequestReader {
            io,
            buf: BytesMut::new(),
            codec: Codec::with_max_frame_length(max_frame),
            frame_timeout,
            budget,
            held: None,
            started: None,
        }
    }

    /// The next request. Between frames, waits at most `idle` (if given) for a
    /// first byte; within a frame, at most the frame timeout for the rest.
    pub(crate) async fn next(&mut self, idle: Option<Duration>) -> Result<Read, ReadError> {
        let idle_deadline = idle.map(|idle| Instant::now() + idle);
        loop {
            if let Some(request) = self.decode()? {
                return Ok(Read::Request(request));
            }
            let read = self.io.read_buf(&mut self.buf);
            let read = match (self.started, idle_deadline) {
                (Some(started), _) => match tokio::time::timeout_at(started + self.frame_timeout, read).await {
                    Ok(read) => read,
                    Err(_) => {
                        return Err(ReadError::Stalled { received: self.buf.len(), timeout: self.frame_timeout });
                    }
                },
                (None, Some(deadline)) => match tokio::time::timeout_at(deadline, read).await {
                    Ok(read) => read,
                    Err(_) => return Ok(Read::Idle),
                },
                (None, None) => read.await,
            };
            if read.map_err(CodecError::Io)? == 0 {
                if self.buf.is_empty() {
                    return Ok(Read::Eof);
                }
                return Err(CodecError::Truncated { pending: self.buf.len() }.into());
            }
            self.started.get_or_insert_with(Instant::now);
        }
    }

    /// Decodes a complete frame, or makes room for the rest of the current one
    /// (counting a large one against the budget first).
    fn decode(&mut self) -> Result<Option<Request>, ReadError> {
        if self.buf.len() < LENGTH_PREFIX {
            self.buf.reserve(READ_CHUNK);
            return Ok(None);
        }
        let len = (&self.buf[..LENGTH_PREFIX]).get_u32() as usize;
        let frame_len = len.saturating_add(LENGTH_PREFIX);
        if self.buf.len() >= frame_len || len > self.codec.max_frame_length() {
            // The codec checks the limit and decodes.
            let request = self.codec.decode(&mut self.buf)?;
            if request.is_some() {
                self.frame_done();
            }
            return Ok(request);
        }
        if len > SMALL_FRAME && self.held.is_none() {
            let reservation = self.budget.try_reserve(len).map_err(|used| ReadError::OverBudget {
                len,
                used,
                limit: self.budget.limit,
            })?;
            self.held = Some(reservation);
            // Once, for the whole frame: growing step by step could double it.
            self.buf.reserve(frame_len - self.buf.len());
        } else {
            self.buf.reserve((frame_len - self.buf.len()).max(READ_CHUNK));
        }
        Ok(None)
    }

    /// A frame was decoded: return its budget and, after a large one, the memory
    /// it needed; time the next frame from now if it has begun to arrive.
    fn frame_done(&mut self) {
        if self.held.take().is_some() {
            self.buf = BytesMut::from(&self.buf[..]);
        }
        self.started = if self.buf.is_empty() { None } else { Some(Instant::now()) };
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    use super::*;
    use crate::wire::Op;

    fn frame(request: &Request) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Codec::<Request>::new().encode(request, &mut buf).expect("encodes");
        buf.to_vec()
    }

    fn put(id: u64, len: usize) -> Request {
        Request { id, op: Op::Put { key: "k".into(), value: vec![7u8; len].into() } }
    }

    fn open(io: tokio::io::DuplexStream, budget: &Arc<Budget>) -> RequestReader<tokio::io::DuplexStream> {
        RequestReader::new(io, 16 << 20, Duration::from_secs(10), budget.clone())
    }

    #[tokio::test]
    async fn split_and_pipelined_frames_come_out_whole_and_in_order() {
        let budget = Budget::new(1 << 20);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = open(rx, &budget);
        let requests = [put(1, 10), put(2, 200_000), put(3, 0), put(4, 70_000)];
        let bytes: Vec<u8> = requests.iter().flat_map(frame).collect();
        let writer = tokio::spawn(async move {
            // In odd-sized pieces: prefixes and bodies split anywhere.
            for piece in bytes.chunks(4093) {
                tx.write_all(piece).await.expect("writes");
            }
            tx
        });
        for request in &requests {
            match reader.next(None).await.expect("reads") {
                Read::Request(read) => assert_eq!(&read, request),
                other => panic!("expected a request, got {other:?}"),
            }
        }
        assert_eq!(budget.used(), 0, "every large frame returned its budget");
        drop(writer.await.expect("writer"));
        assert!(matches!(reader.next(None).await, Ok(Read::Eof)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_frame_counts_against_the_budget_until_it_is_read() {
        let budget = Budget::new(300_000);
        let (mut tx1, rx1) = tokio::io::duplex(1 << 20);
        let (mut tx2, rx2) = tokio::io::duplex(1 << 20);
        let (mut first, mut second) = (open(rx1, &budget), open(rx2, &budget));
        let big = frame(&put(1, 200_000));
        tx1.write_all(&big[..1000]).await.expect("writes");
        assert!(tokio::time::timeout(Duration::from_millis(10), first.next(None)).await.is_err(), "incomplete");
        let announced = big.len() - LENGTH_PREFIX;
        assert_eq!(budget.used(), announced, "counted in full as soon as the prefix arrived");

        // Another connection's large frame does not fit; a small one needs no budget.
        tx2.write_all(&frame(&put(2, 100))).await.expect("writes");
        assert!(matches!(second.next(None).await, Ok(Read::Request(_))));
        tx2.write_all(&frame(&put(3, 150_000))[..10]).await.expect("writes");
        let error = second.next(None).await.expect_err("over the budget");
        assert!(matches!(error, ReadError::OverBudget { used, limit: 300_000, .. } if used == announced), "{error}");

        tx1.write_all(&big[1000..]).await.expect("writes");
        assert!(matches!(first.next(None).await, Ok(Read::Request(r)) if r.id == 1));
        assert_eq!(budget.used(), 0);
        assert!(first.buf.capacity() < SMALL_FRAME, "the large frame's buffer was let go");

        // A connection that ends mid-frame gives its share back too.
        tx1.write_all(&frame(&put(4, 200_000))[..100]).await.expect("writes");
        assert!(tokio::time::timeout(Duration::from_millis(10), first.next(None)).await.is_err());
        assert!(budget.used() > 0);
        drop(first);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_frame_must_finish_within_the_frame_timeout() {
        let budget = Budget::new(1 << 20);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = open(rx, &budget);
        let started = Instant::now();
        tx.write_all(&[0, 0, 0]).await.expect("writes");
        let error = reader.next(None).await.expect_err("stalled");
        assert!(matches!(error, ReadError::Stalled { received: 3, .. }), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_frame_is_timed_from_its_first_byte() {
        let budget = Budget::new(1 << 20);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = open(rx, &budget);
        let bytes = frame(&put(1, 100));
        let trickle = tokio::spawn(async move {
            for byte in bytes {
                tx.write_all(&[byte]).await.expect("writes");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let started = Instant::now();
        assert!(matches!(reader.next(None).await, Err(ReadError::Stalled { .. })));
        assert_eq!(started.elapsed(), Duration::from_secs(10), "one byte every 500 ms does not reset the clock");
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn silence_between_frames_is_idle_only_when_asked() {
        let budget = Budget::new(1 << 20);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = open(rx, &budget);
        let started = Instant::now();
        assert!(matches!(reader.next(Some(Duration::from_secs(30))).await, Ok(Read::Idle)));
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // Idle is not an error: the connection reads on.
        let mut bytes = BytesMut::new();
        bytes.put_slice(&frame(&put(1, 1)));
        tx.write_all(&bytes).await.expect("writes");
        assert!(matches!(reader.next(Some(Duration::from_secs(30))).await, Ok(Read::Request(_))));
        // Without an idle timeout, silence is fine.
        assert!(tokio::time::timeout(Duration::from_secs(3600), reader.next(None)).await.is_err());
    }

    #[tokio::test]
    async fn bad_frames_and_a_truncated_end_are_errors() {
        let budget = Budget::new(1 << 20);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut small = RequestReader::new(rx, 1000, Duration::from_secs(10), budget.clone());
        tx.write_all(&[0, 0, 0x03, 0xE9]).await.expect("writes");
        let error = small.next(None).await.expect_err("too large");
        assert!(matches!(error, ReadError::Codec(CodecError::TooLarge { len: 1001, max: 1000 })), "{error}");
        assert_eq!(budget.used(), 0, "refused before anything was counted");

        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = open(rx, &budget);
        tx.write_all(b"\x00\x00\x00\x03\xc1\xc1\xc1").await.expect("writes");
        assert!(matches!(reader.next(None).await, Err(ReadError::Codec(CodecError::Malformed(_)))));

        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = open(rx, &budget);
        tx.write_all(&[0, 0, 0, 9, 1]).await.expect("writes");
        drop(tx);
        assert!(matches!(reader.next(None).await, Err(ReadError::Codec(CodecError::Truncated { pending: 5 }))));
    }
}
