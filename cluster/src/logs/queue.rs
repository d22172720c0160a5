//! Between the pipes and the disk: the reader tasks (on the master's
//! runtime, never blocking: they only read pipes and `try_push`) cut each
//! child's output into whole lines and queue them; the writer thread takes
//! them out. The queue is bounded in bytes ([`QUEUE_BYTES`]): a chunk that
//! does not fit is dropped and its lines counted, so a child that writes
//! faster than the disk never waits on the master.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::stats::{DropReason, LogStats};

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

/// Whole lines of one process's output.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The process's file stem (`agent`, `worker-3`).
    pub process: Arc<str>,
    pub data: Vec<u8>,
    pub lines: u64,
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    closed: bool,
    /// Lines dropped per process since the writer last took them (for its
    /// summary line in that process's file).
    dropped: HashMap<Arc<str>, u64>,
}

/// The bounded queue from the readers to the writer thread.
#[derive(Debug)]
pub(crate) struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
    stats: Arc<LogStats>,
}

/// What the writer takes out at once.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub chunks: Vec<Chunk>,
    /// Lines the queue dropped per process since the last batch.
    pub dropped: HashMap<Arc<str>, u64>,
}

impl Queue {
    pub(crate) fn new(capacity: usize, stats: Arc<LogStats>) -> Queue {
        Queue { state: Mutex::default(), ready: Condvar::new(), capacity, stats }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `chunk`, or drops it (counting its lines) when the queue is
    /// full or closed. Never waits beyond the lock (held for a push or a swap).
    pub(crate) fn push(&self, chunk: Chunk) -> bool {
        let mut state = self.lock();
        if state.closed || state.bytes + chunk.data.len() > self.capacity {
            // A writer waiting on an empty queue must hear of the drop too.
            let wake = state.chunks.is_empty() && state.dropped.is_empty();
            *state.dropped.entry(Arc::clone(&chunk.process)).or_default() += chunk.lines;
            drop(state);
            if wake {
                self.ready.notify_one();
            }
            self.stats.dropped(&chunk.process, DropReason::BufferFull, chunk.lines);
            return false;
        }
        let was_empty = state.chunks.is_empty() && state.dropped.is_empty();
        state.bytes += chunk.data.len();
        state.chunks.push_back(chunk);
        drop(state);
        // The writer waits only on an empty queue: only this push can wake it.
        if was_empty {
            self.ready.notify_one();
        }
        true
    }

    /// Waits until there is something to write (or a drop to report), and
    /// takes all of it; `None` once the queue is closed and empty.
    pub(crate) fn take(&self) -> Option<Batch> {
        let mut state = self.lock();
        while state.chunks.is_empty() && state.dropped.is_empty() {
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.bytes = 0;
        Some(Batch { chunks: std::mem::take(&mut state.chunks).into(), dropped: std::mem::take(&mut state.dropped) })
    }

    /// No more pushes: the writer ends once it has taken what is queued.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
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
pub(crate) async fn read_lines(mut pipe: impl AsyncRead + Unpin, process: Arc<str>, queue: Arc<Queue>) {
    let mut buffer = Vec::with_capacity(READ_BUFFER);
    // The start of a line not ended yet.
    let mut partial: Vec<u8> = Vec::new();
    loop {
        buffer.clear();
        match pipe.read_buf(&mut buffer).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(process = %process, error = %e, "reading a child's output failed");
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
            push(&queue, &process, data);
        }
    }
    if !partial.is_empty() {
        partial.push(b'\n');
        push(&queue, &process, partial);
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

fn push(queue: &Queue, process: &Arc<str>, data: Vec<u8>) {
    let lines = count_lines(&data);
    queue.push(Chunk { process: Arc::clone(process), data, lines });
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

    fn queue(capacity: usize) -> Arc<Queue> {
        Arc::new(Queue::new(capacity, Arc::new(LogStats::default())))
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_the_writer_hears_of_it_with_the_next_batch() {
        let q = queue(10);
        let p: Arc<str> = Arc::from("worker-1");
        let chunk =
            |s: &str| Chunk { process: Arc::clone(&p), data: s.as_bytes().to_vec(), lines: count_lines(s.as_bytes()) };
        assert!(q.push(chunk("a\nb\n")));
        assert!(q.push(chunk("c\nd\ne\n")));
        assert!(!q.push(chunk("f\ng\n")), "4 + 6 + 4 bytes > 10");
        let batch = q.take().unwrap();
        assert_eq!(batch.chunks.iter().map(|c| c.lines).sum::<u64>(), 5);
        assert_eq!(batch.dropped.get(&p), Some(&2));
        assert_eq!(q.stats.dropped_lines("worker-1"), 2);
        // Room again once taken.
        assert!(q.push(chunk("h\n")));
        q.close();
        assert!(!q.push(chunk("i\n")), "closed");
        let batch = q.take().unwrap();
        assert_eq!(batch.chunks.len(), 1);
        assert_eq!(batch.dropped.get(&p), Some(&1));
        assert!(q.take().is_none());
    }

    #[tokio::test]
    async fn the_reader_queues_whole_lines_cuts_long_ones_and_ends_the_last_one() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let q = queue(QUEUE_BYTES);
        let reader = tokio::spawn(read_lines(rx, Arc::from("agent"), Arc::clone(&q)));
        tx.write_all(b"one\ntw").await.unwrap();
        tx.write_all(b"o\nthr").await.unwrap();
        tx.write_all(&vec![b'x'; MAX_LOG_LINE + 10]).await.unwrap();
        tx.write_all(b"\nlast").await.unwrap();
        drop(tx);
        tokio::time::timeout(TIMEOUT, reader).await.unwrap().unwrap();
        q.close();
        let mut all = Vec::new();
        while let Some(batch) = q.take() {
            for c in batch.chunks {
                assert_eq!(c.lines, count_lines(&c.data));
                assert!(c.data.ends_with(b"\n"), "only whole lines are queued");
                all.extend(c.data);
            }
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
}
