//! The hot standby: the `<name>.standby` lock, and the grace the other
//! followers give the standby to take over first.

use std::fs::OpenOptions;
use std::io;

use nix::fcntl::{Flock, FlockArg};

use super::*;

/// How long a follower that finds the leader gone waits, while a hot standby
/// is alive, before competing for the lock itself: the standby competes at
/// once, and wins unless it is dead or stuck (50 ms).
pub const STANDBY_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// How often, during [`STANDBY_GRACE`], a follower tries the leader's socket
/// again (the standby's new leader binds it).
const STANDBY_POLL: std::time::Duration = std::time::Duration::from_millis(1);

impl Standalone {
    /// Takes the standby lock if it is free: this process becomes the hot
    /// standby. Returns whether this process is the standby now.
    pub(super) fn try_standby(&mut self) -> Result<bool, StartupError> {
        if self.standby.is_some() {
            return Ok(true);
        }
        let path = self.dir.join(format!("{}.standby", self.name));
        let io = |source| StartupError::Io { path: path.clone(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                tracing::info!(name = %self.name, "this process is the hot standby: it mirrors the leader");
                self.standby = Some(lock);
                Ok(true)
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(false),
            Err((_, errno)) => Err(io(io::Error::from(errno))),
        }
    }

    /// Follows the leader as soon as one answers, for up to [`STANDBY_GRACE`]:
    /// the standby's leader binds within milliseconds. `None` when none answered.
    pub(super) async fn follow_within_grace(&mut self) -> Option<Connected> {
        let grace_ends = tokio::time::Instant::now() + STANDBY_GRACE;
        loop {
            if let Ok(connected) = self.follow().await {
                return Some(connected);
            }
            if tokio::time::Instant::now() >= grace_ends {
                return None;
            }
            tokio::time::sleep(STANDBY_POLL).await;
        }
    }
}
