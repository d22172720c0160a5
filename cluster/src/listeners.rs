//! Listening sockets owned by the master and handed to the workers.
//!
//! The master binds every listener declared with
//! [`Builder::listen`](crate::Builder::listen) before the agent or any worker
//! starts, and keeps the sockets open for its whole life, so the port never
//! closes while workers come and go (restart, reload, memory replacement).
//! Each worker receives its sockets over its descriptor channel
//! ([`fdpass`](crate::fdpass)) and takes them with
//! [`WorkerContext::listener`](crate::WorkerContext::listener).
//!
//! How a listener is shared ([`ShareMode`]):
//!
//! ```text
//! reuseport  one SO_REUSEPORT socket per worker slot, all bound to the same address;
//!            slot i's worker (and its replacement) always gets socket i. The kernel
//!            spreads new connections over the sockets; a socket's queue survives its
//!            worker's death because the master keeps the socket open.
//! shared     one socket given to every worker; the kernel wakes one of the acceptors.
//! round-robin the master accepts and hands each connection to the next ready worker
//!            (see round_robin.rs); portable, fair, one more hop per connection.
//! ```

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::{Error, WorkerId};

/// The backlog of every listening socket the master binds.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenAddr {
    /// A TCP address (`host:port`, resolved when the master binds; port 0 picks a free port).
    Tcp(String),
    /// A Unix socket path (the file must not exist; the master removes it at exit).
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `unix:PATH`, an absolute or `./` path (Unix socket), or `host:port` (TCP).
    pub fn parse(s: &str) -> Result<Self, Error> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') || s.starts_with("./") {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        if s.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
            return Err(Error::BadListenAddr {
                addr: s.to_owned(),
                problem: "expected host:port (TCP), unix:PATH or an absolute path".into(),
            });
        }
        Ok(ListenAddr::Tcp(s.to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How the workers share a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ShareMode {
    /// One SO_REUSEPORT socket per worker slot (TCP only). The default for TCP on Linux.
    ReusePort,
    /// One socket passed to every worker. The default for Unix sockets.
    Shared,
    /// The master accepts and hands each connection to the next ready worker
    /// (TCP only).
    RoundRobin,
}

impl ShareMode {
    /// The mode's name (`reuseport`, `shared`).
    pub fn as_str(self) -> &'static str {
        match self {
            ShareMode::ReusePort => "reuseport",
            ShareMode::Shared => "shared",
            ShareMode::RoundRobin => "round-robin",
        }
    }

    /// The default for an address: `reuseport` for TCP on Linux, `shared` otherwise.
    pub fn default_for(addr: &ListenAddr) -> Self {
        match addr {
            ListenAddr::Tcp(_) if cfg!(target_os = "linux") => ShareMode::ReusePort,
            _ => ShareMode::Shared,
        }
    }
}

impl fmt::Display for ShareMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ShareMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "reuseport" => Ok(ShareMode::ReusePort),
            "shared" => Ok(ShareMode::Shared),
            "round-robin" => Ok(ShareMode::RoundRobin),
            other => Err(Error::BadListenAddr {
                addr: other.to_owned(),
                problem: "the sharing mode must be reuseport, shared or round-robin".into(),
            }),
        }
    }
}

/// A declared listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Its name, as workers ask for it (`ctx.listener("http")`).
    pub name: String,
    /// Where it listens.
    pub addr: ListenAddr,
    /// How the workers share it.
    pub mode: ShareMode,
}

/// A listener as bound by the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// Its name.
    pub name: String,
    /// The bound address (`127.0.0.1:41234`, the real port when 0 was asked;
    /// `unix:/path`).
    pub address: String,
    /// How the workers share it.
    pub mode: ShareMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Unix,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Unix => "unix",
        }
    }
}

#[derive(Debug)]
struct Bound {
    info: ListenerInfo,
    kind: Kind,
    /// One socket (shared) or one per worker slot (reuseport, index = id - 1).
    sockets: Vec<OwnedFd>,
    /// The Unix socket file this master created.
    unix_path: Option<PathBuf>,
}

/// The master's listening sockets, bound before any child starts.
#[derive(Debug, Default)]
pub(crate) struct BoundListeners {
    bound: Vec<Bound>,
}

impl BoundListeners {
    /// Binds every listener; `workers` reuseport sockets each. A listener
    /// whose name is one of the sockets passed by systemd's socket activation
    /// takes that socket instead (see [`crate::systemd::Activated`]).
    pub(crate) fn bind(specs: &[ListenerSpec], workers: usize) -> Result<Self, Error> {
        let mut activated = crate::systemd::Activated::from_env()?;
        let out = BoundListeners::bind_with(specs, workers, &mut activated)?;
        for name in activated.leftover() {
            tracing::warn!(socket = %name, declared = ?specs.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "socket activation passed a socket that no listener of the cluster is named after; closed");
        }
        Ok(out)
    }

    fn bind_with(
        specs: &[ListenerSpec],
        workers: usize,
        activated: &mut crate::systemd::Activated,
    ) -> Result<Self, Error> {
        let mut out = BoundListeners::default();
        for (i, spec) in specs.iter().enumerate() {
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(Error::Listen {
                    name: spec.name.clone(),
                    addr: spec.addr.to_string(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "a listener of this name is already declared"),
                });
            }
            let fail =
                |source: io::Error| Error::Listen { name: spec.name.clone(), addr: spec.addr.to_string(), source };
            let mut mode = spec.mode;
            let bound = match (activated.take(&spec.name), &spec.addr) {
                (Some(socket), _) => {
                    // One socket, systemd's: reuseport (a socket per worker) cannot be had from it.
                    if mode == ShareMode::ReusePort {
                        tracing::info!(listener = %spec.name,
                            "the listener comes from socket activation, one socket: its workers share it (mode shared)");
                        mode = ShareMode::Shared;
                    }
                    adopt(socket).map_err(fail)?
                }
                (None, ListenAddr::Tcp(addr)) => bind_tcp(addr, mode, workers.max(1)).map_err(fail)?,
                (None, ListenAddr::Unix(path)) => bind_unix(path, mode).map_err(fail)?,
            };
            let (kind, sockets, address, unix_path) = bound;
            tracing::info!(listener = %spec.name, %address, %mode, sockets = sockets.len(), "listening");
            out.bound.push(Bound {
                info: ListenerInfo { name: spec.name.clone(), address, mode },
                kind,
                sockets,
                unix_path,
            });
        }
        Ok(out)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bound.is_empty()
    }

    /// What was bound, in declaration order.
    pub(crate) fn infos(&self) -> Vec<ListenerInfo> {
        self.bound.iter().map(|b| b.info.clone()).collect()
    }

    /// The first listener in `reuseport` mode and its sockets (one per worker
    /// at start): with one, the worker count is fixed (see
    /// [`ReloadError::ReusePortFixed`](crate::ReloadError::ReusePortFixed)).
    pub(crate) fn reuseport(&self) -> Option<(String, u32)> {
        self.bound
            .iter()
            .find(|b| b.info.mode == ShareMode::ReusePort)
            .map(|b| (b.info.name.clone(), u32::try_from(b.sockets.len()).unwrap_or(u32::MAX)))
    }

    /// The fd-channel messages that hand worker `id` its sockets: (header,
    /// socket). A round-robin listener is announced without a socket
    /// (`R <address> <name>`): its connections come one by one.
    pub(crate) fn for_worker(&self, id: WorkerId) -> Vec<(String, Option<BorrowedFd<'_>>)> {
        self.bound
            .iter()
            .filter_map(|b| {
                let index = match b.info.mode {
                    ShareMode::ReusePort => (id as usize).checked_sub(1)?,
                    ShareMode::Shared => 0,
                    ShareMode::RoundRobin => return Some((format!("R {} {}", b.info.address, b.info.name), None)),
                };
                let socket = b.sockets.get(index)?;
                Some((format!("L {} {}", b.kind.as_str(), b.info.name), Some(socket.as_fd())))
            })
            .collect()
    }

    /// The round-robin listeners' sockets (duplicates), for the master's accept loops.
    pub(crate) fn round_robin(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        self.bound
            .iter()
            .filter(|b| b.info.mode == ShareMode::RoundRobin)
            .filter_map(|b| Some((b.info.name.clone(), b.sockets.first()?)))
            .map(|(name, socket)| Ok((name, socket.try_clone()?)))
            .collect()
    }
}

impl Drop for BoundListeners {
    fn drop(&mut self) {
        for b in &self.bound {
            if let Some(path) = &b.unix_path
                && let Err(e) = std::fs::remove_file(path)
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the listener's socket file");
            }
        }
    }
}

type BindResult = (Kind, Vec<OwnedFd>, String, Option<PathBuf>);

/// A listening socket passed by socket activation: its kind and address from
/// the socket itself; its file (for a Unix socket) belongs to systemd.
fn adopt(socket: OwnedFd) -> io::Result<BindResult> {
    let local = socket2::SockRef::from(&socket).local_addr()?;
    let (kind, address) = match (local.as_socket(), local.as_pathname()) {
        (Some(addr), _) => (Kind::Tcp, addr.to_string()),
        (None, Some(path)) => (Kind::Unix, format!("unix:{}", path.display())),
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a passed socket that is neither TCP nor a Unix path",
            ));
        }
    };
    Ok((kind, vec![socket], address, None))
}

fn bind_tcp(addr: &str, mode: ShareMode, workers: usize) -> io::Result<BindResult> {
    let mut resolved = addr.to_socket_addrs()?;
    let first: SocketAddr = resolved
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to no address")))?;
    let count = match mode {
        ShareMode::ReusePort => workers,
        ShareMode::Shared | ShareMode::RoundRobin => 1,
    };
    let mut sockets = Vec::with_capacity(count);
    let mut at = first;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if mode == ShareMode::ReusePort {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&at.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        // The next members of the group bind the port the first one got.
        if let Some(local) = socket.local_addr()?.as_socket() {
            at = local;
        }
        sockets.push(OwnedFd::from(socket));
    }
    Ok((Kind::Tcp, sockets, at.to_string(), None))
}

fn bind_unix(path: &Path, mode: ShareMode) -> io::Result<BindResult> {
    if mode != ShareMode::Shared {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{mode} is for TCP listeners; a Unix socket is shared (mode shared)"),
        ));
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(e.kind(), format!("{} already exists (remove it if no process uses it)", path.display()))
        } else {
            e
        }
    })?;
    Ok((Kind::Unix, vec![OwnedFd::from(listener)], format!("unix:{}", path.display()), Some(path.to_owned())))
}

/// A listening socket handed to a worker, ready for `axum::serve` or hyper.
#[derive(Debug)]
#[non_exhaustive]
pub enum Listener {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket listener.
    Unix(tokio::net::UnixListener),
    /// A round-robin listener: the master accepts and hands connections over.
    RoundRobin(crate::RoundRobinListener),
}

/// The sockets a worker received, until its start function takes them.
#[derive(Debug, Default)]
pub(crate) struct ReceivedListeners {
    entries: Vec<(String, Kind, Option<OwnedFd>)>,
    /// The round-robin listeners and the descriptor channel they use.
    pub(crate) round_robin: Option<crate::round_robin::WorkerSide>,
}

impl ReceivedListeners {
    /// Records one fd-channel message: `L <tcp|unix> <name>` with its socket,
    /// or `R <address> <name>` (round-robin, no socket).
    pub(crate) fn add(&mut self, header: &str, fd: Option<OwnedFd>) -> Result<(), String> {
        if let Some(rest) = header.strip_prefix("R ") {
            let Some((address, name)) = rest.split_once(' ') else {
                return Err(format!("unexpected fd-channel message {header:?}"));
            };
            let Some(rr) = self.round_robin.as_mut() else {
                return Err("a round-robin listener without a descriptor channel".into());
            };
            rr.declare(name, address.parse().ok());
            return Ok(());
        }
        let mut parts = header.splitn(3, ' ');
        let (Some("L"), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("unexpected fd-channel message {header:?}"));
        };
        let kind = match kind {
            "tcp" => Kind::Tcp,
            "unix" => Kind::Unix,
            other => return Err(format!("unknown listener kind {other:?}")),
        };
        let Some(fd) = fd else { return Err(format!("listener {name:?} arrived without its socket")) };
        self.entries.push((name.to_owned(), kind, Some(fd)));
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len() + self.round_robin.as_ref().map_or(0, crate::round_robin::WorkerSide::len)
    }

    /// Takes listener `name` as a tokio listener (once).
    pub(crate) fn take(&mut self, name: &str, stop: &tokio_util::sync::CancellationToken) -> Result<Listener, Error> {
        if let Some(rr) = self.round_robin.as_ref().filter(|rr| rr.has(name)) {
            return rr
                .take(name, stop.clone())
                .map(Listener::RoundRobin)
                .ok_or_else(|| Error::ListenerTaken { name: name.to_owned() });
        }
        let names = || self.entries.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
        let Some(pos) = self.entries.iter().position(|e| e.0 == name) else {
            return Err(Error::NoSuchListener { name: name.to_owned(), declared: names() });
        };
        let entry = &mut self.entries[pos];
        let Some(fd) = entry.2.take() else { return Err(Error::ListenerTaken { name: name.to_owned() }) };
        let io = |source: io::Error| Error::Listen { name: name.to_owned(), addr: "(received)".into(), source };
        match entry.1 {
            Kind::Tcp => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true).map_err(io)?;
                Ok(Listener::Tcp(tokio::net::TcpListener::from_std(std).map_err(io)?))
            }
            Kind::Unix => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true).map_err(io)?;
                Ok(Listener::Unix(tokio::net::UnixListener::from_std(std).map_err(io)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(ListenAddr::parse("127.0.0.1:0").unwrap(), ListenAddr::Tcp("127.0.0.1:0".into()));
        assert_eq!(ListenAddr::parse("localhost:80").unwrap(), ListenAddr::Tcp("localhost:80".into()));
        assert_eq!(ListenAddr::parse("unix:/tmp/s").unwrap(), ListenAddr::Unix("/tmp/s".into()));
        assert_eq!(ListenAddr::parse("/tmp/s").unwrap(), ListenAddr::Unix("/tmp/s".into()));
        assert!(ListenAddr::parse("nonsense").is_err());
        assert!(ListenAddr::parse("host:99999").is_err());
    }

    #[test]
    fn reuseport_binds_one_socket_per_slot_on_one_port() {
        let spec = ListenerSpec {
            name: "http".into(),
            addr: ListenAddr::Tcp("127.0.0.1:0".into()),
            mode: ShareMode::ReusePort,
        };
        let bound = BoundListeners::bind(&[spec], 3).unwrap();
        let info = &bound.infos()[0];
        assert!(!info.address.ends_with(":0"), "{info:?}");
        let mut ports = Vec::new();
        for id in 1..=3 {
            let (header, fd) = bound.for_worker(id).pop().unwrap();
            assert_eq!(header, "L tcp http");
            let dup = fd.unwrap().try_clone_to_owned().unwrap();
            ports.push(std::net::TcpListener::from(dup).local_addr().unwrap().to_string());
        }
        assert!(ports.iter().all(|p| *p == info.address), "{ports:?} vs {info:?}");
        assert!(bound.for_worker(4).is_empty(), "no socket for a slot that does not exist");
    }

    #[test]
    fn a_taken_port_fails_with_the_listener_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let spec = ListenerSpec { name: "http".into(), addr: ListenAddr::Tcp(addr.clone()), mode: ShareMode::Shared };
        let err = BoundListeners::bind(&[spec], 2).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("http") && text.contains(&addr), "{text}");
    }

    #[test]
    fn unix_listeners_are_shared_and_removed_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let spec = ListenerSpec { name: "u".into(), addr: ListenAddr::Unix(path.clone()), mode: ShareMode::Shared };
        let bound = BoundListeners::bind(std::slice::from_ref(&spec), 2).unwrap();
        assert_eq!(bound.for_worker(1).len(), 1);
        assert_eq!(bound.for_worker(2).len(), 1);
        assert!(path.exists());
        drop(bound);
        assert!(!path.exists());
        let reuse = ListenerSpec { mode: ShareMode::ReusePort, ..spec };
        assert!(BoundListeners::bind(&[reuse], 2).is_err());
    }
}
