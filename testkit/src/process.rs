//! Stopping what a test spawned, by pid, and asking whether a pid is alive.

use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Stops and reaps a child process of this test, by pid: SIGTERM, then SIGKILL
/// if it still runs after `grace` (at once for a zero `grace`). A child that
/// already exited is only reaped, and one already reaped (no longer ours, so
/// its pid may be someone else's) is left alone.
pub fn stop(pid: impl Into<i64>, grace: Duration) {
    let pid = Pid::from_raw(i32::try_from(pid.into()).expect("a pid"));
    let running = || matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive));
    if !running() {
        return;
    }
    if !grace.is_zero() {
        let _ = kill(pid, Signal::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if !running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = kill(pid, Signal::SIGKILL);
    // Reap it so no zombie outlives the test.
    let _ = waitpid(pid, None);
}

/// A spawned child, [stopped](stop) and reaped when dropped, pass or fail.
#[derive(Debug)]
pub struct ProcessGuard {
    child: Child,
    grace: Duration,
}

impl ProcessGuard {
    /// Guards `child`: SIGKILLed when dropped.
    pub fn new(child: Child) -> ProcessGuard {
        ProcessGuard::with_grace(child, Duration::ZERO)
    }

    /// Guards `child`: sent SIGTERM when dropped, and SIGKILL if it still runs after `grace`.
    pub fn with_grace(child: Child, grace: Duration) -> ProcessGuard {
        ProcessGuard { child, grace }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, to wait for it or take its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // exited and reaped: the pid may belong to someone else now
        }
        stop(self.child.id(), self.grace);
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: impl Into<i64>) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.into())) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_guard_kills_and_reaps_its_child() {
        let guard = ProcessGuard::new(Command::new("sleep").arg("60").spawn().expect("spawn sleep"));
        let pid = guard.id();
        assert!(alive(pid));
        drop(guard);
        assert!(!alive(pid), "killed and reaped, not a zombie");
    }

    #[test]
    fn stop_asks_with_sigterm_first() {
        // A shell that exits 0 on SIGTERM: stopped within the grace, not killed.
        let mut child = Command::new("sh")
            .args(["-c", "trap 'exit 0' TERM; echo trapped; while :; do sleep 0.05; done"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        // It says so once the trap is installed.
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "trapped");
        let started = Instant::now();
        stop(child.id(), Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
        assert!(!alive(child.id()));
        // Reaped by `stop`: the Child can no longer wait for it.
        assert!(child.try_wait().is_err());
    }
}
