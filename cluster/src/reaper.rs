//! The master as a container's init (PID 1): every process of the container
//! whose parent dies is re-parented to it, and stays a zombie once it exits
//! until its new parent reaps it. The master reaps those orphans.
//!
//! It leaves alone the children somebody in the master waits for (its own
//! children are reaped by their waiter tasks at once; a master function's
//! `Command::status()` reaps its own): only a zombie still there half a second
//! after it was first seen is reaped. So an orphan's zombie lasts at most
//! about a second. The limit, documented in `docs/production.md`: a child of
//! the master function left a zombie for longer than that before its waiter
//! waits (a shell whose background job holds its stdout open under
//! `Command::output()`) is reaped here, and that wait fails with `ECHILD`.
//! SIGTERM and SIGINT need no forwarding: they are the master's own stop,
//! which stops the workers, then the agent, in order.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the master looks for zombies, and how long one must have been
/// one before it is reaped.
const SCAN_EVERY: Duration = Duration::from_millis(500);

/// Reaps orphaned zombies when this process is PID 1 (in a container or a
/// new PID namespace), until `cancel`.
pub(crate) fn spawn_if_init(tasks: &TaskTracker, cancel: CancellationToken) {
    if std::process::id() != 1 {
        return;
    }
    tracing::info!(every = ?SCAN_EVERY, "running as PID 1: the master reaps the container's orphaned processes");
    tasks.spawn(async move {
        let me = nix::unistd::getpid().as_raw();
        let mut first_seen: HashMap<i32, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(SCAN_EVERY);
        let mut reaped: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            let now = Instant::now();
            let zombies = match zombie_children(me) {
                Ok(zombies) => zombies,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read /proc to find orphaned zombies; stopped reaping them");
                    return;
                }
            };
            first_seen.retain(|pid, _| zombies.contains(pid));
            for pid in zombies {
                let since = *first_seen.entry(pid).or_insert(now);
                if now.duration_since(since) < SCAN_EVERY {
                    continue;
                }
                let flags = Some(nix::sys::wait::WaitPidFlag::WNOHANG);
                match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), flags) {
                    Ok(status) => {
                        reaped += 1;
                        first_seen.remove(&pid);
                        tracing::debug!(pid, ?status, reaped, "reaped an orphaned process");
                    }
                    // Somebody else reaped it meanwhile.
                    Err(nix::errno::Errno::ECHILD) => {
                        first_seen.remove(&pid);
                    }
                    Err(e) => tracing::debug!(pid, error = %e, "could not reap an orphan"),
                }
            }
        }
    });
}

/// The pids of this process's children that are zombies, from `/proc`.
fn zombie_children(parent: i32) -> std::io::Result<Vec<i32>> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // A process that is gone by now is simply not a zombie any more.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if let Some((state, ppid)) = state_and_parent(&stat)
            && state == 'Z'
            && ppid == parent
        {
            zombies.push(pid);
        }
    }
    Ok(zombies)
}

/// `(state, ppid)` from a `/proc/<pid>/stat` line: `pid (comm) S ppid ...`,
/// where `comm` may hold spaces and parentheses (so: after the last `)`).
fn state_and_parent(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_and_parent_are_read_after_the_command_name() {
        assert_eq!(state_and_parent("42 (sleep) Z 1 42 42 0 -1"), Some(('Z', 1)));
        assert_eq!(state_and_parent("42 (a) b) (c) S 7 42"), Some(('S', 7)));
        assert_eq!(state_and_parent("garbage"), None);
        assert_eq!(state_and_parent("1 (x) R notanumber"), None);
    }

    #[test]
    fn a_zombie_child_is_found_until_it_is_reaped() {
        let me = nix::unistd::getpid().as_raw();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Bounded: `true` exits at once; a zombie appears within a few ms.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !zombie_children(me).unwrap().contains(&pid) {
            assert!(std::time::Instant::now() < deadline, "no zombie within 10 s");
            std::thread::yield_now();
        }
        child.wait().unwrap();
        assert!(!zombie_children(me).unwrap().contains(&pid));
    }
}
