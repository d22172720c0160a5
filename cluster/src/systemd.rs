//! systemd integration, with no systemd library: the master's readiness,
//! reloads, stop and status as `sd_notify(3)` datagrams on `NOTIFY_SOCKET`,
//! the watchdog (`WATCHDOG_USEC`), and listeners handed over by socket
//! activation (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, see
//! `sd_listen_fds(3)`).
//!
//! The notifications follow the cluster's events: `READY=1` once the cluster
//! is ready, `RELOADING=1` when a reload begins and `READY=1` when it ends
//! (done or rolled back), `STOPPING=1` when the stop begins, and a `STATUS=`
//! line on each change. The watchdog is fed only while the master's loop
//! answers, so a master that hangs is restarted by systemd.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::MasterHandle;
use crate::events::ClusterEvent;

/// The variables systemd sets for the service's main process; the master
/// removes them from its children's environment (they are not for them).
pub(crate) const ENV: [&str; 6] =
    ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The first descriptor socket activation passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// More passed descriptors than this is a broken environment, not a service.
const MAX_LISTEN_FDS: usize = 1024;

/// The socket named by `NOTIFY_SOCKET`.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Whether a failed send was logged already (WARN once).
    warned: AtomicBool,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for: `None` when it is unset, or
    /// (with one WARN) when it is not a Unix socket path or abstract name.
    pub(crate) fn from_env() -> Option<Notifier> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::to(&value) {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::warn!(NOTIFY_SOCKET = ?value, error = %e,
                    "NOTIFY_SOCKET is not a socket this master can notify; systemd gets no readiness from it");
                None
            }
        }
    }

    fn to(value: &std::ffi::OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(value))?,
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])?
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither an absolute path nor an abstract name (@...)",
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, addr, warned: AtomicBool::new(false) })
    }

    /// Sends one notification (`KEY=VALUE` lines). Never blocks; a failure is
    /// logged at WARN the first time, DEBUG after.
    pub(crate) fn notify(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            if self.warned.swap(true, Ordering::Relaxed) {
                tracing::debug!(error = %e, state, "could not notify systemd");
            } else {
                tracing::warn!(error = %e, state, "could not notify systemd (NOTIFY_SOCKET); later failures at DEBUG");
            }
        }
    }
}

/// What to tell systemd about an event: the notification, if any.
pub(crate) fn notification(event: &ClusterEvent) -> Option<String> {
    let state = match event {
        ClusterEvent::ClusterReady { agent, workers, failed, .. } => {
            let failed = if failed.is_empty() { String::new() } else { format!(", {} failed", failed.len()) };
            format!("READY=1\nSTATUS=ready: agent {agent}, {} workers{failed}", workers.len())
        }
        ClusterEvent::ReloadStarted { workers } => {
            format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading {} workers", monotonic_usec(), workers.len())
        }
        ClusterEvent::AgentReloadStarted { pid, epoch } => {
            format!(
                "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the agent {pid} (epoch {epoch})",
                monotonic_usec()
            )
        }
        ClusterEvent::ReloadDone { workers } => format!("READY=1\nSTATUS=reloaded: {} workers", workers.len()),
        ClusterEvent::AgentReloaded { new, epoch, .. } => {
            format!("READY=1\nSTATUS=agent reloaded: {new} (epoch {epoch})")
        }
        ClusterEvent::ReloadFailed { reason } => format!("READY=1\nSTATUS=reload failed, rolled back: {reason}"),
        ClusterEvent::ShutdownStarted { forced } => {
            format!("STOPPING=1\nSTATUS=stopping{}", if *forced { " (forced)" } else { "" })
        }
        ClusterEvent::AgentRestarted { pid, epoch } => format!("STATUS=agent restarted: {pid} (epoch {epoch})"),
        ClusterEvent::Scaled { from, to, .. } => format!("STATUS=scaled from {from} to {to} workers"),
        ClusterEvent::ScaleFailed { reason } => format!("STATUS=scale failed: {reason}"),
        ClusterEvent::WorkerRestarted { id, pid } => format!("STATUS=worker {id} restarted: {pid}"),
        ClusterEvent::SlotFailed { role, worker_id, failures, retry_after } => {
            let which = worker_id.map_or_else(|| role.to_string(), |id| format!("{role} {id}"));
            format!("STATUS={which} crash-looping ({failures} failures), next try in {retry_after:?}")
        }
        ClusterEvent::Hung { process, silent_for } => format!("STATUS={process} not answering for {silent_for:?}"),
        ClusterEvent::MemoryLimit { role, worker_id, pid, rss, limit } => {
            let which = worker_id.map_or_else(|| role.to_string(), |id| format!("{role} {id}"));
            format!("STATUS={which} ({pid}) over its memory limit ({rss} > {limit} bytes); replacing it")
        }
        _ => return None,
    };
    Some(state)
}

/// `CLOCK_MONOTONIC` in microseconds, which systemd wants with `RELOADING=1`.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return 0;
    }
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
}

/// The watchdog interval systemd asks for: half of `WATCHDOG_USEC`, when
/// `WATCHDOG_PID` is unset or names this process.
fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|&u| u > 0)?;
    // Half the period, but never zero (a zero interval is no timer at all).
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Notifies systemd of the cluster's events and feeds its watchdog while the
/// master's loop answers, until `cancel`.
pub(crate) fn spawn(
    notifier: Notifier,
    mut events: broadcast::Receiver<ClusterEvent>,
    handle: MasterHandle,
    tasks: &TaskTracker,
    cancel: CancellationToken,
) {
    notifier.notify(&format!("MAINPID={}", std::process::id()));
    let watchdog = watchdog_interval();
    if let Some(every) = watchdog {
        tracing::info!(every = ?every, "feeding the systemd watchdog while the master answers");
    }
    tasks.spawn(async move {
        let mut tick = watchdog.map(tokio::time::interval);
        let mut silent = false;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        if let Some(state) = notification(&event) {
                            notifier.notify(&state);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = async { tick.as_mut().expect("guarded").tick().await }, if tick.is_some() => {
                    let every = watchdog.unwrap_or_default();
                    match tokio::time::timeout(every, handle.snapshot()).await {
                        Ok(Ok(_)) => {
                            if silent {
                                tracing::info!("the master answers again; feeding the systemd watchdog");
                            }
                            silent = false;
                            notifier.notify("WATCHDOG=1");
                        }
                        _ if !silent => {
                            silent = true;
                            tracing::warn!(within = ?every,
                                "the master's loop did not answer; the systemd watchdog is not fed");
                        }
                        _ => {}
                    }
                }
                _ = cancel.cancelled() => return,
            }
        }
    });
}

/// Listening sockets passed by socket activation, by name.
#[derive(Debug, Default)]
pub(crate) struct Activated {
    sockets: HashMap<String, OwnedFd>,
}

/// Whether the activation variables were read (they describe descriptors of
/// this process, which may be owned once).
static TAKEN: AtomicBool = AtomicBool::new(false);

impl Activated {
    /// The sockets `LISTEN_FDS` passes to this process (`LISTEN_PID`), named
    /// by `LISTEN_FDNAMES`. Empty when the variables are unset or for another
    /// process. Each descriptor must be a listening stream socket. Read once
    /// per process; later calls find nothing.
    pub(crate) fn from_env() -> Result<Activated, crate::Error> {
        let (Ok(pid), Ok(count)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
            return Ok(Activated::default());
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) || TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(Activated::default());
        }
        let bad = |why: String| crate::Error::SocketActivation(why);
        let count: usize = count.parse().map_err(|_| bad(format!("LISTEN_FDS={count:?} is not a count")))?;
        if count > MAX_LISTEN_FDS {
            return Err(bad(format!("LISTEN_FDS={count} is more than {MAX_LISTEN_FDS}")));
        }
        let names: Vec<String> = match std::env::var("LISTEN_FDNAMES") {
            Ok(names) => names.split(':').map(str::to_owned).collect(),
            Err(_) => Vec::new(),
        };
        if names.len() != count {
            return Err(bad(format!(
                "LISTEN_FDNAMES names {} sockets but LISTEN_FDS passes {count}: name each socket \
                 (FileDescriptorName= in the .socket unit) after the listener it is",
                names.len()
            )));
        }
        let mut sockets = HashMap::new();
        for (i, name) in names.into_iter().enumerate() {
            let fd = LISTEN_FDS_START + i32::try_from(i).expect("at most MAX_LISTEN_FDS");
            check_listening(fd).map_err(|e| bad(format!("descriptor {fd} ({name}): {e}")))?;
            // SAFETY: systemd passed descriptors LISTEN_FDS_START.. to this
            // process (LISTEN_PID is ours), TAKEN makes sure they are owned
            // once, and check_listening proved each is an open socket.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            nix::fcntl::fcntl(owned.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
                .map_err(|e| bad(format!("descriptor {fd} ({name}): set close-on-exec: {e}")))?;
            if sockets.insert(name.clone(), owned).is_some() {
                return Err(bad(format!("LISTEN_FDNAMES names two sockets {name:?}")));
            }
        }
        Ok(Activated { sockets })
    }

    /// The socket passed under `name`, taken.
    pub(crate) fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.sockets.remove(name)
    }

    /// The names of the sockets nobody took.
    pub(crate) fn leftover(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sockets.keys().cloned().collect();
        names.sort();
        names
    }
}

fn check_listening(fd: RawFd) -> io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt};
    let stat = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket"));
    }
    // SAFETY: fstat proved the descriptor open; the borrow lasts for these checks only.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if getsockopt(&borrowed, sockopt::SockType).map_err(io::Error::from)? != nix::sys::socket::SockType::Stream {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a stream socket"));
    }
    if !getsockopt(&borrowed, sockopt::AcceptConn).map_err(io::Error::from)? {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not listening"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_notifications() {
        let ready = ClusterEvent::ClusterReady { master: 1, agent: 2, workers: vec![3, 4], failed: vec![] };
        assert_eq!(notification(&ready).unwrap(), "READY=1\nSTATUS=ready: agent 2, 2 workers");
        let reload = notification(&ClusterEvent::ReloadStarted { workers: vec![1, 2] }).unwrap();
        assert!(reload.starts_with("RELOADING=1\nMONOTONIC_USEC=") && reload.ends_with("STATUS=reloading 2 workers"));
        let failed = notification(&ClusterEvent::ReloadFailed { reason: "worker 1 did not start".into() }).unwrap();
        assert_eq!(failed, "READY=1\nSTATUS=reload failed, rolled back: worker 1 did not start");
        let stop = notification(&ClusterEvent::ShutdownStarted { forced: false }).unwrap();
        assert_eq!(stop, "STOPPING=1\nSTATUS=stopping");
        let scaled = ClusterEvent::Scaled { from: 2, to: 4, workers: vec![3, 4, 5, 6] };
        assert_eq!(notification(&scaled).unwrap(), "STATUS=scaled from 2 to 4 workers");
        assert!(notification(&ClusterEvent::WorkerReady { id: 1, pid: 3 }).is_none());
    }

    #[test]
    fn a_notifier_sends_datagrams_to_a_path_and_refuses_what_is_not_a_socket_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to(path.as_os_str()).unwrap();
        notifier.notify("READY=1");
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(Notifier::to(std::ffi::OsStr::new("relative/path")).is_err());
        assert!(Notifier::to(std::ffi::OsStr::new("")).is_err());
        // Nobody listening: logged, never a panic or a block.
        drop(systemd);
        notifier.notify("STATUS=gone");
    }
}
