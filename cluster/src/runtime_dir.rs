//! The master's private runtime directory (mode 0700, unique name, removed at
//! exit), the cluster's random token, and the lock of a cluster's name
//! directory (`<clusters dir>/<name>/`, see [`control`](crate::control)),
//! removed with its directory when its master stops.
//!
//! A master killed with SIGKILL cannot remove its directory, so a starting
//! master removes the leftovers of dead masters of the same user first:
//!
//! ```text
//! <base>/tandem-<cluster>-<pid>-<12 hex>/master.lock   flock(2)-ed by its live master
//! candidate: name of that shape, a real directory (not a symlink), owned by this uid
//!   master.lock present: removed only if the lock can be taken (its master is gone)
//!   master.lock absent (a master between mkdir and lock): removed only if <pid> is dead
//! ```

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rand::RngCore;

/// The file whose lock says the directory's master is alive.
const LOCK_FILE: &str = "master.lock";

/// A directory only this user can enter, removed when dropped.
#[derive(Debug)]
pub(crate) struct RuntimeDir {
    path: PathBuf,
    /// Held while the master lives; the kernel releases it when the master dies.
    _lock: Option<Flock<File>>,
}

impl RuntimeDir {
    /// Creates `tandem-<name>-<pid>-<random>` under `$XDG_RUNTIME_DIR` when it is
    /// a directory owned by this user, else under the temp dir.
    pub(crate) fn create(cluster: &str) -> Result<Self, crate::Error> {
        let base = base_dir();
        remove_stale(&base);
        Self::create_in(&base, cluster).map_err(|source| crate::Error::RuntimeDir { base, source })
    }

    pub(crate) fn create_in(base: &Path, cluster: &str) -> io::Result<Self> {
        let name: String = cluster
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(24)
            .collect();
        let mut suffix = [0u8; 6];
        rand::rngs::OsRng.try_fill_bytes(&mut suffix).map_err(io::Error::other)?;
        let path = base.join(format!("tandem-{name}-{}-{}", std::process::id(), hex(&suffix)));
        // mkdir fails if the path exists (even as a symlink): nobody can pre-plant it.
        DirBuilder::new().mode(0o700).create(&path)?;
        let mut dir = RuntimeDir { path, _lock: None };
        // The umask may have removed bits, never added any; make it exactly 0700.
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))?;
        let file = OpenOptions::new().write(true).create_new(true).open(dir.path.join(LOCK_FILE))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| io::Error::from(errno))?;
        dir._lock = Some(lock);
        Ok(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the runtime directory");
        }
    }
}

/// Takes the exclusive lock of a cluster's name directory: the file `lock`
/// (created 0600) in `dir`, which `prepare` creates first. `Ok(None)`: a live
/// master holds it.
///
/// A stopping master unlinks the lock file (still holding it) and then removes
/// the directory ([`remove_name_dir`]). A master that opened the file just
/// before the unlink would lock a file no longer in the directory: so after
/// locking, the file at `lock`'s path must be the one locked, else (or when the
/// directory vanished under `prepare`) this starts over.
pub(crate) fn lock_name_dir(
    dir: &Path,
    lock: &str,
    prepare: impl Fn() -> io::Result<()>,
) -> io::Result<Option<Flock<File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    const ATTEMPTS: usize = 100;
    let path = dir.join(lock);
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for _ in 0..ATTEMPTS {
        prepare()?;
        let file = match OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path) {
            Ok(file) => file,
            // The directory was removed by the master that stopped: again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last = e;
                continue;
            }
            Err(e) => return Err(e),
        };
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(errno.into()),
        };
        let held = locked.metadata()?;
        match std::fs::symlink_metadata(&path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(Some(locked)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = e,
            Err(e) => return Err(e),
        }
        // Unlinked (and maybe replaced) while we waited: not the name's lock.
    }
    Err(last)
}

/// Removes a stopping master's name directory: unlinks the lock file while
/// `locked` still holds it (see [`lock_name_dir`]), releases the lock, then
/// removes the directory if it is empty. A directory that is not empty (a new
/// master of the same name has already put its own lock file there) stays.
/// Call it after removing the master's other files in `dir`. Best effort: a
/// failure is logged, and the next master of the name takes the leftovers over.
pub(crate) fn remove_name_dir(dir: &Path, lock: &str, locked: Flock<File>) {
    match std::fs::remove_file(dir.join(lock)) {
        Ok(()) => {}
        Err(e) => {
            tracing::debug!(path = %dir.display(), error = %e, "could not remove the name's lock file");
            return;
        }
    }
    drop(locked);
    match std::fs::remove_dir(dir) {
        Ok(()) => tracing::debug!(path = %dir.display(), "removed the cluster's name directory"),
        // Another master of this name took it meanwhile, or it is gone already.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOENT)) => {}
        Err(e) => tracing::warn!(path = %dir.display(), error = %e, "could not remove the cluster's name directory"),
    }
}

/// Removes the runtime directories that dead masters of this user left in
/// `base` (see the module docs for how a live one is recognized). Best effort:
/// what cannot be read or removed is logged and left.
pub(crate) fn remove_stale(base: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else { return 0 };
    let uid = nix::unistd::geteuid().as_raw();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = entry.file_name().to_str().and_then(master_pid) else { continue };
        // symlink_metadata: a symlink is never followed, let alone removed through.
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.uid() != uid || pid == std::process::id() {
            continue;
        }
        let dead = match OpenOptions::new().write(true).open(path.join(LOCK_FILE)) {
            Ok(file) => Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => !process_alive(pid),
            Err(_) => false,
        };
        if !dead {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %path.display(), pid, "removed the runtime directory of a dead master");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a dead master's runtime directory")
            }
        }
    }
    removed
}

/// The master pid in a name of the shape `tandem-<cluster>-<pid>-<12 hex>`.
fn master_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let suffix = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let prefix = parts.next()?;
    let shaped = prefix.starts_with("tandem-") && suffix.len() == 12 && suffix.chars().all(|c| c.is_ascii_hexdigit());
    shaped.then_some(pid)
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // Signal 0 checks existence only; EPERM means alive but someone else's.
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

/// How open to other users a directory of ours may be
/// ([`ensure_own_dir`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Openness {
    /// No permission bit for group or others (`mode & 0o077 == 0`): the
    /// runtime and control directories.
    Private,
    /// Readable, never writable, by group and others (`mode & 0o022 == 0`):
    /// the log directory (a `0750` directory of group `adm` is fine).
    NotWritableByOthers,
}

/// THE check of a directory the master keeps its files in (the control
/// socket's, the log files'): creates `path` with mode 0700 if missing (its
/// parents too, with `parents`), then checks that it is a directory (not a
/// symlink), owned by this user, and no more open than `openness` allows. A
/// directory that fails it is refused, never changed: the error says what to
/// fix.
pub(crate) fn ensure_own_dir(path: &Path, openness: Openness, parents: bool) -> io::Result<()> {
    if parents && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new().mode(0o700).recursive(true).create(parent)?;
    }
    match DirBuilder::new().mode(0o700).create(path) {
        // The umask may have removed bits, never added any: make it exactly 0700.
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::other(format!("{} is a symlink: give the directory itself", path.display())));
    }
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", path.display())));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to this user", path.display(), meta.uid()),
        ));
    }
    let (forbidden, what) = match openness {
        Openness::Private => (0o077, "open to other users"),
        Openness::NotWritableByOthers => (0o022, "writable by other users"),
    };
    if meta.mode() & forbidden != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is {what} (mode {:o})", path.display(), meta.mode() & 0o7777),
        ));
    }
    Ok(())
}

pub(crate) fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && let Ok(meta) = std::fs::metadata(&dir)
        && meta.is_dir()
        && meta.uid() == nix::unistd::getuid().as_raw()
    {
        return dir;
    }
    std::env::temp_dir()
}

/// A random 256-bit token, as 64 hex digits.
pub(crate) fn new_token() -> Result<String, crate::Error> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| crate::Error::Token(io::Error::other(e)))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_private_unique_and_removed_on_drop() {
        let base = std::env::temp_dir();
        let a = RuntimeDir::create_in(&base, "my app/../x").unwrap();
        let b = RuntimeDir::create_in(&base, "my app/../x").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(a.path().parent(), Some(base.as_path()));
        let meta = std::fs::metadata(a.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn own_directories_are_created_private_and_open_ones_refused_unchanged() {
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("a/b/logs");
        ensure_own_dir(&fresh, Openness::NotWritableByOthers, true).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(ensure_own_dir(&base.path().join("x/y"), Openness::Private, false).is_err(), "no parents asked for");
        let dir = |mode: u32| {
            let path = base.path().join(format!("m{mode:o}"));
            std::fs::create_dir(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let readable = dir(0o755);
        ensure_own_dir(&readable, Openness::NotWritableByOthers, false).unwrap();
        let error = ensure_own_dir(&readable, Openness::Private, false).unwrap_err().to_string();
        assert!(error.ends_with("is open to other users (mode 755)"), "{error}");
        for mode in [0o775, 0o757, 0o777] {
            let path = dir(mode);
            let error = ensure_own_dir(&path, Openness::NotWritableByOthers, false).unwrap_err().to_string();
            assert!(error.ends_with(&format!("is writable by other users (mode {mode:o})")), "{error}");
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, mode, "unchanged");
        }
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        let error = ensure_own_dir(&link, Openness::NotWritableByOthers, false).unwrap_err().to_string();
        assert!(error.contains("is a symlink"), "{error}");
    }

    #[test]
    fn stale_directories_of_dead_masters_go_and_live_ones_stay() {
        let base = tempfile::tempdir().unwrap();
        // A live master: its lock is held.
        let live = RuntimeDir::create_in(base.path(), "app").unwrap();
        // A dead master: same shape, its lock file free (the kernel dropped the lock).
        let dead = base.path().join("tandem-app-999999-0123456789ab");
        std::fs::create_dir(&dead).unwrap();
        File::create(dead.join(LOCK_FILE)).unwrap();
        File::create(dead.join("agent.sock")).unwrap();
        // A master between mkdir and lock: no lock file, pid alive (ours is skipped, so use pid 1).
        let starting = base.path().join("tandem-app-1-0123456789ab");
        std::fs::create_dir(&starting).unwrap();
        // No lock file and a dead pid: an older master's leftover.
        let old = base.path().join("tandem-app-2147483646-abcdefabcdef");
        std::fs::create_dir(&old).unwrap();
        // Not ours to judge: other shapes, and a symlink to a stale-looking directory.
        let other = base.path().join("tandem-it123");
        std::fs::create_dir(&other).unwrap();
        let target = base.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = base.path().join("tandem-app-999998-0123456789ab");
        std::os::unix::fs::symlink(&target, &link).unwrap();

        assert_eq!(remove_stale(base.path()), 2);
        assert!(!dead.exists() && !old.exists());
        assert!(live.path().exists() && starting.exists() && other.exists() && target.exists());
        assert!(std::fs::symlink_metadata(&link).is_ok());
    }

    /// The name's directory as `control` makes it: the directory, then the lock.
    fn lock(dir: &Path) -> io::Result<Option<Flock<File>>> {
        lock_name_dir(dir, "lock", || match DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        })
    }

    #[test]
    fn a_name_directory_is_locked_once_and_removed_with_its_lock_when_released() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("app");
        let first = lock(&dir).unwrap().expect("free");
        assert!(lock(&dir).unwrap().is_none(), "held by the first");
        File::create(dir.join("master.pid")).unwrap();
        std::fs::remove_file(dir.join("master.pid")).unwrap();
        remove_name_dir(&dir, "lock", first);
        assert!(!dir.exists(), "the directory and its lock file are gone");
        // The name is free again: a next master makes it anew.
        let again = lock(&dir).unwrap().expect("free again");
        assert!(dir.join("lock").exists());
        drop(again);
    }

    #[test]
    fn a_master_that_opened_the_lock_before_its_removal_does_not_keep_the_dead_file() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("app");
        let first = lock(&dir).unwrap().expect("free");
        // A second master opened the lock file and waits to lock it ...
        let early = OpenOptions::new().write(true).open(dir.join("lock")).unwrap();
        // ... while the first stops and removes the name's directory.
        remove_name_dir(&dir, "lock", first);
        assert!(!dir.exists());
        // Its lock on the unlinked file succeeds, but that is not the name's lock:
        let stale = Flock::lock(early, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).unwrap();
        assert!(std::fs::symlink_metadata(dir.join("lock")).is_err());
        // lock_name_dir starts over on the path instead, so two masters never both own it.
        let second = lock(&dir).unwrap().expect("the name's real lock");
        assert!(lock(&dir).unwrap().is_none());
        let held = second.metadata().unwrap();
        let at_path = std::fs::metadata(dir.join("lock")).unwrap();
        assert_eq!((held.dev(), held.ino()), (at_path.dev(), at_path.ino()));
        assert_ne!(stale.metadata().unwrap().ino(), held.ino());
    }

    #[test]
    fn a_name_directory_another_master_already_uses_is_left_in_place() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("app");
        let first = lock(&dir).unwrap().expect("free");
        // Between the unlink and the rmdir a new master of the name puts its files there:
        // simulated by a file the stopping master does not know.
        File::create(dir.join("control.sock")).unwrap();
        remove_name_dir(&dir, "lock", first);
        assert!(dir.join("control.sock").exists(), "a directory in use is never removed");
    }

    #[test]
    fn master_pids_are_read_only_from_runtime_directory_names() {
        assert_eq!(master_pid("tandem-config_center-4242-0123456789ab"), Some(4242));
        assert_eq!(master_pid("tandem-a-b-c-7-0123456789ab"), Some(7));
        assert_eq!(master_pid("tandem-4242-0123456789ab"), None);
        assert_eq!(master_pid("tandem-1000"), None);
        assert_eq!(master_pid("tandem-app-42-xyz"), None);
        assert_eq!(master_pid("other-app-42-0123456789ab"), None);
    }

    #[test]
    fn tokens_are_256_bit_hex_and_differ() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
