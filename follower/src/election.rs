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
//! A leader that hangs (`SIGSTOP`, a frozen VM, a blocked runtime) keeps its
//! lock, so its followers take its place instead of waiting for the lock:
//!
//! ```text
//! B: no frame from the leader (epoch E) for peer_timeout, or no Welcome within handshake_timeout
//! B: flock(name.takeover) -> name.epoch still E? -> new lock file, flock it, rename over name.lock
//!    -> epoch E + 1 -> Leader binds a new name.sock -> name.epoch = E + 1
//! A (resumed): name.lock is not the file it locked -> fenced: serves nothing more at E,
//!    drops its upstream connection, then follows B like any other process
//! ```
//!
//! Every lock taken is checked to still be the file at `<name>.lock` (a
//! process that opened the replaced file cannot win with it).
//!
//! A hot standby takes over warm (PROTOCOL.md §7.2):
//!
//! ```text
//! B (follower): flock(name.standby) won -> the standby: mirrors the leader (no upstream connection)
//! C (follower): flock(name.standby) busy -> a plain follower
//! A dies: B: flock(name.lock) won at once -> epoch + 1 -> Leader seeded from B's mirror, binds name.sock
//!            -> name.standby released
//!         C: name.sock refuses -> tries it again every 1 ms: B answers -> follows B
//!            (B never answers within STANDBY_GRACE, 50 ms: C competes for the locks itself)
//!         C (or another follower), at its next heartbeat: flock(name.standby) won -> the new standby
//! ```
//!
//! A leader that steps down (`Connection::step_down`, or `close` while
//! leading) hands off instead of dying:
//!
//! ```text
//! A: Leader::hand_off -> Goodbye("leader handing off") to every follower, upstream dropped -> unlock
//! B, C: INFO "the leader handed off" -> reconnect at once: flock won by B -> epoch + 1 -> Leader
//! A: leaves the lock to the others for HAND_OFF_WAIT (500 ms) -> follows B (or leads again, if alone)
//! ```
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

/// How long a follower that finds the leader gone waits, while a hot standby
/// is alive, before competing for the lock itself: the standby competes at
/// once, and wins unless it is dead or stuck (50 ms).
pub const STANDBY_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// How often, during [`STANDBY_GRACE`], a follower tries the leader's socket
/// again (the standby's new leader binds it).
const STANDBY_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// How often a rejected follower checks whether the leader changed.
const NEW_LEADER_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a process that stepped down leaves the lock to the others: past
/// it, with no new leader (it was alone), it competes again and may lead at
/// the next epoch. Shorter than the driver's 1 s before connect failures are
/// logged at WARN.
pub(crate) const HAND_OFF_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

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

/// A file's identity: (device, inode).
type FileId = (u64, u64);

/// A hung leader's place, taken: the new lock file (locked, and its identity)
/// and the takeover lock, held until the new epoch is stored.
type Takeover = (Flock<File>, FileId, Flock<File>);

/// The identity of the file `path` names now (not following a symlink).
fn file_id(path: &Path) -> io::Result<FileId> {
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

/// A [`Connector`] that elects a leader among the processes sharing `name` and `dir`.
///
/// `setup` adds the channels (and their upstream factories) to the leader this
/// process builds if it wins; it is called at most once per process.
///
/// Every process of the application runs the same code; the first to take the
/// lock leads, the others follow it over the Unix socket in `dir`, and one of
/// them takes over if it dies:
///
/// ```
/// use tandem_follower::{Connection, Standalone};
/// # use tandem_leader::{CallContext, Events, Upstream};
/// # use tandem_protocol::{Api, RemoteError};
/// # struct Echo;
/// # impl Api for Echo {
/// #     const NAME: &'static str = "echo";
/// #     type Key = String; type Event = String; type Request = String; type Response = String;
/// # }
/// # struct EchoUpstream;
/// # impl Upstream<Echo> for EchoUpstream {
/// #     async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> { Ok(request) }
/// #     async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
/// #         Err(RemoteError::bad_request("no keys"))
/// #     }
/// # }
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// // A private (0700) directory, e.g. $XDG_RUNTIME_DIR/myapp.
/// let dir = tmp.path().join("myapp");
/// let connector = Standalone::new("myapp", &dir, |leader| leader.channel(EchoUpstream));
/// let connection = Connection::builder().connect(connector).spawn();
/// let echo = connection.client::<Echo>();
/// assert_eq!(echo.invoke("hi".into()).await?, "hi");
/// assert!(connection.is_leader()); // alone, it leads
/// # Ok(()) }
/// ```
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
    /// The leader this process gave up for hung (pid, stored epoch): if it
    /// still holds the lock at that epoch, this process takes its place.
    hung: Option<(Option<i32>, u64)>,
    /// This process stepped down from this epoch: until the deadline (or a
    /// newer epoch is stored) it leaves the lock to the others.
    yielded: Option<(u64, tokio::time::Instant)>,
    /// The standby lock, while this process is the hot standby.
    standby: Option<Flock<File>>,
    /// The connection's mirror of the leader (given by the driver while this process is the standby).
    mirror: Option<crate::Mirror>,
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
            hung: None,
            yielded: None,
            standby: None,
            mirror: None,
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

    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.name))
    }

    /// Takes the standby lock if it is free: this process becomes the hot
    /// standby. Returns whether this process is the standby now.
    fn try_standby(&mut self) -> Result<bool, StartupError> {
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

    /// Connects to the leader's socket as a follower.
    async fn follow(&mut self) -> io::Result<Connected> {
        let socket = self.socket_path();
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
        let pid = stream.peer_cred().ok().and_then(|cred| cred.pid());
        self.followed = Some((pid, self.stored_epoch()));
        let (read, write) = tandem_protocol::unix::split(stream)?;
        Ok(Connected::remote(tandem_protocol::Link::from_io(read, write, FrameCodec::new())))
    }

    /// Takes the election lock if it is free. A lock taken on a file that a
    /// takeover has since replaced is worth nothing: it is let go, and the
    /// file now at the path is tried instead.
    fn try_lock(&self) -> Result<Option<(Flock<File>, FileId)>, StartupError> {
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
    fn take_over(&self, epoch: u64) -> io::Result<Option<Takeover>> {
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

    async fn become_leader(&mut self, lock: Flock<File>, lock_id: FileId) -> Result<Leader, StartupError> {
        let epoch_file = self.dir.join(format!("{}.epoch", self.name));
        let epoch_error = |source| StartupError::Io { path: epoch_file.clone(), source };
        let epoch = read_epoch(&epoch_file).map_err(epoch_error)? + 1;
        // The standby starts warm: its mirror's values are served at once.
        // Released at once: the followers elect a new standby (at their next
        // connect or heartbeat).
        let was_standby = self.standby.take().is_some();
        let seed = match &self.mirror {
            Some(mirror) if was_standby && mirror.status().synced => mirror.entries(),
            _ => Vec::new(),
        };
        let seeded = seed.len();
        let builder = Leader::builder()
            .epoch(epoch)
            .token(self.token.clone())
            .config(self.config.clone())
            .fence(still_leader(self.lock_path(), lock_id, epoch_file.clone(), epoch))
            .seed(seed);
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
        if was_standby && self.mirror.is_some() {
            tracing::info!(epoch, name = %self.name, keys = seeded, "the standby took over: this process is the leader, serving its mirrored values");
        } else {
            tracing::info!(epoch, name = %self.name, "won the election: this process is the leader");
        }
        self.elected = Some(Elected { leader: leader.clone(), _lock: lock });
        self.hung = None;
        Ok(leader)
    }

    /// The leader this process runs, if it won.
    pub fn leader(&self) -> Option<&Leader> {
        self.elected.as_ref().map(|e| &e.leader)
    }
}

impl Standalone {
    /// Whether this process still leaves the lock to the others after
    /// stepping down: until [`HAND_OFF_WAIT`] passed or a newer leader stored its epoch.
    fn yielding(&mut self) -> bool {
        let Some((epoch, until)) = self.yielded else { return false };
        if tokio::time::Instant::now() < until && self.stored_epoch() <= epoch {
            return true;
        }
        self.yielded = None;
        false
    }

    /// The epoch the current leader stored (0 when none is, or it cannot be read).
    fn stored_epoch(&self) -> u64 {
        read_epoch(&self.dir.join(format!("{}.epoch", self.name))).unwrap_or(0)
    }
}

/// The fence of the leader elected at `epoch` with the lock file `lock_id`:
/// it still holds its place while `<name>.lock` is that file and no later
/// epoch was stored. A lock file that is gone counts as lost (the directory
/// was cleaned up under a live leader); an error reading it does not.
fn still_leader(
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

/// Stores `epoch` atomically (write, fsync, rename; the temporary file is this
/// process's own).
fn store_epoch(path: &Path, epoch: u64) -> io::Result<()> {
    let tmp = path.with_extension(format!("epoch.{}.tmp", std::process::id()));
    let mut file = File::create(&tmp)?;
    writeln!(file, "{epoch}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Connector for Standalone {
    async fn connect(&mut self) -> io::Result<Connected> {
        if let Some(elected) = &self.elected {
            if !elected.leader.is_fenced() {
                return Ok(Connected { link: elected.leader.connect_local(), is_leader: true });
            }
            // Replaced while it could not run: let its lock go and follow the new leader.
            tracing::warn!(epoch = elected.leader.epoch(), name = %self.name, "this process's leader was replaced; following the new one");
            if let Some(elected) = self.elected.take() {
                elected.leader.shutdown().await;
            }
        }
        self.validate().map_err(StartupError::into_io)?;
        if self.role == Role::Auto
            && !self.yielding()
            && self.hung.is_none()
            && !self.try_standby().map_err(StartupError::into_io)?
        {
            // Another process is the standby: it competes for the lock first.
            // Follow the leader if one answers; else give the standby its
            // grace, then compete (it may be dead), standby first if it left.
            // The standby's leader binds within milliseconds: follow it as soon as it answers.
            let grace_ends = tokio::time::Instant::now() + STANDBY_GRACE;
            loop {
                if let Ok(connected) = self.follow().await {
                    return Ok(connected);
                }
                if tokio::time::Instant::now() >= grace_ends {
                    break;
                }
                tokio::time::sleep(STANDBY_POLL).await;
            }
            self.try_standby().map_err(StartupError::into_io)?;
        }
        if self.role != Role::FollowerOnly && !self.yielding() {
            let mut won = self.try_lock().map_err(StartupError::into_io)?;
            // Held until the new epoch is stored (dropped at the end of this block).
            let mut _turn = None;
            if won.is_none()
                && let Some((pid, epoch)) = self.hung
                && let Some((lock, id, turn)) = self.take_over(epoch)?
            {
                tracing::warn!(
                    leader.pid = pid,
                    epoch,
                    name = %self.name,
                    "the leader stopped answering but holds the lock; this process takes its place"
                );
                won = Some((lock, id));
                _turn = Some(turn);
            }
            match won {
                Some((lock, id)) => {
                    let leader = self.become_leader(lock, id).await.map_err(StartupError::into_io)?;
                    return Ok(Connected { link: leader.connect_local(), is_leader: true });
                }
                None if self.role == Role::LeaderOnly => {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "another process holds the leader lock"));
                }
                None => {}
            }
        }
        self.follow().await
    }

    fn is_standby(&self) -> bool {
        self.standby.is_some()
    }

    fn mirroring(&mut self, mirror: crate::Mirror) {
        self.mirror = Some(mirror);
    }

    fn became_standby(&mut self) -> bool {
        if self.role != Role::Auto || self.elected.is_some() || self.standby.is_some() {
            return false;
        }
        match self.try_standby() {
            Ok(became) => became,
            Err(error) => {
                tracing::debug!(%error, "cannot take the standby lock");
                false
            }
        }
    }

    /// Hands off the leader this process runs: `Goodbye("leader handing off")`
    /// to every follower, the leader stopped (its upstream clients dropped),
    /// then the lock released, so the next process leads at the next epoch.
    async fn step_down(&mut self) -> bool {
        let Some(elected) = self.elected.take() else { return false };
        let epoch = elected.leader.epoch();
        if elected.leader.is_fenced() {
            // Another process leads already: nothing to hand off.
            elected.leader.shutdown().await;
            return false;
        }
        tracing::info!(epoch, name = %self.name, "stepping down: this process hands the lead to another");
        elected.leader.hand_off().await;
        // Released only now: one upstream connection per host, even during the hand-off.
        drop(elected);
        self.yielded = Some((epoch, tokio::time::Instant::now() + HAND_OFF_WAIT));
        true
    }

    /// The leader followed last stopped answering: the next connect takes its
    /// place if it still holds the lock at the same epoch (the one it sent in
    /// its `Welcome`; else the one stored when this process connected).
    fn unresponsive(&mut self, epoch: Option<u64>) {
        if self.elected.is_none()
            && let Some((pid, stored)) = self.followed
        {
            self.hung = Some((pid, epoch.unwrap_or(stored)));
        }
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

    fn standalone(dir: &Path) -> Standalone {
        Standalone::new("app", dir, |builder| builder)
    }

    #[test]
    fn a_takeover_replaces_the_lock_file_and_fences_the_hung_leader() {
        let base = private_base();
        let dir = base.path();
        let (a, b, c) = (standalone(dir), standalone(dir), standalone(dir));
        let (a_lock, a_id) = a.try_lock().unwrap().expect("the lock is free");
        store_epoch(&dir.join("app.epoch"), 1).unwrap();
        let a_holds = still_leader(a.lock_path(), a_id, dir.join("app.epoch"), 1);
        assert!(a_holds());
        assert!(b.try_lock().unwrap().is_none(), "held by a");

        // b gave a up for hung at epoch 1: it takes the place, a new lock file in the old one's.
        assert!(b.take_over(0).unwrap().is_none(), "not at the epoch b saw: someone else took over already");
        let (b_lock, b_id, b_turn) = b.take_over(1).unwrap().expect("b takes a's place");
        assert_eq!(c.take_over(1).unwrap_err().kind(), io::ErrorKind::WouldBlock, "one takeover at a time");
        drop(b_turn);
        assert_ne!(a_id, b_id);
        assert!(!a_holds(), "a's lock file is gone from the path: a is fenced");
        assert!(c.take_over(1).unwrap().is_some_and(|(_, id, _)| id != b_id), "a second takeover at the same epoch...");
        // ...is what the takeover lock and the stored epoch prevent in practice: the new leader stores epoch 2.
        store_epoch(&dir.join("app.epoch"), 2).unwrap();
        assert!(c.take_over(1).unwrap().is_none(), "the epoch moved on: nothing to take over");

        // a exiting frees only the file it locked: nobody can win with it.
        drop(a_lock);
        drop(b_lock);
        let (_c_lock, c_id) = c.try_lock().unwrap().expect("every holder of the current file is gone");
        assert_eq!(file_id(&c.lock_path()).unwrap(), c_id);
        assert!(a.try_lock().unwrap().is_none());
    }

    #[test]
    fn a_later_epoch_or_a_removed_lock_file_fences_too() {
        let base = private_base();
        let dir = base.path();
        let a = standalone(dir);
        let (_lock, id) = a.try_lock().unwrap().unwrap();
        let epoch_file = dir.join("app.epoch");
        store_epoch(&epoch_file, 4).unwrap();
        let holds = still_leader(a.lock_path(), id, epoch_file.clone(), 4);
        assert!(holds());
        store_epoch(&epoch_file, 5).unwrap();
        assert!(!holds(), "a later leader stored its epoch");
        store_epoch(&epoch_file, 4).unwrap();
        assert!(holds());
        std::fs::remove_file(a.lock_path()).unwrap();
        assert!(!holds(), "the lock file was removed under the leader");
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
