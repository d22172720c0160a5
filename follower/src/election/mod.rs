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
//!            (if its last complete snapshot is A's, of the stored epoch; else cold: lead::warm_seed)
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

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::Flock;
use tandem_leader::{Leader, LeaderBuilder};
use tandem_protocol::FrameCodec;

use crate::StartupError;
use crate::connector::{Connected, Connector};

mod checks;
mod epoch;
mod lead;
mod lock;
mod standby;
#[cfg(test)]
mod tests;

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH: usize = 107;

/// How often a rejected follower checks whether the leader changed.
const NEW_LEADER_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a process that stepped down leaves the lock to the others: past
/// it, with no new leader (it was alone), it competes again and may lead at
/// the next epoch. Shorter than the driver's 1 s before connect failures are
/// logged at WARN.
pub(crate) const HAND_OFF_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

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

    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.name))
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

    /// The leader this process runs, if it won.
    pub fn leader(&self) -> Option<&Leader> {
        self.elected.as_ref().map(|e| &e.leader)
    }

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
            if let Some(connected) = self.follow_within_grace().await {
                return Ok(connected);
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
