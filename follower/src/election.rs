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

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use tandem_leader::{Leader, LeaderBuilder};
use tandem_protocol::FrameCodec;

use crate::connector::{Connected, Connector};

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

    fn try_lock(&self) -> io::Result<Option<Flock<File>>> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(format!("{}.lock", self.name)))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(io::Error::from(errno)),
        }
    }

    async fn become_leader(&mut self, lock: Flock<File>) -> io::Result<Leader> {
        let epoch_file = self.dir.join(format!("{}.epoch", self.name));
        let epoch = read_epoch(&epoch_file)? + 1;
        let builder = Leader::builder().epoch(epoch).token(self.token.clone()).config(self.config.clone());
        let leader = (self.setup)(builder).start();
        if let Err(error) = leader.bind_unix(self.socket_path()) {
            // Leave no half-started leader (and no upstream connection) behind.
            leader.shutdown().await;
            return Err(io::Error::other(error));
        }
        // Stored only once the leader serves, so failed attempts burn no epochs.
        store_epoch(&epoch_file, epoch)?;
        tracing::info!(epoch, name = %self.name, "won the election: this process is the leader");
        self.elected = Some(Elected { leader: leader.clone(), _lock: lock });
        Ok(leader)
    }

    /// The leader this process runs, if it won.
    pub fn leader(&self) -> Option<&Leader> {
        self.elected.as_ref().map(|e| &e.leader)
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
        if self.role != Role::FollowerOnly {
            match self.try_lock()? {
                Some(lock) => {
                    let leader = self.become_leader(lock).await?;
                    return Ok(Connected { link: leader.connect_local(), is_leader: true });
                }
                None if self.role == Role::LeaderOnly => {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "another process holds the leader lock"));
                }
                None => {}
            }
        }
        let stream = tokio::net::UnixStream::connect(self.socket_path()).await?;
        let (read, write) = stream.into_split();
        Ok(Connected::remote(tandem_protocol::Link::from_io(read, write, FrameCodec::new())))
    }
}
