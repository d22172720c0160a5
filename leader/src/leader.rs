//! The leader: a started one's handle (serving, stats, shutdown) and its listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_protocol::internal::AcceptErrors;
use tandem_protocol::{FrameCodec, Link, UpstreamState};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::admission::Admission;
use crate::peer::PeerInfo;
use crate::session;
use crate::shared::Shared;
use crate::{ChannelStats, Error, LeaderGoodbye, Stats};
/// The leader: holds each channel's one upstream client and serves followers.
///
/// Cheap to clone; every clone is the same leader. Built with
/// [`Leader::builder`] ([`LeaderBuilder`](crate::LeaderBuilder)): one [`Upstream`](crate::Upstream)
/// per channel, then served on a Unix socket (followers connect with
/// `tandem_follower::UnixConnector`) and, in its own process, through memory
/// (`tandem_follower::LocalConnector`).
///
/// ```
/// use tandem_leader::Leader;
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
/// # use std::os::unix::fs::PermissionsExt;
/// # let dir = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o700)).tempdir()?;
/// let leader = Leader::builder().channel(EchoUpstream).start();
/// let socket = leader.bind_unix(dir.path().join("leader.sock"))?; // in a private (0700) directory
/// assert!(socket.exists());
/// // ... followers connect to `socket` ...
/// leader.shutdown().await; // stops serving and drops the upstream clients
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Leader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader").field("id", &self.shared.id).field("epoch", &self.shared.epoch).finish()
    }
}

impl Leader {
    /// The leader that `shared` describes, started by [`LeaderBuilder::start`](crate::LeaderBuilder::start).
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Leader { shared }
    }

    /// The leader's random id.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    /// The leader's epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// Whether the leader's [fence](crate::LeaderBuilder::fence) said another process
    /// took its place: it serves nothing more (it stops as if shut down).
    pub fn is_fenced(&self) -> bool {
        self.shared.fence.as_ref().is_some_and(|fence| fence.is_fenced())
    }

    /// The current state of a channel's upstream, if the leader serves it.
    pub fn upstream_state(&self, channel: &str) -> Option<UpstreamState> {
        self.shared.channels.get(channel).map(|c| c.state.borrow().clone())
    }

    /// Serves followers on a Unix socket at `path`.
    ///
    /// The socket's directory is created with mode 0700 if missing; an existing
    /// one must belong to this user and be closed to others. A stale socket
    /// file at `path` is replaced: callers make sure no live leader owns it (the
    /// election lock does). Each peer's uid is checked with `SO_PEERCRED` before
    /// its first byte is read.
    pub fn bind_unix(&self, path: impl AsRef<Path>) -> Result<PathBuf, Error> {
        let path = path.as_ref().to_path_buf();
        let bind_error = |source| Error::Bind { path: path.display().to_string(), source };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        ensure_private_dir(dir).map_err(|e| match e {
            DirError::Io(source) => bind_error(source),
            DirError::Insecure(mode) => Error::InsecureDirectory { path: dir.to_path_buf(), mode },
            DirError::Foreign { owner, uid } => Error::ForeignDirectory { path: dir.to_path_buf(), owner, uid },
            DirError::NotADirectory => Error::NotADirectory { path: dir.to_path_buf() },
        })?;
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        let bound = std::fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino())).map_err(bind_error)?;
        tracing::debug!(path = %path.display(), "leader listening");
        let shared = self.shared.clone();
        let socket = path.clone();
        self.shared.tracker.spawn(
            async move {
                accept_unix(shared, listener).await;
                // Only the socket this leader bound: a leader that took over from
                // this one (fenced) has its own socket at the same path.
                let ours = std::fs::symlink_metadata(&socket).is_ok_and(|m| (m.dev(), m.ino()) == bound);
                if ours {
                    let _ = std::fs::remove_file(&socket);
                }
            }
            .in_current_span(),
        );
        Ok(path)
    }

    /// Serves followers over TCP on a loopback address (needs a token: TCP has no peer uid).
    pub async fn bind_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        if !addr.ip().is_loopback() {
            return Err(Error::NotLoopback(addr));
        }
        if self.shared.token.is_none() {
            return Err(Error::TokenRequired);
        }
        let listener =
            TcpListener::bind(addr).await.map_err(|source| Error::Bind { path: addr.to_string(), source })?;
        let local = listener.local_addr().map_err(|source| Error::Bind { path: addr.to_string(), source })?;
        tracing::debug!(addr = %local, "leader listening on TCP");
        self.shared.tracker.spawn(accept_tcp(self.shared.clone(), listener).in_current_span());
        Ok(local)
    }

    /// Serves one follower over a link that some other transport established
    /// (the cluster's messenger relay, a test harness).
    pub fn serve_link(&self, link: Link, peer: PeerInfo) {
        self.shared
            .tracker
            .spawn(session::run(self.shared.clone(), link, peer, Admission::trusted()).in_current_span());
    }

    /// A link for a follower in this very process: frames travel through memory,
    /// with the same deadlines, subscription sharing and ordering as a socket.
    pub fn connect_local(&self) -> Link {
        let (ours, theirs) = Link::pair(1024);
        let peer =
            PeerInfo { pid: i32::try_from(std::process::id()).ok(), uid: None, transport: "local", trusted: true };
        self.serve_link(ours, peer);
        theirs
    }

    /// What the leader is doing now.
    pub fn stats(&self) -> Stats {
        let mut channels: Vec<ChannelStats> = self
            .shared
            .channels
            .values()
            .map(|channel| {
                let counts = channel.hub.counts();
                ChannelStats {
                    name: channel.name.to_string(),
                    upstream: channel.state.borrow().clone(),
                    subscriptions: counts.keys,
                    subscribers: counts.subscribers,
                    keys: channel.hub.keys(),
                }
            })
            .collect();
        channels.sort_by(|a, b| a.name.cmp(&b.name));
        Stats {
            leader_id: self.shared.id,
            epoch: self.shared.epoch,
            followers: self.shared.followers.load(Ordering::Relaxed),
            in_flight: self.shared.in_flight.load(Ordering::Relaxed),
            conflated_events: self.shared.conflated.load(Ordering::Relaxed),
            events_sent: self.shared.channels.values().map(|c| c.hub.events.load(Ordering::Relaxed)).sum(),
            undelivered_dropped: self
                .shared
                .channels
                .values()
                .map(|c| c.hub.undelivered_dropped.load(Ordering::Relaxed))
                .sum(),
            follower_list: {
                let peers = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner());
                let mut list: Vec<crate::FollowerStats> = peers.values().cloned().collect();
                list.sort_by_key(|f| f.id);
                list
            },
            call_latency: self.shared.call_latency.snapshot(),
            channels,
        }
    }

    /// A token cancelled when the leader shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// Stops: says goodbye to every follower (`Goodbye("leader shutting
    /// down")`, [`LeaderGoodbye::ShuttingDown`]), stops listening, cancels
    /// calls, and waits (up to the configured grace) for sessions to flush.
    /// Followers log it at INFO and reconnect to whoever leads next; a leader
    /// whose process just exits (or whose handle is dropped with the runtime)
    /// says nothing, and its followers log `lost the leader` at WARN.
    pub async fn shutdown(&self) {
        self.stop(LeaderGoodbye::ShuttingDown).await;
    }

    /// Steps down so that another process leads: like [`shutdown`](Self::shutdown),
    /// but every follower is told `Goodbye("leader handing off")`
    /// ([`LeaderGoodbye::HandOff`]), logs the hand-off at INFO (not as a lost
    /// leader) and looks for the next leader at once. Whoever elects leaders
    /// releases its lock after this returns: the standalone election does it
    /// in `Connection::step_down` (tandem-follower).
    ///
    /// ```
    /// use tandem_leader::Leader;
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
    /// # async fn main() {
    /// let leader = Leader::builder().epoch(7).channel(EchoUpstream).start();
    /// // ... serve followers ...
    /// leader.hand_off().await; // followers: "the leader handed off" (INFO), then the next leader
    /// assert!(leader.shutdown_token().is_cancelled());
    /// # }
    /// ```
    pub async fn hand_off(&self) {
        self.stop(LeaderGoodbye::HandOff).await;
    }

    async fn stop(&self, goodbye: LeaderGoodbye) {
        // The first reason given wins: a hand-off is not turned into a shutdown by a later call.
        let _ = self.shared.leaving.set(goodbye);
        tracing::debug!(epoch = self.shared.epoch, reason = %goodbye, "leader stopping");
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        let grace = self.shared.config.shutdown_grace + Duration::from_millis(100);
        if tokio::time::timeout(grace, self.shared.tracker.wait()).await.is_err() {
            tracing::warn!("leader tasks still running after the shutdown grace");
        }
    }
}

enum DirError {
    Io(std::io::Error),
    Insecure(u32),
    Foreign { owner: u32, uid: u32 },
    NotADirectory,
}

fn ensure_private_dir(dir: &Path) -> Result<(), DirError> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(DirError::NotADirectory);
            }
            // The owner first: only the owner can fix the mode.
            let uid = nix::unistd::geteuid().as_raw();
            if meta.uid() != uid {
                return Err(DirError::Foreign { owner: meta.uid(), uid });
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(DirError::Insecure(mode));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(DirError::Io)
        }
        Err(e) => Err(DirError::Io(e)),
    }
}

use std::os::unix::fs::DirBuilderExt;

/// Waits for a handshake slot, then for a connection; `None` once the leader stops.
///
/// A failed `accept` (out of descriptors, say) is logged (rate-limited) and
/// followed by a pause that grows while it lasts; the sessions already running
/// are served all along.
async fn next_connection<S, A>(
    shared: &Shared,
    errors: &mut AcceptErrors,
    mut accept: impl FnMut() -> A,
) -> Option<(S, Admission)>
where
    A: Future<Output = std::io::Result<S>>,
{
    let admission = tokio::select! {
        admission = shared.handshakes.slot() => admission,
        _ = shared.cancel.cancelled() => return None,
    };
    loop {
        let accepted = tokio::select! {
            accepted = accept() => accepted,
            _ = shared.cancel.cancelled() => return None,
        };
        match accepted {
            Ok(stream) => {
                errors.succeeded();
                return Some((stream, admission));
            }
            Err(error) => {
                let pause = errors.failed(&error);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.cancel.cancelled() => return None,
                }
            }
        }
    }
}

async fn accept_unix(shared: Arc<Shared>, listener: UnixListener) {
    let uid = nix::unistd::geteuid().as_raw();
    let mut errors = AcceptErrors::new("leader unix socket");
    loop {
        let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
        let Some((stream, admission)) = next_connection(&shared, &mut errors, accept).await else { return };
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(error) => {
                tracing::warn!(%error, "cannot read peer credentials; connection dropped");
                continue;
            }
        };
        if cred.uid() != uid {
            tracing::warn!(peer.uid = cred.uid(), peer.pid = cred.pid(), "connection from another user refused");
            continue;
        }
        let (read, write) = match tandem_protocol::unix::split(stream) {
            Ok(halves) => halves,
            Err(error) => {
                tracing::warn!(%error, "cannot register the connection; connection dropped");
                continue;
            }
        };
        let read = admission.limit(read, shared.config.max_hello_length);
        let link = Link::from_io(read, write, FrameCodec::with_max_frame_length(shared.config.max_frame_length));
        let peer = PeerInfo { pid: cred.pid(), uid: Some(cred.uid()), transport: "unix", trusted: false };
        shared.tracker.spawn(session::run(shared.clone(), link, peer, admission).in_current_span());
    }
}

async fn accept_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let mut errors = AcceptErrors::new("leader tcp socket");
    loop {
        let accept = || listener.accept();
        let Some(((stream, addr), admission)) = next_connection(&shared, &mut errors, accept).await else { return };
        if !addr.ip().is_loopback() {
            tracing::warn!(peer.addr = %addr, "non-loopback connection refused");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let read = admission.limit(read, shared.config.max_hello_length);
        let link = Link::from_io(read, write, FrameCodec::with_max_frame_length(shared.config.max_frame_length));
        let peer = PeerInfo { pid: None, uid: None, transport: "tcp", trusted: false };
        shared.tracker.spawn(session::run(shared.clone(), link, peer, admission).in_current_span());
    }
}
