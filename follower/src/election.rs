//! Standalone mode: processes that share a name and a directory elect a leader
//! among themselves, with no master.
//!
//! ```text
//! process A: flock(name.lock) won  -> epoch = name.epoch + 1 -> Leader binds name.sock -> local link
//! process B: flock(name.lock) busy -> connect(name.sock) -> follower
//! A dies (even kill -9): the kernel drops A's lock; B's link breaks; B reconnects:
//! process B: flock(name.lock) won  -> epoch + 1 -> Leader binds name.sock -> local link
//! ```
//!
//! The lock is an exclusive `flock(2)` on `<dir>/<name>.lock`: no port race, no
//! stale lock after a crash. The epoch is stored in `<dir>/<name>.epoch` and
//! bumped by each new leader, so epochs strictly increase across leaders.
//!
//! Mistakes that no retry can fix end the election at once with a
//! [`StartupError`] (the driver fails every call with it and stops): a name
//! that cannot name a file, a socket path over the Unix limit, a directory that
//! other users may enter or that belongs to another user, and a leader that
//! cannot bind its socket. An existing directory with a loose mode is refused,
//! not chmod-ed: it may be shared on purpose (a home directory, a directory
//! another service created), and tightening it silently would change what
//! other programs see; the error names the directory, its mode and the fix.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use tandem_leader::{Leader, LeaderBuilder};
use tandem_protocol::FrameCodec;

use crate::StartupError;
use crate::connector::{Connected, Connector};

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH: usize = 107;

/// How often a rejected follower checks whether the leader changed.
const NEW_LEADER_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Checks that `name` can name the election's files (`<name>.lock`, `.epoch`, `.sock`).
fn validate_name(name: &str) -> Result<(), StartupError> {
    let reason = if name.is_empty() {
        "the name is empty"
    } else if name == "." || name == ".." {
        "the name may not be `.` or `..`"
    } else if name.contains('/') {
        "the name may not contain `/` (it names files in the directory)"
    } else if name.contains('\0') {
        "the name may not contain a NUL byte"
    } else if name.len() > 200 {
        "the name is longer than 200 bytes"
    } else {
        return Ok(());
    };
    Err(StartupError::InvalidName { name: name.to_string(), reason })
}

/// Checks that `path` fits in a Unix socket address.
fn validate_socket_path(path: &Path) -> Result<(), StartupError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(StartupError::SocketPathTooLong { path: path.to_path_buf(), len, max: MAX_SOCKET_PATH });
    }
    Ok(())
}

/// Creates `dir` (0700) if missing; an existing one must be a directory of
/// this user that no other user may enter.
fn ensure_private_dir(dir: &Path) -> Result<(), StartupError> {
    let io = |source| StartupError::Io { path: dir.to_path_buf(), source };
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            return Ok(());
        }
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(StartupError::NotADirectory { dir: dir.to_path_buf() });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(StartupError::ForeignDirectory { dir: dir.to_path_buf(), owner: meta.uid(), uid });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StartupError::InsecureDirectory { dir: dir.to_path_buf(), mode });
    }
    Ok(())
}

/// Which roles a standalone process may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Role {
    /// Leader if it wins the lock, follower otherwise (and leader later, if the leader dies).
    #[default]
    Auto,
    /// Only ever the leader: connecting fails (and is retried) while another process holds the lock.
    LeaderOnly,
    /// Only ever a follower: never takes the lock.
    FollowerOnly,
}

type Factory = Arc<dyn Fn(LeaderBuilder) -> LeaderBuilder + Send + Sync>;

struct Elected {
    leader: Leader,
    _lock: Flock<File>,
}

/// A [`Connector`] that elects a leader among the processes sharing `name` and `dir`.
///
/// `setup` adds the channels (and their upstream factories) to the leader this
/// process builds if it wins; it is called at most once per process.
pub struct Standalone {
    name: String,
    dir: PathBuf,
    role: Role,
    token: Option<String>,
    config: tandem_leader::Config,
    setup: Factory,
    elected: Option<Elected>,
    /// Name, socket path and directory were checked.
    validated: bool,
    /// The leader this process last followed: its pid and the stored epoch when it connected.
    followed: Option<(Option<i32>, u64)>,
}

impl std::fmt::Debug for Standalone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standalone")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("role", &self.role)
            .field("leader", &self.elected.as_ref().map(|e| e.leader.epoch()))
            .finish_non_exhaustive()
    }
}

impl Standalone {
    /// Elects among processes using `name` in `dir` (created 0700 if missing; an
    /// existing one must be private to this user).
    pub fn new(
        name: impl Into<String>,
        dir: impl Into<PathBuf>,
        setup: impl Fn(LeaderBuilder) -> LeaderBuilder + Send + Sync + 'static,
    ) -> Self {
        Standalone {
            name: name.into(),
            dir: dir.into(),
            role: Role::Auto,
            token: None,
            config: tandem_leader::Config::default(),
            setup: Arc::new(setup),
            elected: None,
            validated: false,
            followed: None,
        }
    }

    /// Restricts the roles this process may take. The default is [`Role::Auto`].
    pub fn role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// The token the leader (if this process becomes it) requires. The default is
    /// none. Set the same token in the connection's `Config::token`, which this
    /// process presents when it follows.
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The leader's settings, if this process becomes it.
    pub fn leader_config(mut self, config: tandem_leader::Config) -> Self {
        self.config = config;
        self
    }

    /// The leader's socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.name))
    }

    /// Checks what no retry can fix, before anything starts: `name` names
    /// files (no `/`, not empty), the socket path `<dir>/<name>.sock` fits in a
    /// Unix socket address ([`MAX_SOCKET_PATH`] bytes), and `dir` is a
    /// directory of this user that no other user may enter (created 0700 if
    /// missing). The connector runs the same checks on its first connect.
    pub fn check(name: &str, dir: &Path) -> Result<(), StartupError> {
        validate_name(name)?;
        validate_socket_path(&dir.join(format!("{name}.sock")))?;
        ensure_private_dir(dir)
    }

    /// Checks, once, what no retry can fix.
    fn validate(&mut self) -> Result<(), StartupError> {
        if !self.validated {
            Self::check(&self.name, &self.dir)?;
            self.validated = true;
        }
        Ok(())
    }

    fn try_lock(&self) -> Result<Option<Flock<File>>, StartupError> {
        let path = self.dir.join(format!("{}.lock", self.name));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StartupError::Io { path: path.clone(), source })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(StartupError::Io { path, source: io::Error::from(errno) }),
        }
    }

    async fn become_leader(&mut self, lock: Flock<File>) -> Result<Leader, StartupError> {
        let epoch_file = self.dir.join(format!("{}.epoch", self.name));
        let epoch_error = |source| StartupError::Io { path: epoch_file.clone(), source };
        let epoch = read_epoch(&epoch_file).map_err(epoch_error)? + 1;
        let builder = Leader::builder().epoch(epoch).token(self.token.clone()).config(self.config.clone());
        let leader = (self.setup)(builder).start();
        let socket = self.socket_path();
        if let Err(source) = leader.bind_unix(&socket) {
            // Leave no half-started leader (and no upstream connection) behind.
            leader.shutdown().await;
            return Err(StartupError::Bind { path: socket, source });
        }
        // Stored only once the leader serves, so failed attempts burn no epochs.
        if let Err(source) = store_epoch(&epoch_file, epoch) {
            leader.shutdown().await;
            return Err(epoch_error(source));
        }
        tracing::info!(epoch, name = %self.name, "won the election: this process is the leader");
        self.elected = Some(Elected { leader: leader.clone(), _lock: lock });
        Ok(leader)
    }

    /// The leader this process runs, if it won.
    pub fn leader(&self) -> Option<&Leader> {
        self.elected.as_ref().map(|e| &e.leader)
    }
}

impl Standalone {
    /// The epoch the current leader stored (0 when none is, or it cannot be read).
    fn stored_epoch(&self) -> u64 {
        read_epoch(&self.dir.join(format!("{}.epoch", self.name))).unwrap_or(0)
    }
}

/// The stored epoch (0 when none was stored yet).
fn read_epoch(path: &Path) -> io::Result<u64> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if text.trim().is_empty() {
        return Ok(0);
    }
    text.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

/// Stores `epoch` atomically (write, fsync, rename).
fn store_epoch(path: &Path, epoch: u64) -> io::Result<()> {
    let tmp = path.with_extension("epoch.tmp");
    let mut file = File::create(&tmp)?;
    writeln!(file, "{epoch}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Connector for Standalone {
    async fn connect(&mut self) -> io::Result<Connected> {
        if let Some(elected) = &self.elected {
            return Ok(Connected { link: elected.leader.connect_local(), is_leader: true });
        }
        self.validate().map_err(StartupError::into_io)?;
        if self.role != Role::FollowerOnly {
            match self.try_lock().map_err(StartupError::into_io)? {
                Some(lock) => {
                    let leader = self.become_leader(lock).await.map_err(StartupError::into_io)?;
                    return Ok(Connected { link: leader.connect_local(), is_leader: true });
                }
                None if self.role == Role::LeaderOnly => {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "another process holds the leader lock"));
                }
                None => {}
            }
        }
        let socket = self.socket_path();
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
        let pid = stream.peer_cred().ok().and_then(|cred| cred.pid());
        self.followed = Some((pid, self.stored_epoch()));
        let (read, write) = tandem_protocol::unix::split(stream)?;
        Ok(Connected::remote(tandem_protocol::Link::from_io(read, write, FrameCodec::new())))
    }

    /// A different leader may be there once the lock is free (the rejecting
    /// leader exited; this process may take over) or another process won the
    /// election meanwhile (the stored epoch moved on: every new leader bumps
    /// it; the socket's inode is no identity, the file system reuses it).
    async fn new_leader(&mut self) {
        let (pid, epoch) = self.followed.unwrap_or((None, 0));
        tracing::warn!(
            leader.pid = pid,
            name = %self.name,
            dir = %self.dir.display(),
            "the process leading this name refused this one (see the error above: most often a different token); \
             waiting for it to exit, then this process takes over"
        );
        loop {
            tokio::time::sleep(NEW_LEADER_POLL).await;
            let elected = self.stored_epoch() != epoch;
            let free = self.role != Role::FollowerOnly && matches!(self.try_lock(), Ok(Some(_)));
            if elected || free {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_base() -> tempfile::TempDir {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        base
    }

    #[test]
    fn names_that_cannot_name_a_file_are_refused() {
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0byte", &"n".repeat(201)] {
            let error = validate_name(bad).unwrap_err();
            assert!(matches!(error, StartupError::InvalidName { .. }), "{bad:?}: {error}");
        }
        for good in ["app", "my-app_2", "a.b", &"n".repeat(200)] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn socket_paths_are_limited_to_what_sun_path_holds() {
        let fits = PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1)));
        assert_eq!(fits.as_os_str().len(), MAX_SOCKET_PATH);
        validate_socket_path(&fits).unwrap();
        let over = PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH)));
        let error = validate_socket_path(&over).unwrap_err();
        assert!(matches!(error, StartupError::SocketPathTooLong { len: 108, max: 107, .. }), "{error}");
        // The limit is real: the kernel refuses one byte more.
        let base = private_base();
        let name = "s".repeat(MAX_SOCKET_PATH + 1 - base.path().as_os_str().len() - 1);
        let path = base.path().join(name);
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH + 1);
        assert!(std::os::unix::net::UnixListener::bind(&path).is_err());
        let path = path.with_file_name(&path.file_name().unwrap().to_str().unwrap()[1..]);
        std::os::unix::net::UnixListener::bind(&path).unwrap();
    }

    #[test]
    fn directories_are_created_private_and_loose_ones_refused_untouched() {
        let base = private_base();
        let fresh = base.path().join("a/b");
        ensure_private_dir(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode, 0, "created without group or other bits");
        ensure_private_dir(&fresh).unwrap();

        let loose = base.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = ensure_private_dir(&loose).unwrap_err();
        assert!(matches!(error, StartupError::InsecureDirectory { mode: 0o755, .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains(&*loose.to_string_lossy()) && message.contains("0755") && message.contains("chmod 700")
        );
        assert_eq!(std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777, 0o755, "refused, not changed");

        let file = base.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(ensure_private_dir(&file), Err(StartupError::NotADirectory { .. })));
    }

    #[test]
    fn a_startup_error_survives_the_trip_through_io_error_and_others_stay_io() {
        let error = StartupError::NotADirectory { dir: "/x".into() }.into_io();
        let failure = StartupError::from_io(error).unwrap();
        assert!(matches!(failure.error(), StartupError::NotADirectory { .. }));
        let plain = io::Error::from_raw_os_error(2);
        let back = StartupError::from_io(plain).unwrap_err();
        assert_eq!(back.raw_os_error(), Some(2));
        let other = io::Error::other("something else");
        assert_eq!(StartupError::from_io(other).unwrap_err().to_string(), "something else");
    }
}
