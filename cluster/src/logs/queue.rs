//! Between the pipes and the disk: the reader tasks (on the master's
//! runtime, never blocking: they only read pipes and push to a channel that never waits) cut each
//! child's output into whole lines and queue them; the writer thread takes
//! them out. The queue is bounded in bytes ([`QUEUE_BYTES`]): a chunk that
//! does not fit is dropped and its lines counted, so a child that writes
//! faster than the disk never waits on the master.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// The most bytes waiting for the writer thread: 4 MiB. A chunk that would
/// pass it is dropped (its lines counted as `buffer_full`).
pub(crate) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// How much a reader takes from a pipe at once.
const READ_BUFFER: usize = 64 * 1024;
/// The longest line kept whole, in bytes: 64 KiB. A longer one is cut into
/// lines of this length (each ended with `\n`).
pub const MAX_LOG_LINE: usize = 64 * 1024;
/// The pipe size asked for each child's stdout and stderr (best effort:
/// Linux's `pipe-max-size`, 1 MiB by default): room for 100 ms of a child
/// writing 10 MB/s while the master's thread is busy elsewhere.
const PIPE_SIZE: i32 = 1024 * 1024;
/// The most chunks the writer takes in one batch.
const MAX_BATCH: usize = 16 * 1024;

/// Whole lines of one process's output.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The process's file stem (`agent`, `worker-3`).
    pub process: Arc<str>,
    pub data: Vec<u8>,
    pub lines: u64,
    /// Lines of this pipe dropped (the queue full) since its previous chunk
    /// that got through: the writer says how many before writing this one.
    pub dropped_before: u64,
}

/// The readers' end of the queue to the writer thread: a channel whose
/// sends never wait (no lock is shared with the writer, so a writer thread
/// descheduled at any point never holds up the master's loop), bounded in
/// bytes by a counter both ends keep.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    tx: mpsc::UnboundedSender<Chunk>,
    bytes: Arc<AtomicUsize>,
    capacity: usize,
}

/// The writer's end.
#[derive(Debug)]
pub(crate) struct Receiver {
    rx: mpsc::UnboundedReceiver<Chunk>,
    bytes: Arc<AtomicUsize>,
}

/// A queue of at most `capacity` bytes; it ends (the receiver's `take`
/// returns `None`) once every [`Queue`] clone is dropped and it is drained.
pub(crate) fn queue(capacity: usize) -> (Queue, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let bytes = Arc::new(AtomicUsize::new(0));
    (Queue { tx, bytes: Arc::clone(&bytes), capacity }, Receiver { rx, bytes })
}

impl Queue {
    /// Queues `chunk`, unless that would pass the byte budget (or the writer
    /// is gone): then it is handed back. Never waits.
    pub(crate) fn push(&self, chunk: Chunk) -> Result<(), Chunk> {
        let len = chunk.data.len();
        if self.bytes.fetch_add(len, Ordering::AcqRel) + len > self.capacity && !chunk.data.is_empty() {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(chunk);
        }
        self.tx.send(chunk).map_err(|mpsc::error::SendError(chunk)| {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            chunk
        })
    }
}

impl Receiver {
    /// Waits (blocking the calling thread: the writer's) until there is
    /// something to write, and takes what is queued; `None` once the queue
    /// has ended.
    pub(crate) fn take(&mut self) -> Option<Vec<Chunk>> {
        let first = self.rx.blocking_recv()?;
        let mut chunks = vec![first];
        while chunks.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(chunk) => chunks.push(chunk),
                Err(_) => break,
            }
        }
        let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        Some(chunks)
    }
}

/// Asks for a bigger pipe (best effort; see [`PIPE_SIZE`]).
pub(crate) fn enlarge_pipe(fd: std::os::fd::RawFd) {
    if let Err(e) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        tracing::debug!(error = %e, "could not enlarge a child's output pipe");
    }
}

/// Reads one of a child's output pipes to its end, queueing whole lines (a
/// last line without `\n` gets one at the end; a line over [`MAX_LOG_LINE`]
/// is cut). Ends at EOF or on a read error (the child is gone).
pub(crate) async fn read_lines(
    mut pipe: impl AsyncRead + Unpin,
    process: Arc<str>,
    queue: Queue,
    dropped: Arc<AtomicU64>,
) {
    let mut sender = Sender { queue, process, dropped, pending: 0 };
    let mut buffer = Vec::with_capacity(READ_BUFFER);
    // The start of a line not ended yet.
    let mut partial: Vec<u8> = Vec::new();
    loop {
        buffer.clear();
        match pipe.read_buf(&mut buffer).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(process = %sender.process, error = %e, "reading a child's output failed");
                break;
            }
        }
        let mut data = match buffer.iter().rposition(|&b| b == b'\n') {
            Some(end) => {
                let mut data = std::mem::take(&mut partial);
                data.extend_from_slice(&buffer[..=end]);
                partial.extend_from_slice(&buffer[end + 1..]);
                if data.len() > MAX_LOG_LINE { cut_long_lines(&data) } else { data }
            }
            None => {
                partial.extend_from_slice(&buffer);
                Vec::new()
            }
        };
        // A line too long to wait for its end: cut.
        while partial.len() >= MAX_LOG_LINE {
            let rest = partial.split_off(MAX_LOG_LINE);
            data.extend_from_slice(&partial);
            data.push(b'\n');
            partial = rest;
        }
        if !data.is_empty() {
            sender.push(data);
        }
    }
    if !partial.is_empty() {
        partial.push(b'\n');
        sender.push(partial);
    }
    if sender.pending > 0 {
        // The last word on what was lost: an empty chunk, never refused for room.
        sender.push(Vec::new());
    }
}

/// One pipe's end of the queue: what it dropped since its last chunk through.
struct Sender {
    queue: Queue,
    process: Arc<str>,
    /// `tandem_log_lines_dropped_total{process, reason="buffer_full"}`.
    dropped: Arc<AtomicU64>,
    pending: u64,
}

impl Sender {
    fn push(&mut self, data: Vec<u8>) {
        let lines = count_lines(&data);
        let chunk = Chunk { process: Arc::clone(&self.process), data, lines, dropped_before: self.pending };
        match self.queue.push(chunk) {
            Ok(()) => self.pending = 0,
            Err(chunk) => {
                self.pending += chunk.lines;
                self.dropped.fetch_add(chunk.lines, Ordering::Relaxed);
            }
        }
    }
}

/// `data` (whole lines) with every line over [`MAX_LOG_LINE`] cut into lines of that length.
fn cut_long_lines(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / MAX_LOG_LINE);
    for line in data.split_inclusive(|&b| b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        if body.is_empty() {
            out.push(b'\n');
        }
        for piece in body.chunks(MAX_LOG_LINE) {
            out.extend_from_slice(piece);
            out.push(b'\n');
        }
    }
    out
}

pub(crate) fn count_lines(data: &[u8]) -> u64 {
    data.iter().filter(|&&b| b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn chunk(s: &str) -> Chunk {
        Chunk {
            process: Arc::from("worker-1"),
            data: s.as_bytes().to_vec(),
            lines: count_lines(s.as_bytes()),
            dropped_before: 0,
        }
    }

    #[test]
    fn a_full_queue_hands_the_chunk_back_and_has_room_again_once_taken() {
        let (q, mut rx) = queue(10);
        assert!(q.push(chunk("a\nb\n")).is_ok());
        assert!(q.push(chunk("c\nd\ne\n")).is_ok());
        let refused = q.push(chunk("f\ng\n")).unwrap_err();
        assert_eq!(refused.lines, 2, "4 + 6 + 4 bytes > 10");
        let batch = rx.take().unwrap();
        assert_eq!(batch.iter().map(|c| c.lines).sum::<u64>(), 5);
        assert!(q.push(chunk("h\n")).is_ok(), "room again");
        drop(q);
        assert_eq!(rx.take().unwrap().len(), 1);
        assert!(rx.take().is_none(), "every sender gone: the end");
    }

    /// What a reader queued from `input` (written in pieces) through a queue of `capacity` bytes.
    async fn read_all(pieces: Vec<Vec<u8>>, capacity: usize) -> (Vec<Chunk>, u64) {
        let (mut tx, pipe) = tokio::io::duplex(1 << 20);
        let (q, mut rx) = queue(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(read_lines(pipe, Arc::from("agent"), q, Arc::clone(&dropped)));
        for piece in pieces {
            tx.write_all(&piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        tokio::time::timeout(TIMEOUT, reader).await.unwrap().unwrap();
        let chunks = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            while let Some(batch) = rx.take() {
                all.extend(batch);
            }
            all
        })
        .await
        .unwrap();
        (chunks, dropped.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn the_reader_queues_whole_lines_cuts_long_ones_and_ends_the_last_one() {
        let pieces = vec![b"one\ntw".to_vec(), b"o\nthr".to_vec(), vec![b'x'; MAX_LOG_LINE + 10], b"\nlast".to_vec()];
        let (chunks, dropped) = read_all(pieces, QUEUE_BYTES).await;
        assert_eq!(dropped, 0);
        let mut all = Vec::new();
        for c in chunks {
            assert_eq!(c.lines, count_lines(&c.data));
            assert!(c.data.ends_with(b"\n"), "only whole lines are queued");
            all.extend(c.data);
        }
        let text = String::from_utf8(all).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["one", "two"]);
        assert_eq!(lines[2].len(), MAX_LOG_LINE, "cut at the limit");
        assert!(lines[2].starts_with("thr"));
        assert_eq!(lines[3], "x".repeat(13), "3 + 64 KiB + 10 - 64 KiB");
        assert_eq!(lines[4], "last");
        assert_eq!(lines.len(), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lines_a_full_queue_refuses_are_counted_and_announced_with_the_next_chunk_through() {
        // 20-byte budget, nobody taking: the first chunk fits, the next ones do not.
        let pieces = vec![b"aaaaaaaa\n".to_vec(), b"bbbbbbbbbbbbbbbbbbbb\n".to_vec(), b"c\nd\n".to_vec()];
        let (chunks, dropped) = read_all(pieces, 20).await;
        assert_eq!(dropped, 1, "the 21-byte line");
        let announced: u64 = chunks.iter().map(|c| c.dropped_before).sum();
        assert_eq!(announced, 1, "{chunks:?}");
        assert_eq!(chunks.iter().map(|c| c.lines).sum::<u64>(), 3);
    }
}
