//! The election's lock files: taking `<name>.lock`, taking a hung leader's
//! place with a new one, and the fence that tells a leader it was replaced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::epoch::read_epoch;
use super::*;

/// A file's identity: (device, inode).
pub(super) type FileId = (u64, u64);

/// A hung leader's place, taken: the new lock file (locked, and its identity)
/// and the takeover lock, held until the new epoch is stored.
type Takeover = (Flock<File>, FileId, Flock<File>);

/// The identity of the file `path` names now (not following a symlink).
pub(super) fn file_id(path: &Path) -> io::Result<FileId> {
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

impl Standalone {
    /// Takes the election lock if it is free. A lock taken on a file that a
    /// takeover has since replaced is worth nothing: it is let go, and the
    /// file now at the path is tried instead.
    pub(super) fn try_lock(&self) -> Result<Option<(Flock<File>, FileId)>, StartupError> {
        let path = self.lock_path();
        let io = |source| StartupError::Io { path: path.clone(), source };
        for _ in 0..3 {
            let file =
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, errno)) => return Err(io(io::Error::from(errno))),
            };
            let locked = lock.metadata().map(|m| (m.dev(), m.ino())).map_err(io)?;
            match file_id(&path) {
                Ok(now) if now == locked => return Ok(Some((lock, locked))),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        // Replaced three times while we looked: someone is taking over; not us.
        Ok(None)
    }

    /// Takes the place of the leader at `epoch`, which holds the lock but was
    /// given up for hung: a new lock file (locked first) replaces the old one,
    /// so the old leader's fence sees the file it locked is gone. `None` when
    /// that leader is no longer the one to replace (another process took over,
    /// or it exited and the lock is simply free: the caller elects as usual).
    ///
    /// The third item is the takeover lock: hold it until the new epoch is
    /// stored, so the next process to get it sees the epoch moved on.
    pub(super) fn take_over(&self, epoch: u64) -> io::Result<Option<Takeover>> {
        let path = self.dir.join(format!("{}.takeover", self.name));
        // Plain I/O errors, retried by the driver (with a WARN if they last).
        let io =
            |path: &Path, source: io::Error| io::Error::new(source.kind(), format!("{}: {source}", path.display()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        // One process at a time; the others find the epoch moved on when they get it.
        let turn = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(turn) => turn,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                // Its socket may not be there yet: retry soon rather than reach the hung one.
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another process is taking the hung leader's place",
                ));
            }
            Err((_, errno)) => return Err(io(&path, io::Error::from(errno))),
        };
        if self.stored_epoch() != epoch {
            return Ok(None);
        }
        let lock_path = self.lock_path();
        let fresh = self.dir.join(format!("{}.lock.{}", self.name, std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&fresh)
            .map_err(|e| io(&fresh, e))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, errno)) => {
                let _ = std::fs::remove_file(&fresh);
                return Err(io(&fresh, io::Error::from(errno)));
            }
        };
        let id = lock.metadata().map(|m| (m.dev(), m.ino())).map_err(|e| io(&fresh, e))?;
        if let Err(e) = std::fs::rename(&fresh, &lock_path) {
            let _ = std::fs::remove_file(&fresh);
            return Err(io(&lock_path, e));
        }
        Ok(Some((lock, id, turn)))
    }
}

/// The fence of the leader elected at `epoch` with the lock file `lock_id`:
/// it still holds its place while `<name>.lock` is that file and no later
/// epoch was stored. A lock file that is gone counts as lost (the directory
/// was cleaned up under a live leader); an error reading it does not.
pub(super) fn still_leader(
    lock_path: PathBuf,
    lock_id: FileId,
    epoch_file: PathBuf,
    epoch: u64,
) -> impl Fn() -> bool + Send + Sync {
    move || {
        let lock_held = match file_id(&lock_path) {
            Ok(id) => id == lock_id,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        };
        lock_held && read_epoch(&epoch_file).map_or(true, |stored| stored <= epoch)
    }
}
