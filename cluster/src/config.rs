//! The cluster's settings.

use std::time::Duration;

use crate::{ListenerSpec, RestartPolicy};

/// How the cluster runs. Only the master's values count: children receive
/// what they need from it over IPC.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How many workers to run. The default (`None`) is the number of CPUs this
    /// process may use: `std::thread::available_parallelism`, which on Linux
    /// honours the CPU affinity mask and the cgroup (v1 and v2) CPU quota.
    /// The count at start: [`ClusterControl::scale`](crate::ClusterControl::scale)
    /// (`tandem scale`) changes it while running, from 1 to
    /// [`MAX_WORKERS`](crate::MAX_WORKERS).
    pub workers: Option<usize>,
    /// How long the agent may take to report ready. The default is 30 seconds.
    pub agent_start_timeout: Duration,
    /// How long a worker may take to report ready. The default is 30 seconds.
    pub worker_start_timeout: Duration,
    /// How long workers may take to stop after the stop notice before they are
    /// killed. The default is 5 seconds.
    pub worker_stop_timeout: Duration,
    /// How long the agent may take to stop, once the workers are gone, before it
    /// is killed. The default is 5 seconds.
    pub agent_stop_timeout: Duration,
    /// How dead processes are restarted.
    pub restart: RestartPolicy,
    /// Messages and frames queued in the master per target process; when full,
    /// the sender gets [`Error::QueueFull`](crate::Error::QueueFull) (a link
    /// is closed instead). The default is 1024.
    pub queue_capacity: usize,
    /// The credit window of each link direction: a [`FrameLink`](crate::internal::FrameLink)'s
    /// `tx` may have this many frames the other end has not taken out of its
    /// `rx` yet; beyond that `tx.send` waits (a slow reader slows its writer
    /// down rather than losing the link). Also the frames each end buffers
    /// per direction. At most half of `queue_capacity`. The default is 256.
    pub link_capacity: usize,
    /// Messages buffered per topic subscription; when full, that subscriber
    /// misses messages (logged). The default is 256.
    pub subscription_capacity: usize,
    /// Whether the master prints the status table to stderr when it exits.
    /// The default is true.
    pub status_at_exit: bool,
    /// The listeners the master binds before any child starts and hands to
    /// every worker (see [`Builder::listen`](crate::Builder::listen)). The
    /// default is none.
    pub listeners: Vec<ListenerSpec>,
    /// How many worker slots a reload replaces at once. The default is 1.
    pub reload_parallelism: usize,
    /// A worker whose resident memory (RSS, sampled every second) exceeds this
    /// many bytes is replaced gracefully: its successor is started and ready
    /// before it is drained. The default (`None`) is no limit.
    pub worker_max_memory: Option<u64>,
    /// The same for the agent: it is then stopped and restarted (its Leader
    /// fails over as after a crash, without the crash). A hot standby
    /// ([`standby`](Self::standby)) has the same limit: over it, it is stopped
    /// and restarted under its crash-loop policy. The default is no limit.
    pub agent_max_memory: Option<u64>,
    /// The cluster's name for operators: the `tandem` CLI finds the cluster by
    /// it (see [`control`](crate::control)); two clusters of one user cannot
    /// share it. The default (`None`) is the executable's file name.
    pub name: Option<String>,
    /// Where the master serves `/metrics` (Prometheus text). The default
    /// (`None`) serves no metrics. Port 0 picks a free port:
    /// [`MasterContext::metrics_addr`](crate::MasterContext::metrics_addr) tells which.
    #[cfg(feature = "metrics")]
    pub metrics: Option<std::net::SocketAddr>,
    /// The most connections `/metrics` serves at once; one more is sent a
    /// `503` and closed at once, and counted
    /// (`tandem_metrics_connections_refused_total`), so the endpoint alone
    /// can never take the master's descriptors. The default (`None`) is 64,
    /// or a quarter of the soft open-file limit (`RLIMIT_NOFILE`) when that is
    /// lower.
    #[cfg(feature = "metrics")]
    pub metrics_max_connections: Option<usize>,
    /// How long a connection to `/metrics` has to send a complete request
    /// head, from its accept or, on a kept-alive connection, from the previous
    /// response: a kept-alive connection waiting for its next request is
    /// closed after this too. The default is 5 seconds.
    #[cfg(feature = "metrics")]
    pub metrics_header_timeout: Duration,
    /// How long a connection to `/metrics` may go without moving a byte in
    /// either direction (a client that stops reading its response, a request
    /// body that stalls) before it is closed. The default is 30 seconds.
    #[cfg(feature = "metrics")]
    pub metrics_idle_timeout: Duration,
    /// Environment variables the master sets for every child it starts (the
    /// agent and each worker, restarts and reloads included), on top of its own
    /// environment: how the master hands its children what it decided before
    /// the builder ran (the address of a socket it bound, a generated secret),
    /// with no `std::env::set_var`. Read them in the child with
    /// `std::env::var`. A key that is empty, holds `=` or NUL, or starts with
    /// `TANDEM_` (the cluster's own) makes the master fail at start with
    /// [`Error::InvalidChildEnv`](crate::Error::InvalidChildEnv). The default is none.
    pub child_env: Vec<(String, String)>,
    /// How often the master pings each ready child it watches for hangs (see
    /// `agent_hang_timeout`). The child answers from its tokio runtime, so a
    /// stopped process (SIGSTOP) or a runtime whose threads are all blocked
    /// does not. Zero turns hang detection off for every process. The default
    /// is 1 second.
    pub ping_interval: Duration,
    /// An agent that answers no ping for this long is hung: the master logs it
    /// at ERROR, SIGKILLs it and restarts it as after a crash (a new epoch; the
    /// followers reconnect to the new Leader). It is detected at the next ping,
    /// so within this plus `ping_interval` of its last answer; a value under two
    /// ping intervals is raised to that. `None` turns it off. The default is 3 seconds.
    pub agent_hang_timeout: Option<Duration>,
    /// The same for each worker. The default (`None`) is off: a worker runs
    /// the application's own code, which may block its runtime on purpose;
    /// turn it on when a blocked worker should be replaced.
    pub worker_hang_timeout: Option<Duration>,
    /// Where the master writes the children's output (see
    /// [`Builder::log_dir`](crate::Builder::log_dir)): each child's stdout
    /// and stderr go to `<log_dir>/<name>/agent.log` and `worker-<K>.log`
    /// (`<name>` as `tandem ls` shows it), rotated by size, within a total
    /// quota. The directory is created (mode 0700) if missing; one that is
    /// another user's or writable by group or others makes the master fail
    /// at start with [`Error::LogDir`](crate::Error::LogDir). The default
    /// (`None`) captures nothing: the children write to the master's own
    /// stdout and stderr.
    pub log_dir: Option<std::path::PathBuf>,
    /// The size at which a log file is rotated (`agent.log` becomes
    /// `agent.log.1`, the older ones shift up), in bytes; at least
    /// [`MIN_LOG_FILE_SIZE`](crate::MIN_LOG_FILE_SIZE). The default is 10 MiB.
    pub log_file_size: u64,
    /// The most bytes all the log files of the cluster (`<log_dir>/<name>/`)
    /// may take together, never exceeded: before a write that would pass it,
    /// the oldest rotated files are deleted (and a line says so). At least
    /// two files of `log_file_size`. The default is 100 MiB.
    pub log_quota: u64,
    /// Whether the master keeps a hot standby next to the agent: a second
    /// agent process, started once the agent is ready, that mirrors its
    /// Leader (every followed key with its value, position and upstream
    /// revision; no upstream connection of its own) and, when the agent dies
    /// or hangs, is promoted at the next epoch instead of a cold restart. It
    /// costs one more process and its memory (about the mirrored values).
    /// See `docs/operating.md`, "Hot standby". The default is false.
    pub standby: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: None,
            agent_start_timeout: Duration::from_secs(30),
            worker_start_timeout: Duration::from_secs(30),
            worker_stop_timeout: Duration::from_secs(5),
            agent_stop_timeout: Duration::from_secs(5),
            restart: RestartPolicy::default(),
            queue_capacity: 1024,
            link_capacity: 256,
            subscription_capacity: 256,
            status_at_exit: true,
            listeners: Vec::new(),
            reload_parallelism: 1,
            worker_max_memory: None,
            agent_max_memory: None,
            name: None,
            #[cfg(feature = "metrics")]
            metrics: None,
            #[cfg(feature = "metrics")]
            metrics_max_connections: None,
            #[cfg(feature = "metrics")]
            metrics_header_timeout: Duration::from_secs(5),
            #[cfg(feature = "metrics")]
            metrics_idle_timeout: Duration::from_secs(30),
            child_env: Vec::new(),
            ping_interval: Duration::from_secs(1),
            agent_hang_timeout: Some(Duration::from_secs(3)),
            worker_hang_timeout: None,
            log_dir: None,
            log_file_size: 10 * 1024 * 1024,
            log_quota: 100 * 1024 * 1024,
            standby: false,
        }
    }
}

impl Config {
    /// The link credit window actually used: `link_capacity`, at most half of
    /// `queue_capacity` (so that one link's frames alone never fill a
    /// process's queue in the master), and at least 1.
    pub(crate) fn link_window(&self) -> usize {
        self.link_capacity.min(self.queue_capacity / 2).max(1)
    }

    /// The hang timeout of a process of this slot, when hang detection is on.
    pub(crate) fn hang_timeout(&self, slot: crate::identity::SlotId) -> Option<Duration> {
        if self.ping_interval.is_zero() {
            return None;
        }
        match slot {
            crate::identity::SlotId::Agent | crate::identity::SlotId::Standby => self.agent_hang_timeout,
            crate::identity::SlotId::Worker(_) => self.worker_hang_timeout,
        }
        .filter(|t| !t.is_zero())
    }

    /// Refuses, before anything starts, what the master could not run
    /// with: more than [`MAX_WORKERS`](crate::MAX_WORKERS) workers, log
    /// limits out of range.
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        let workers = self.worker_count();
        if workers > crate::MAX_WORKERS as usize {
            return Err(crate::Error::TooManyWorkers { asked: workers, max: crate::MAX_WORKERS });
        }
        if self.log_dir.is_some() {
            crate::logs::check_limits(self.log_file_size, self.log_quota)?;
        }
        Ok(())
    }

    /// The number of workers to run.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(default_workers)
    }
}

/// The CPUs this process may use (cgroup- and affinity-aware on Linux), at least 1.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
