//! The master's file descriptors: the limit raised at start, a reserve kept
//! for spawning, and which spawn errors are transient.
//!
//! A full descriptor table must never stop supervision. Connections held on a
//! listener the master owns (the metrics endpoint, the embedded services of
//! the application's master function) can take every descriptor; the master
//! then still needs a handful to start a child (two socketpairs, the exec
//! status pipe, `/dev/null` for stdin, a pidfd). So:
//!
//! ```text
//! start:    soft RLIMIT_NOFILE -> hard limit (INFO: from -> to); children inherit it
//!           open RESERVE x /dev/null
//! spawn:    EMFILE/ENFILE -> close the reserve, spawn again, reopen the reserve
//! spawn:    still EMFILE/ENFILE/EAGAIN/ENOMEM -> transient: retried with a capped
//!           backoff, never counted towards the crash-loop limit
//! ping tick: reopen what of the reserve is missing
//! ```

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tandem_protocol::internal::{Backoff, Jitter};

/// Descriptors held in reserve: more than one spawn needs (see the module docs).
pub(crate) const RESERVE: usize = 16;

/// The master's reserve. The descriptor table is the process's, so is its
/// reserve: the master's loop spawns with it, and the control socket's accept
/// loop takes one from it ([`release_one_for`]) so that `tandem` still gets
/// an answer. Empty until the master fills it; children never do.
static MASTER_RESERVE: Mutex<Reserve> = Mutex::new(Reserve { held: Vec::new(), size: RESERVE });

/// The master's reserve (see [`MASTER_RESERVE`]).
pub(crate) fn master_reserve() -> MutexGuard<'static, Reserve> {
    MASTER_RESERVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When `error` is a full descriptor table, closes one descriptor of the
/// master's reserve so that the caller's next try (an `accept`) can succeed;
/// returns whether one was closed. The master's loop reopens it later.
pub(crate) fn release_one_for(error: &io::Error) -> bool {
    is_fd_exhaustion(error) && master_reserve().held.pop().is_some()
}

/// Descriptors the master holds only to give them back when the table is full.
#[derive(Debug)]
pub(crate) struct Reserve {
    held: Vec<OwnedFd>,
    size: usize,
}

impl Reserve {
    /// Opens up to `size` descriptors on `/dev/null` (fewer when the table is
    /// already full: [`refill`](Self::refill) completes it later).
    #[cfg(test)]
    pub(crate) fn new(size: usize) -> Self {
        let mut reserve = Reserve { held: Vec::with_capacity(size), size };
        reserve.refill();
        reserve
    }

    /// Opens what is missing; returns how many are held.
    pub(crate) fn refill(&mut self) -> usize {
        while self.held.len() < self.size {
            // std opens with O_CLOEXEC: no child inherits them.
            match File::open("/dev/null") {
                Ok(file) => self.held.push(OwnedFd::from(file)),
                Err(_) => break,
            }
        }
        self.held.len()
    }

    /// Closes every held descriptor; returns how many.
    pub(crate) fn release(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        n
    }

    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }
}

/// Whether `error` says the descriptor table (the process's or the system's) is full.
pub(crate) fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether a spawn that failed with `error` may succeed later by itself: the
/// process is out of a resource (descriptors, processes, memory), not broken.
pub(crate) fn is_transient(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM))
}

/// The first retry after a spawn failed for a transient lack of resources.
pub(crate) const TRANSIENT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest wait between such retries: a slot recovers within this of the resource freeing.
pub(crate) const TRANSIENT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The waits between attempts after spawns failed for a transient lack of
/// resources: 100 ms, doubling, at most 1 s (exact: no jitter, a slot's own pauses).
pub(crate) fn transient_backoff() -> Backoff {
    Backoff::new(TRANSIENT_RETRY_FIRST, TRANSIENT_RETRY_MAX).jitter(Jitter::Symmetric(0.0))
}

/// What [`raise_nofile_limit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Raised {
    /// The soft limit was raised `from` -> `to` (the hard limit).
    Raised { from: u64, to: u64 },
    /// The soft limit already was the hard limit.
    AtHard(u64),
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as servers commonly do:
/// the soft limit (often 1024) is a default for programs that use `select(2)`;
/// tokio uses epoll. Children started afterwards inherit the raised limit:
/// they run the same program.
pub(crate) fn raise_nofile_limit() -> io::Result<Raised> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let (from, to) = (limit.rlim_cur, limit.rlim_max);
    if from >= to {
        return Ok(Raised::AtHard(from));
    }
    let raised = libc::rlimit { rlim_cur: to, rlim_max: to };
    // SAFETY: setrlimit reads one `rlimit` through a valid pointer to a local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(Raised::Raised { from, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_and_resource_errors_are_transient_and_others_are_not() {
        let e = io::Error::from_raw_os_error;
        for errno in [libc::EMFILE, libc::ENFILE, libc::EAGAIN, libc::ENOMEM] {
            assert!(is_transient(&e(errno)), "{errno}");
        }
        assert!(is_fd_exhaustion(&e(libc::EMFILE)) && is_fd_exhaustion(&e(libc::ENFILE)));
        assert!(!is_fd_exhaustion(&e(libc::EAGAIN)) && !is_fd_exhaustion(&e(libc::ENOMEM)));
        // A missing or unrunnable executable, a refused permission: broken, not busy.
        for errno in [libc::ENOENT, libc::EACCES, libc::ENOEXEC, libc::EPERM, libc::ESRCH] {
            assert!(!is_transient(&e(errno)), "{errno}");
        }
        assert!(!is_transient(&io::Error::other("the child exited before its pid could be read")));
    }

    #[test]
    fn transient_retries_back_off_to_a_one_second_cap() {
        let mut backoff = transient_backoff();
        let ms: Vec<u128> = (1..=7).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), TRANSIENT_RETRY_FIRST);
    }

    #[test]
    fn the_reserve_holds_its_descriptors_releases_them_and_refills() {
        let mut reserve = Reserve::new(4);
        assert_eq!(reserve.held(), 4);
        let fds: Vec<i32> = reserve.held.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        for fd in &fds {
            // Open, and closed on exec.
            let flags = nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert!(flags & libc::FD_CLOEXEC != 0);
        }
        assert_eq!(reserve.release(), 4);
        assert_eq!(reserve.held(), 0);
        assert_eq!(reserve.refill(), 4);
    }
}
