//! How a follower reaches its leader: a factory of links, called on every (re)connect.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tandem_leader::Leader;
use tandem_protocol::{FrameCodec, Link};

/// A freshly established link to a leader.
#[derive(Debug)]
pub struct Connected {
    /// The link.
    pub link: Link,
    /// Whether the leader at the other end is this very process.
    pub is_leader: bool,
}

impl Connected {
    /// A link to a leader in another process.
    pub fn remote(link: Link) -> Self {
        Connected { link, is_leader: false }
    }
}

/// Makes a new link to the leader each time the driver (re)connects.
pub trait Connector: Send + 'static {
    /// Establishes one link. An error is logged and retried with backoff,
    /// except a [`StartupError`](crate::StartupError) (wrapped with
    /// [`StartupError::into_io`](crate::StartupError::into_io)): retrying cannot
    /// help, so the driver stops and every call fails with it.
    fn connect(&mut self) -> impl Future<Output = io::Result<Connected>> + Send;

    /// Resolves when a leader other than the one that rejected this follower
    /// may be reachable. After a rejection the driver sends no hello until
    /// then. The default never resolves: the rejection is final.
    fn new_leader(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// The leader reached by the last [`connect`](Self::connect) stopped
    /// answering: nothing arrived from it for `peer_timeout` (a ping is sent
    /// every heartbeat), it took no bytes for as long, or it sent no `Welcome`
    /// within `handshake_timeout`. `epoch` is the one its `Welcome` announced
    /// (`None` when it sent none). The driver reconnects next; a connector that
    /// can elect (the standalone election) may take the hung leader's place.
    /// The default does nothing.
    fn unresponsive(&mut self, epoch: Option<u64>) {
        let _ = epoch;
    }

    /// Hands the leadership this process holds through this connector to
    /// another process, gracefully: the leader says `Goodbye("leader handing
    /// off")` to every follower and stops, and whatever elects leaders lets
    /// the next process win. Returns whether it did; `false` when this
    /// process does not lead through it. Called by
    /// [`Connection::step_down`](crate::Connection::step_down), and when the
    /// connection closes. The default does nothing and returns `false`
    /// (fixed roles: a leader that is not elected cannot hand its place on).
    fn step_down(&mut self) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }

    /// Whether this process is a hot standby of the leader the last
    /// [`connect`](Self::connect) reached: the driver then mirrors that leader
    /// on the link (PROTOCOL.md §7.2) and gives the view to
    /// [`mirroring`](Self::mirroring), so that the connector can start its own
    /// leader warm from it if it takes over (the standalone election does).
    /// The default is `false`.
    fn is_standby(&self) -> bool {
        false
    }

    /// Asked once per heartbeat while this process follows: whether it just
    /// became a hot standby (the place was free: the standby died, or leads
    /// now). The driver then mirrors the leader on the current link and gives
    /// the view to [`mirroring`](Self::mirroring), as after a connect where
    /// [`is_standby`](Self::is_standby) said so. The default is `false`.
    fn became_standby(&mut self) -> bool {
        false
    }

    /// The connection's mirror of the leader, given on each link where
    /// [`is_standby`](Self::is_standby) said so. The default drops it.
    fn mirroring(&mut self, mirror: crate::Mirror) {
        let _ = mirror;
    }
}

/// Connects to a leader's Unix socket.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
    max_frame_length: usize,
}

impl UnixConnector {
    /// A connector for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixConnector { path: path.into(), max_frame_length: tandem_protocol::DEFAULT_MAX_FRAME_LENGTH }
    }
}

impl Connector for UnixConnector {
    async fn connect(&mut self) -> io::Result<Connected> {
        let stream = tokio::net::UnixStream::connect(&self.path).await?;
        let (read, write) = tandem_protocol::unix::split(stream)?;
        Ok(Connected::remote(Link::from_io(read, write, FrameCodec::with_max_frame_length(self.max_frame_length))))
    }
}

/// Connects to a leader's loopback TCP port.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: SocketAddr,
}

impl TcpConnector {
    /// A connector for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        TcpConnector { addr }
    }
}

impl Connector for TcpConnector {
    async fn connect(&mut self) -> io::Result<Connected> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Connected::remote(Link::from_io(read, write, FrameCodec::new())))
    }
}

/// Connects to a leader in this process, through memory.
#[derive(Debug, Clone)]
pub struct LocalConnector {
    leader: Leader,
}

impl LocalConnector {
    /// A connector for `leader`.
    pub fn new(leader: Leader) -> Self {
        LocalConnector { leader }
    }
}

impl Connector for LocalConnector {
    async fn connect(&mut self) -> io::Result<Connected> {
        Ok(Connected { link: self.leader.connect_local(), is_leader: true })
    }
}

/// A connector made of a closure returning a future (for custom transports,
/// such as the cluster's messenger relay).
#[derive(Debug, Clone)]
pub struct FnConnector<F>(pub F);

impl<F, Fut> Connector for FnConnector<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<Connected>> + Send,
{
    fn connect(&mut self) -> impl Future<Output = io::Result<Connected>> + Send {
        (self.0)()
    }
}
