//! The untyped connection handle: one per process, shared by every channel's client.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tandem_protocol::Api;
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::Command;
use crate::driver::Driver;
use crate::shared::Shared;
use crate::slots::Slots;
use crate::state::Status;
use crate::{Client, Config, Connector};

pub(crate) struct Inner {
    pub(crate) commands: mpsc::Sender<Command>,
    /// Cancels and unsubscribes from `Drop` impls, which cannot wait. Bounded in
    /// practice by the number of live call futures and subscriptions.
    pub(crate) drops: mpsc::UnboundedSender<Command>,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) config: Config,
    pub(crate) next_id: Arc<AtomicU64>,
    /// The calls of the slots path ([`CallPath::Slots`](crate::CallPath::Slots)), shared with the driver.
    pub(crate) slots: Arc<Slots>,
}

/// One connection to the leader (direct, relayed or in-process), shared by the
/// typed [`Client`]s of every channel it was built with. Cheap to clone.
///
/// Built with [`Connection::builder`] ([`ConnectionBuilder`]) and a
/// [`Connector`](crate::Connector): here the leader's own process reaches it
/// through memory ([`LocalConnector`](crate::LocalConnector)) and another
/// connection through its Unix socket ([`UnixConnector`](crate::UnixConnector)),
/// as a follower process would.
///
/// ```
/// use tandem_follower::{Connection, LocalConnector, UnixConnector};
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
///
/// let own = Connection::builder().connect(LocalConnector::new(leader.clone())).spawn();
/// let follower = Connection::builder().connect(UnixConnector::new(socket)).spawn();
/// assert_eq!(own.client::<Echo>().invoke("a".into()).await?, "a");
/// assert_eq!(follower.client::<Echo>().invoke("b".into()).await?, "b");
/// assert!(own.is_leader() && !follower.is_leader());
/// follower.close().await;
/// leader.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("status", &*self.inner.status.borrow()).finish()
    }
}

/// A connection and the driver that must run for it to do anything.
#[must_use = "spawn the driver, or the connection does nothing"]
#[derive(Debug)]
pub struct NewConnection<C> {
    /// The handle.
    pub connection: Connection,
    /// The task owning the link: spawn `driver.run()`.
    pub driver: Driver<C>,
}

impl<C: Connector> NewConnection<C> {
    /// Spawns the driver on the current tokio runtime and returns the handle.
    pub fn spawn(self) -> Connection {
        // In the caller's span: the driver's lines carry the process's role and pid.
        tokio::spawn(tracing::Instrument::in_current_span(self.driver.run()));
        self.connection
    }
}

/// Builds a [`Connection`]: its settings and the channels it carries.
#[derive(Debug, Default)]
#[must_use]
pub struct ConnectionBuilder {
    config: Config,
    channels: Vec<&'static str>,
}

impl ConnectionBuilder {
    /// Settings. The default is [`Config::default()`].
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Names a channel in the handshake. Optional: the first call, publish or
    /// subscribe on a channel adds it anyway (in the next handshake, and with
    /// an `Open` frame when connected); naming it here makes the leader check
    /// it at the handshake, and the channel's state known before the first use.
    pub fn channel<A: Api>(mut self) -> Self {
        if !self.channels.contains(&A::NAME) {
            self.channels.push(A::NAME);
        }
        self
    }

    /// Creates the connection; nothing happens until the driver runs.
    pub fn connect<C: Connector>(self, connector: C) -> NewConnection<C> {
        let (commands, command_rx) = mpsc::channel(self.config.command_queue.max(1));
        let (drops, drop_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::new());
        let next_id = Arc::new(AtomicU64::new(1));
        let slots = Arc::new(Slots::new(self.config.command_queue));
        let shared = Shared { status: status_tx, next_id: next_id.clone(), slots: slots.clone() };
        let driver = Driver::new(self.config.clone(), self.channels, connector, command_rx, drop_rx, shared);
        let inner = Inner { commands, drops, status, config: self.config, next_id, slots };
        NewConnection { connection: Connection { inner: Arc::new(inner) }, driver }
    }
}

impl Connection {
    /// A builder with default settings and no channels.
    pub fn builder() -> ConnectionBuilder {
        ConnectionBuilder::default()
    }

    /// The typed client of one channel; its first use opens the channel on
    /// this connection (no builder step to forget).
    pub fn client<A: Api>(&self) -> Client<A> {
        let _ = self.inner.drops.send(crate::command::Command::Open(A::NAME));
        Client::new(self.clone())
    }

    /// The connection's state, observable: await changes with `changed()`.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.inner.status.clone()
    }

    /// Whether this process is the leader.
    pub fn is_leader(&self) -> bool {
        self.inner.status.borrow().is_leader()
    }

    /// Hands this process's leadership to another process, gracefully, and
    /// keeps the connection: this process then follows the new leader.
    ///
    /// The leader sends every follower `Goodbye("leader handing off")` and
    /// stops (its upstream clients are dropped); with [`Standalone`](crate::Standalone)
    /// the election lock is released, the other processes re-elect at once
    /// and the next one leads at the next epoch. Followers log the hand-off
    /// at INFO with the old and the new epoch, not `lost the leader` at WARN
    /// (which stays the sign of a fault: a leader that died, or a process
    /// that exited while leading without stepping down or closing). Calls in
    /// flight fail with [`Error::LeaderLost`](crate::Error::LeaderLost) and
    /// may be retried; subscriptions carry on with the next leader, in order.
    ///
    /// The process that stepped down leaves the lock to the others for
    /// 500 ms (`HAND_OFF_WAIT`); if none takes it (it was alone), it leads
    /// again at the next epoch. [`close`](Self::close) on a leading process
    /// steps down too, so a process that leaves its `main` after `close`
    /// ends cleanly.
    ///
    /// Returns once the old leader has stopped and its lock is released, or
    /// [`Error::NotLeader`](crate::Error::NotLeader) when this process does
    /// not lead (or leads by a fixed role: a [`LocalConnector`](crate::LocalConnector)).
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
    /// let dir = tmp.path().join("myapp"); // private (0700), shared by the processes
    /// let setup = |leader: tandem_leader::LeaderBuilder| leader.channel(EchoUpstream);
    /// let a = Connection::builder().connect(Standalone::new("myapp", &dir, setup)).spawn();
    /// a.client::<Echo>().ready().await?;
    /// let b = Connection::builder().connect(Standalone::new("myapp", &dir, setup)).spawn();
    /// b.client::<Echo>().ready().await?;
    /// assert!(a.is_leader() && !b.is_leader());
    ///
    /// a.step_down().await?; // b logs "the leader handed off" (INFO) and leads at epoch 2
    /// let mut status = b.status();
    /// status.wait_for(|s| s.is_leader() && s.epoch() == Some(2)).await?;
    /// assert_eq!(b.client::<Echo>().invoke("hi".into()).await?, "hi");
    /// a.close().await; // a followed b meanwhile; closing a follower hands nothing off
    /// # Ok(()) }
    /// ```
    pub async fn step_down(&self) -> Result<(), crate::Error> {
        let (reply, stepped) = oneshot::channel();
        self.inner.commands.send(Command::StepDown(reply)).await.map_err(|_| crate::Error::Closed)?;
        stepped.await.unwrap_or(Err(crate::Error::Closed))
    }

    /// Mirrors the leader (protocol version 3, PROTOCOL.md §7.2): a live view
    /// of every key the leader follows, whoever subscribed it, with its latest
    /// value, position and upstream revision; what a hot standby holds to
    /// take over warm ([`Mirror::entries`](crate::Mirror::entries) seeds a new leader).
    ///
    /// Returns once the leader accepted (await [`Mirror::synced`](crate::Mirror::synced)
    /// for its snapshot). The connection mirrors from then on, for its life,
    /// across leaders: when the leader is lost the view keeps its last state,
    /// and each next leader's snapshot replaces it once complete. Calling it
    /// again returns the same view.
    ///
    /// A leader that speaks protocol version 1 or 2 cannot be mirrored: the
    /// call fails with [`Error::Remote`](crate::Error::Remote), kind `Rejected`,
    /// code `version`, and nothing is sent to it.
    pub async fn mirror(&self) -> Result<crate::Mirror, crate::Error> {
        let (reply, mirrored) = oneshot::channel();
        self.inner.commands.send(Command::Mirror(reply)).await.map_err(|_| crate::Error::Closed)?;
        mirrored.await.unwrap_or(Err(crate::Error::Closed))
    }

    /// Says goodbye to the leader and stops the driver; outstanding calls fail
    /// with [`Error::Closed`](crate::Error::Closed). On the leading process
    /// (elected by [`Standalone`](crate::Standalone)) it first
    /// [steps down](Self::step_down): the followers re-elect at once.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.inner.drops.send(Command::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}
