//! The writer thread's state machine: appends each process's lines to its
//! file, rotates a file at the size limit, and keeps the total of all the
//! files within the quota by deleting the oldest rotated file first; what it
//! cannot write it drops and counts. It alone touches the log files, on a
//! thread of its own, so no disk wait ever reaches the master's loop.
//!
//! ```text
//! write(piece of P)                      (whole lines; one piece per file)
//!   P's file + piece > file size  -> rotate P: P.log.k -> P.log.k+1 .. P.log -> P.log.1
//!   total + piece > quota         -> delete the oldest rotated file of any process
//!                                    (none left: rotate an active file, then delete it),
//!                                    and say so in a line before the piece
//!   open / write / rename fails   -> the piece's lines dropped and counted; one WARN
//!                                    until a write works again, then a line with the count
//! ```
//!
//! The account is kept before each write: the bytes on disk never pass the
//! quota, even for a moment (a failed write counts what it did write).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::queue::{Chunk, count_lines};
use super::stats::{DropReason, LogStats};

/// The most rotated files kept per process: 100 (`<file>.1` to `<file>.100`);
/// a rotation beyond it deletes that process's oldest first.
pub(crate) const MAX_ROTATED: usize = 100;

/// The sizes the writer keeps to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub file_size: u64,
    pub quota: u64,
}

/// A rotated file of one process.
#[derive(Debug)]
struct Rotated {
    /// When it was rotated (nanoseconds since the epoch, or its mtime): the
    /// oldest of all processes goes first.
    seq: u64,
    size: u64,
}

#[derive(Debug, Default)]
struct ProcFiles {
    file: Option<File>,
    /// The active file's size, by our account.
    size: u64,
    /// Newest first: `rotated[i]` is `<stem>.log.<i + 1>`.
    rotated: VecDeque<Rotated>,
    /// Lines dropped since this process's last line written (the summary
    /// line written with its next one).
    dropped: u64,
    /// The active file may end inside a line (a write failed half-way).
    broken_line: bool,
}

#[derive(Debug)]
pub(crate) struct Writer {
    dir: PathBuf,
    limits: Limits,
    json: bool,
    /// The bytes of every file we account for.
    total: u64,
    procs: BTreeMap<Arc<str>, ProcFiles>,
    last_seq: u64,
    /// While writing fails: the first failure, warned about once.
    failing: bool,
    /// Lines dropped since writing started failing.
    failed_lines: u64,
    /// The first deletion for the quota is logged at INFO, the others at DEBUG.
    deleted_before: bool,
    stats: Arc<LogStats>,
    /// The drop counters this writer took from `stats` (no lock per drop).
    counters: HashMap<(Arc<str>, DropReason), Arc<std::sync::atomic::AtomicU64>>,
    /// Tests: every write fails with this OS error (`ENOSPC`, say).
    #[cfg(test)]
    pub fail_writes: Option<i32>,
}

impl Writer {
    /// A writer for `dir` (which the caller checked), taking over the files
    /// a previous master left there: its active files are appended to, its
    /// rotated files counted (and numbered without gaps), and the oldest
    /// deleted if they pass the quota.
    pub(crate) fn open(dir: &Path, limits: Limits, json: bool, stats: Arc<LogStats>) -> io::Result<Writer> {
        let mut writer = Writer {
            dir: dir.to_owned(),
            limits,
            json,
            total: 0,
            procs: BTreeMap::new(),
            last_seq: 0,
            failing: false,
            failed_lines: 0,
            deleted_before: false,
            stats,
            counters: HashMap::new(),
            #[cfg(test)]
            fail_writes: None,
        };
        writer.scan()?;
        while writer.total > limits.quota {
            match writer.free_one(None) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(e),
            }
        }
        writer.publish();
        writer.stats.quota.store(limits.quota, Ordering::Relaxed);
        Ok(writer)
    }

    fn scan(&mut self) -> io::Result<()> {
        let mut rotated: HashMap<Arc<str>, Vec<(u32, u64, u64)>> = HashMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            if let Some(stem) = name.strip_suffix(".log").filter(|s| is_stem(s)) {
                self.procs.entry(Arc::from(stem)).or_default().size = meta.len();
                self.total += meta.len();
            } else if let Some((base, n)) = name.rsplit_once('.')
                && let Some(stem) = base.strip_suffix(".log").filter(|s| is_stem(s))
                && let Ok(n) = n.parse::<u32>()
                && n >= 1
                && !n.to_string().starts_with('0')
            {
                let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                let seq = mtime.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                rotated.entry(Arc::from(stem)).or_default().push((n, seq, meta.len()));
                self.total += meta.len();
            }
        }
        for (stem, mut files) in rotated {
            files.sort_unstable_by_key(|&(n, _, _)| n);
            let p = self.procs.entry(Arc::clone(&stem)).or_default();
            for (index, (n, seq, size)) in files.into_iter().enumerate() {
                let want = index + 1;
                if n as usize != want {
                    // Close a gap: the files are numbered 1.. without holes.
                    std::fs::rename(rotated_path(&self.dir, &stem, n as usize), rotated_path(&self.dir, &stem, want))?;
                }
                p.rotated.push_back(Rotated { seq, size });
                self.last_seq = self.last_seq.max(seq);
            }
        }
        Ok(())
    }

    /// Writes what the readers queued, each process's lines in their order.
    pub(crate) fn write_batch(&mut self, chunks: Vec<Chunk>) {
        let mut by_process: BTreeMap<Arc<str>, Vec<u8>> = BTreeMap::new();
        for chunk in chunks {
            if chunk.dropped_before > 0 {
                // The lines before the drop first, then the summary with the lines after it.
                if let Some(before) = by_process.remove(&chunk.process) {
                    self.write(&chunk.process, &before);
                }
                self.procs.entry(Arc::clone(&chunk.process)).or_default().dropped += chunk.dropped_before;
            }
            match by_process.get_mut(&chunk.process) {
                Some(data) => data.extend_from_slice(&chunk.data),
                None => {
                    by_process.insert(chunk.process, chunk.data);
                }
            }
        }
        for (process, data) in by_process {
            self.write(&process, &data);
        }
        self.publish();
    }

    fn publish(&self) {
        self.stats.bytes_on_disk.store(self.total, Ordering::Relaxed);
    }

    /// Writes whole lines of `process`, cut where its file reaches the size limit.
    pub(crate) fn write(&mut self, process: &Arc<str>, mut data: &[u8]) {
        if data.is_empty() && self.procs.get(process).is_some_and(|p| p.dropped > 0) {
            // A pipe's last word (the child is gone): its drops, said now.
            self.write_piece(process, data);
        }
        while !data.is_empty() {
            let p = self.procs.entry(Arc::clone(process)).or_default();
            let room = self.limits.file_size.saturating_sub(p.size + NOTE_ROOM);
            let mut cut = prefix_within(data, room);
            if cut == 0 {
                if p.size > 0 {
                    match self.rotate(process) {
                        Ok(()) => continue,
                        Err(e) => {
                            self.failed(process, 0, &e, "rotate a log file");
                            // Written on into the file as it is, within the quota.
                            cut = data.len();
                        }
                    }
                } else {
                    // An empty file: one line (at most MAX_LOG_LINE), whatever the room.
                    cut = data.iter().position(|&b| b == b'\n').map_or(data.len(), |i| i + 1);
                }
            }
            let (piece, rest) = data.split_at(cut);
            data = rest;
            self.write_piece(process, piece);
        }
    }

    /// Writes one piece (whole lines) into `process`'s active file, within the quota.
    fn write_piece(&mut self, process: &Arc<str>, piece: &[u8]) {
        let lines = count_lines(piece);
        let mut head = Vec::new();
        {
            let p = self.procs.entry(Arc::clone(process)).or_default();
            if p.broken_line {
                head.push(b'\n');
            }
            if p.dropped > 0 {
                let n = p.dropped;
                head.extend(self.note("WARN", &format!("{n} lines of this process were dropped here (the log writer could not keep up, or writing failed): see tandem_log_lines_dropped_total")));
            }
        }
        loop {
            let needed = (head.len() + piece.len()) as u64;
            if self.total + needed <= self.limits.quota {
                break;
            }
            match self.free_one(Some(process)) {
                Ok(Some(note)) => head.extend(note),
                Ok(None) => {
                    self.drop_lines(process, lines, DropReason::TooLong);
                    return;
                }
                Err(e) => {
                    self.failed(process, lines, &e, "delete an old log file");
                    return;
                }
            }
        }
        let path = active_path(&self.dir, process);
        let p = self.procs.entry(Arc::clone(process)).or_default();
        if p.file.is_none() {
            match OpenOptions::new().append(true).create(true).mode(0o600).open(&path) {
                Ok(file) => {
                    // Our account follows the file (it may be new, or changed by hand).
                    let len = file.metadata().map_or(p.size, |m| m.len());
                    self.total = self.total - p.size + len;
                    p.size = len;
                    p.file = Some(file);
                }
                Err(e) => {
                    self.failed(process, lines, &e, "open a log file");
                    return;
                }
            }
            if self.total + (head.len() + piece.len()) as u64 > self.limits.quota {
                // The file we found was bigger than our account: try again within the quota.
                return self.write_piece(process, piece);
            }
        }
        let Some(file) = p.file.as_mut() else { return };
        let before = p.size;
        #[cfg(test)]
        let injected = self.fail_writes.map(io::Error::from_raw_os_error);
        #[cfg(not(test))]
        let injected: Option<io::Error> = None;
        let result = match injected {
            Some(e) => Err(e),
            None if head.is_empty() => file.write_all(piece),
            None => file.write_all(&head).and_then(|()| file.write_all(piece)),
        };
        match result {
            Ok(()) => {
                let written = (head.len() + piece.len()) as u64;
                p.size += written;
                p.dropped = 0;
                p.broken_line = false;
                self.total += written;
                self.stats.bytes_written.fetch_add(written, Ordering::Relaxed);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(
                        dropped = std::mem::take(&mut self.failed_lines),
                        "writing the log files works again; the lines dropped meanwhile are counted in tandem_log_lines_dropped_total"
                    );
                }
            }
            Err(e) => {
                // Count what did reach the file: the account stays true.
                let now = file.metadata().map_or(before, |m| m.len()).max(before);
                p.size = now;
                p.broken_line = now > before;
                self.total += now - before;
                self.stats.bytes_written.fetch_add(now - before, Ordering::Relaxed);
                self.failed(process, lines, &e, "write a log file");
            }
        }
    }

    /// Frees room: deletes the oldest rotated file of all processes, after
    /// rotating an active file (`process`'s own, else the largest) when no
    /// rotated file is left. Returns the line that says so, or `None` when
    /// there is nothing left to delete.
    fn free_one(&mut self, process: Option<&Arc<str>>) -> io::Result<Option<Vec<u8>>> {
        if self.oldest().is_none() {
            let own = process.filter(|p| self.procs.get(*p).is_some_and(|f| f.size > 0)).cloned();
            let largest = || {
                self.procs.iter().filter(|(_, f)| f.size > 0).max_by_key(|(_, f)| f.size).map(|(k, _)| Arc::clone(k))
            };
            match own.or_else(largest) {
                Some(stem) => self.rotate(&stem)?,
                None => return Ok(None),
            }
        }
        let Some(stem) = self.oldest() else { return Ok(None) };
        let (name, size) = self.delete_oldest_of(&stem)?;
        let quota = self.limits.quota;
        if std::mem::replace(&mut self.deleted_before, true) {
            tracing::debug!(file = name, size, quota, "deleted the oldest log file to stay within the log quota");
        } else {
            tracing::info!(
                file = name,
                size,
                quota,
                "the log quota is reached: deleting the oldest log files from now on"
            );
        }
        Ok(Some(self.note(
            "INFO",
            &format!("deleted {name} ({size} bytes), the oldest log file, to keep the cluster's logs within their quota of {quota} bytes"),
        )))
    }

    /// The process whose oldest rotated file is the oldest of all.
    fn oldest(&self) -> Option<Arc<str>> {
        self.procs
            .iter()
            .filter_map(|(k, p)| p.rotated.back().map(|r| (r.seq, k)))
            .min_by_key(|(seq, _)| *seq)
            .map(|(_, k)| Arc::clone(k))
    }

    /// Deletes `stem`'s oldest rotated file (one already gone counts as
    /// deleted); returns its name and size.
    fn delete_oldest_of(&mut self, stem: &Arc<str>) -> io::Result<(String, u64)> {
        let p = self.procs.get_mut(stem).ok_or_else(|| io::Error::other("no such process"))?;
        let path = rotated_path(&self.dir, stem, p.rotated.len());
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let size = p.rotated.pop_back().map_or(0, |r| r.size);
        self.total -= size;
        self.stats.files_deleted.fetch_add(1, Ordering::Relaxed);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok((name, size))
    }

    /// `stem.log` becomes `stem.log.1`, the rotated ones shift up by one.
    /// On a failure the active file is closed (the next write opens it
    /// again, or fails and drops), and the account stays as it was: at
    /// worst it counts files that are gone, never too few bytes.
    fn rotate(&mut self, stem: &Arc<str>) -> io::Result<()> {
        if self.procs.get(stem).is_some_and(|p| p.rotated.len() >= MAX_ROTATED) {
            self.delete_oldest_of(stem)?;
        }
        let seq = self.next_seq();
        let dir = self.dir.clone();
        let p = self.procs.entry(Arc::clone(stem)).or_default();
        p.file = None;
        for n in (1..=p.rotated.len()).rev() {
            std::fs::rename(rotated_path(&dir, stem, n), rotated_path(&dir, stem, n + 1))?;
        }
        std::fs::rename(active_path(&dir, stem), rotated_path(&dir, stem, 1))?;
        let size = std::mem::take(&mut p.size);
        p.rotated.push_front(Rotated { seq, size });
        p.broken_line = false;
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        self.last_seq = u64::try_from(now).unwrap_or(u64::MAX).max(self.last_seq + 1);
        self.last_seq
    }

    fn drop_lines(&mut self, process: &Arc<str>, lines: u64, reason: DropReason) {
        if lines == 0 {
            return;
        }
        self.procs.entry(Arc::clone(process)).or_default().dropped += lines;
        let key = (Arc::clone(process), reason);
        let stats = &self.stats;
        self.counters.entry(key).or_insert_with(|| stats.counter(process, reason)).fetch_add(lines, Ordering::Relaxed);
    }

    /// A failed file operation: its lines dropped and counted; one WARN until a write works again.
    fn failed(&mut self, process: &Arc<str>, lines: u64, error: &io::Error, what: &'static str) {
        self.drop_lines(process, lines, DropReason::WriteFailed);
        self.failed_lines += lines;
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(error = %error, what, "writing the log files still fails");
        } else {
            tracing::warn!(
                error = %error,
                what,
                dir = %self.dir.display(),
                "could not write the log files; the children's lines are dropped and counted until writing works again"
            );
        }
    }

    /// A line of the master's own in a log file, in the format of the
    /// children's lines (JSON with `TANDEM_LOG=json`).
    fn note(&self, level: &str, message: &str) -> Vec<u8> {
        use tracing_subscriber::fmt::time::FormatTime;
        let mut timestamp = String::new();
        let _ = tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp));
        let mut line = if self.json {
            serde_json::json!({
                "timestamp": timestamp,
                "level": level,
                "fields": { "message": message },
                "target": super::LOG_TARGET,
            })
            .to_string()
        } else {
            format!("{timestamp} {level:>5} {}: {message}", super::LOG_TARGET)
        };
        line.push('\n');
        line.into_bytes()
    }
}

/// Room kept in each file for the lines the master adds (a drop summary,
/// deletion notes), so that a file passes its size by little when it must.
const NOTE_ROOM: u64 = 512;

/// The length of the longest prefix of `data` that ends a line and is at most `room` bytes.
fn prefix_within(data: &[u8], room: u64) -> usize {
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if data.len() <= room {
        return data.len();
    }
    data[..room].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// Whether `stem` names a process's file: `agent` or `worker-<K>`.
pub(crate) fn is_stem(stem: &str) -> bool {
    stem == "agent"
        || stem
            .strip_prefix("worker-")
            .is_some_and(|k| !k.is_empty() && !k.starts_with('0') && k.bytes().all(|b| b.is_ascii_digit()))
}

pub(crate) fn active_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.log"))
}

pub(crate) fn rotated_path(dir: &Path, stem: &str, n: usize) -> PathBuf {
    dir.join(format!("{stem}.log.{n}"))
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
