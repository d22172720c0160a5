//! Capturing the children's output into files ([`Config::log_dir`]).
//!
//! ```text
//! <log_dir>/<name>/agent.log        the agent's stdout and stderr, line by line
//!                  agent.log.1      rotated at Config::log_file_size (1 newest .. 100 oldest)
//!                  worker-3.log     worker 3, whatever process runs in its slot
//! ```
//!
//! ```text
//! child stdout ─┐ reader tasks (master's runtime): non-blocking       writer thread
//! child stderr ─┘ reads, cut into whole lines ──push──▶ queue ──▶ rotation, quota,
//!                 full (4 MiB): dropped, counted  (lock-free)   files (writer.rs)
//! ```
//!
//! The master never waits on the disk and never stops reading a child: what
//! cannot be written in time is dropped and counted
//! (`tandem_log_lines_dropped_total`), and a line in the process's file says
//! how many when writing resumes. The master's own output stays on its
//! stderr: it is where the capture's own warnings (a full disk) must go.

mod queue;
mod stats;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use queue::MAX_LOG_LINE;
pub(crate) use stats::LogStats;

use crate::{Config, Error};

/// The smallest [`Config::log_file_size`]: 64 KiB (a line of
/// [`MAX_LOG_LINE`] fits in any file).
pub const MIN_LOG_FILE_SIZE: u64 = 64 * 1024;
/// The `target` of the lines the master writes into the log files.
pub(crate) const LOG_TARGET: &str = "tandem_cluster::logs";
/// How long the writer lets output gather after each batch: lines reach
/// their file within about this long, and a child printing 10k lines/s
/// costs the writer 100 wake-ups a second, not 10k.
const BATCH_PAUSE: Duration = Duration::from_millis(10);
/// How long a stopping master waits for the last lines of its children.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks the log limits: a file at least [`MIN_LOG_FILE_SIZE`], a quota of
/// at least two files.
pub(crate) fn check_limits(file_size: u64, quota: u64) -> Result<(), Error> {
    let problem = if file_size < MIN_LOG_FILE_SIZE {
        format!("the log file size is {file_size} bytes, under the minimum of {MIN_LOG_FILE_SIZE}")
    } else if quota / 2 < file_size {
        format!("the log quota ({quota} bytes) must hold at least two files of {file_size} bytes")
    } else {
        return Ok(());
    };
    Err(Error::InvalidLogLimits { problem })
}

/// The master's log capture: a cheap handle on the writer thread and the readers.
#[derive(Debug, Clone)]
pub(crate) struct Logs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// The readers' end of the queue to the writer; taken at `finish` (the
    /// writer ends once the readers' clones are gone too).
    queue: Mutex<Option<queue::Queue>>,
    stats: Arc<LogStats>,
    readers: TaskTracker,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Logs {
    /// Starts the capture of the cluster `name` when `config` asks for one:
    /// checks (or creates) the directories, takes over the files already
    /// there, and starts the writer thread.
    pub(crate) fn start(config: &Config, name: &str) -> Result<Option<Logs>, Error> {
        let Some(base) = &config.log_dir else { return Ok(None) };
        check_limits(config.log_file_size, config.log_quota)?;
        let base = std::path::absolute(base).unwrap_or_else(|_| base.clone());
        let refused = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::LogDir { path, source }
        };
        use crate::runtime_dir::{Openness, ensure_own_dir};
        ensure_own_dir(&base, Openness::NotWritableByOthers, true).map_err(refused(&base))?;
        let dir = base.join(name);
        ensure_own_dir(&dir, Openness::NotWritableByOthers, false).map_err(refused(&dir))?;
        let stats = Arc::new(LogStats::default());
        let limits = writer::Limits { file_size: config.log_file_size, quota: config.log_quota };
        let mut writer =
            writer::Writer::open(&dir, limits, crate::trace::json_logs(), Arc::clone(&stats)).map_err(refused(&dir))?;
        let (queue, mut receiver) = queue::queue(queue::QUEUE_BYTES);
        let span = tracing::Span::current();
        let thread = {
            std::thread::Builder::new()
                .name("tandem-logs".into())
                .spawn(move || {
                    let _span = span.enter();
                    while let Some(batch) = receiver.take() {
                        writer.write_batch(batch);
                        std::thread::sleep(BATCH_PAUSE);
                    }
                })
                .map_err(refused(&dir))?
        };
        tracing::debug!(dir = %dir.display(), file_size = limits.file_size, quota = limits.quota, "capturing the children's output");
        Ok(Some(Logs {
            inner: Arc::new(Inner {
                dir,
                queue: Mutex::new(Some(queue)),
                stats,
                readers: TaskTracker::new(),
                writer: Mutex::new(Some(thread)),
            }),
        }))
    }

    /// The cluster's log directory (`<log_dir>/<name>`).
    pub(crate) fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn stats(&self) -> &LogStats {
        &self.inner.stats
    }

    /// Reads a new child's stdout and stderr into the file `<stem>.log`
    /// (`agent`, `worker-3`) until both close.
    pub(crate) fn capture(
        &self,
        stem: &str,
        stdout: Option<tokio::process::ChildStdout>,
        stderr: Option<tokio::process::ChildStderr>,
    ) {
        use std::os::fd::AsRawFd;
        let process: Arc<str> = Arc::from(stem);
        // Only the master's loop takes this lock (here and at `finish`).
        let Some(queue) = self.inner.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() else {
            return;
        };
        let dropped = self.inner.stats.counter(stem, stats::DropReason::BufferFull);
        let span = tracing::debug_span!("log capture", process = stem);
        if let Some(out) = stdout {
            queue::enlarge_pipe(out.as_raw_fd());
            let task = queue::read_lines(out, Arc::clone(&process), queue.clone(), Arc::clone(&dropped));
            self.inner.readers.spawn(task.instrument(span.clone()));
        }
        if let Some(err) = stderr {
            queue::enlarge_pipe(err.as_raw_fd());
            let task = queue::read_lines(err, process, queue, dropped);
            self.inner.readers.spawn(task.instrument(span));
        }
    }

    /// At the master's exit: waits (briefly) for the children's last lines,
    /// then for the writer to write them.
    pub(crate) async fn finish(&self) {
        self.inner.readers.close();
        if tokio::time::timeout(FINISH_TIMEOUT, self.inner.readers.wait()).await.is_err() {
            // A grandchild holds a pipe open: its lines are not waited for.
            tracing::debug!("some child output pipes are still open at exit");
        }
        // The last sender: the writer ends once it has written what is queued.
        drop(self.inner.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        let thread = self.inner.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(FINISH_TIMEOUT, joined).await.is_err() {
                tracing::warn!("the log writer did not finish in time; the last lines may be missing");
            }
        }
    }
}

/// The file stem of a process: `agent` or `worker-<K>`.
pub(crate) fn stem(role: crate::ProcessRole, worker: Option<crate::WorkerId>) -> String {
    match (role, worker) {
        (crate::ProcessRole::Worker, Some(id)) => format!("worker-{id}"),
        _ => "agent".to_owned(),
    }
}
