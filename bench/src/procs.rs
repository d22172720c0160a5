//! The processes the coordinator spawns, and what it reads about them.
//!
//! Every child is the bench itself (`current_exe`) with a hidden role
//! subcommand. [`Procs`] owns their handles and kills (SIGKILL) and reaps every
//! one still running when it is dropped, on success and on error alike; a
//! child also dies with its parent (PR_SET_PDEATHSIG) and exits when its
//! control channel closes.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokio::sync::oneshot;

use crate::control;

#[derive(Default)]
pub struct Procs {
    children: Vec<Child>,
}

impl Procs {
    /// Starts `current_exe <args>` with the control socket in its environment; returns its pid.
    pub fn spawn(&mut self, control: &Path, args: &[OsString]) -> Result<u32> {
        let exe = std::env::current_exe().context("current_exe")?;
        let child = Command::new(exe)
            .args(args)
            .env(control::ENV, control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {args:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// SIGKILL and reap one child.
    pub fn kill(&mut self, pid: u32) -> Result<()> {
        let i = self.children.iter().position(|c| c.id() == pid).ok_or_else(|| anyhow!("no child {pid}"))?;
        let mut child = self.children.swap_remove(i);
        let killed = child.kill().context("kill");
        child.wait().context("wait")?;
        killed
    }

    /// Reaps children that were told to quit, killing any still running after
    /// `grace`. Async, so the control channel keeps delivering the `Quit`s meanwhile.
    pub async fn reap(&mut self, pids: &[u32], grace: Duration) {
        let deadline = Instant::now() + grace;
        for &pid in pids {
            let Some(i) = self.children.iter().position(|c| c.id() == pid) else { continue };
            let mut child = self.children.swap_remove(i);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGKILL `pid`, a child of our child `parent` (a cluster's agent, whose
/// master the coordinator started): checked first, so a pid the kernel has
/// since reused is never signalled.
pub fn kill_grandchild(pid: u32, parent: u32) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("no process {pid}"))?;
    let ppid: Option<u32> = status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok());
    anyhow::ensure!(ppid == Some(parent), "process {pid} is not a child of {parent} (parent {ppid:?})");
    let pid = libc::pid_t::try_from(pid).context("pid")?;
    // SAFETY: kill(2) with a valid signal number; `pid` is a positive pid checked above.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

/// SIGKILLs our child `pid` at `at_ns` on CLOCK_MONOTONIC, from a thread of
/// its own: the moment then depends on the clock only, not on when the
/// coordinator's one thread gets round to it (which is right after it read
/// some report, so a kill from it would favour a follower that had just
/// written one). The child must stay unreaped until the answer comes, so its
/// pid cannot have been reused.
pub fn kill_at(pid: u32, at_ns: u64) -> Result<oneshot::Receiver<std::io::Result<()>>> {
    let target = libc::pid_t::try_from(pid).context("pid")?;
    let (done, answer) = oneshot::channel();
    std::thread::Builder::new().name("bench-killer".into()).spawn(move || {
        let at = libc::timespec {
            tv_sec: libc::time_t::try_from(at_ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
            tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `at` is a valid timespec; a null remainder is allowed with
        // TIMER_ABSTIME. Interrupted (EINTR), it sleeps again until `at`.
        while unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &at, std::ptr::null_mut()) }
            == libc::EINTR
        {}
        // SAFETY: kill(2) with a valid signal; `target` is an unreaped child (see above).
        let killed = if unsafe { libc::kill(target, libc::SIGKILL) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        let _ = done.send(killed);
    })?;
    Ok(answer)
}

/// Resident set size of a process, in KiB (VmRSS from `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Setup every role process does first: die with the parent, and allow many sockets.
pub fn prepare_role_process() {
    // SAFETY: PR_SET_PDEATHSIG only sets this process's parent-death signal;
    // the extra argument is the signal number, as prctl(2) documents.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if std::os::unix::process::parent_id() == 1 {
        // The parent died before the signal was armed.
        std::process::exit(1);
    }
    raise_fd_limit();
}

/// Raises the soft limit on open files to the hard limit (1,000 follower connections need it).
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit; RLIMIT_NOFILE is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 && limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit whose soft value does not exceed the hard one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// Restricts every thread of `pid` to CPU `cpu`, or (None) gives it back the
/// CPUs the coordinator may use.
pub fn set_affinity(pid: u32, cpu: Option<usize>) -> Result<()> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain old data; all-zero bytes are the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    match cpu {
        // SAFETY: `cpu` is below CPU_SETSIZE on any machine this runs on; `set` is valid.
        Some(cpu) => unsafe { libc::CPU_SET(cpu, &mut set) },
        None => {
            // SAFETY: `set` is a valid, writable cpu_set_t of `size` bytes; 0 means this thread.
            if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
                return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
            }
        }
    }
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).context("list threads")? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<libc::pid_t>() else { continue };
        // SAFETY: `set` is a valid cpu_set_t of `size` bytes; a thread that has
        // exited meanwhile just makes the call fail with ESRCH.
        unsafe { libc::sched_setaffinity(tid, size, &set) };
    }
    Ok(())
}
