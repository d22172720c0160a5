//! The runtime of a child process (agent or worker): joins the master over the
//! inherited IPC channel, guards against orphaning, runs the user's start
//! function with its context, and exits.
//!
//! Orphan prevention, two ways: `PR_SET_PDEATHSIG(SIGKILL)` (set before exec
//! and again here, each followed by a `getppid` check to close the race with a
//! master that died just before), and exit on EOF of the IPC channel.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tandem_protocol::CodecError;
use tandem_protocol::internal::{Refused, WriteLimits, WriteSource};
use tandem_protocol::unix::{UnixReadHalf, UnixWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{AgentFn, WorkerFn};
use crate::child_context::ChildContext;
use crate::identity::{AgentInfo, Origin};
use crate::ipc::{ChildCodec, Delivery, FromChild, Init, Outcome, ToChild};
use crate::link::LinkTable;
use crate::listeners::ReceivedListeners;
use crate::messenger::{Answer, ChildShared, Endpoint, Inbox, Transport};
use crate::spawn::{ENV_CLUSTER, ENV_FD_CHANNEL, ENV_IPC_FD, ENV_MASTER_PID, ENV_NAME, ENV_ROLE, ENV_WORKER_ID};
use crate::trace::ProcessSpan;
use crate::{AgentContext, Error, Messenger, ProcessRole, WorkerContext, WorkerId};

/// The exit code of a child whose master is gone (as egg's agent uses).
pub(crate) const MASTER_GONE_EXIT: i32 = 110;

/// How long a child waits for its `Init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames queued towards the master; senders wait when it is full.
const WRITER_CAPACITY: usize = 1024;

/// Incoming links queued for the agent's `links()` stream; when full, a new link is closed.
const INCOMING_LINKS_CAPACITY: usize = 64;

/// What the master put in this child's environment.
#[derive(Debug, Clone)]
pub(crate) struct ChildEnv {
    pub role: ProcessRole,
    pub worker_id: Option<WorkerId>,
    pub ipc_fd: RawFd,
    pub master_pid: u32,
    pub cluster: String,
    /// The cluster's name as `tandem ls` shows it.
    pub name: String,
    /// The descriptor channel's fd.
    pub fd_channel: Option<RawFd>,
}

impl ChildEnv {
    /// `None` when this process is not a cluster child (so it is the master).
    pub(crate) fn from_env() -> Result<Option<Self>, Error> {
        let Some(role) = std::env::var_os(ENV_ROLE) else {
            return Ok(None);
        };
        let role = match role.to_str() {
            Some("agent") => ProcessRole::Agent,
            Some("worker") => ProcessRole::Worker,
            _ => return Err(Error::child_setup(format!("{ENV_ROLE}={role:?} is not agent or worker"), None)),
        };
        fn var<T: std::str::FromStr>(name: &str) -> Result<T, Error> {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::child_setup(format!("{name} is missing or invalid"), None))
        }
        let worker_id = match role {
            ProcessRole::Worker => Some(var(ENV_WORKER_ID)?),
            _ => None,
        };
        Ok(Some(ChildEnv {
            role,
            worker_id,
            ipc_fd: var(ENV_IPC_FD)?,
            master_pid: var(ENV_MASTER_PID)?,
            cluster: var(ENV_CLUSTER)?,
            name: std::env::var(ENV_NAME).unwrap_or_default(),
            fd_channel: std::env::var(ENV_FD_CHANNEL).ok().and_then(|v| v.parse().ok()),
        }))
    }
}

/// Runs this child; returns its exit code (the caller exits with it).
pub(crate) async fn run(env: ChildEnv, agent_fn: AgentFn, worker_fn: WorkerFn) -> i32 {
    match join(&env).await {
        Ok((init, reader, writer, listeners)) => {
            let pid = std::process::id();
            let (promote_tx, promote_rx) = watch::channel(None);
            let span = match env.role {
                ProcessRole::Worker => ProcessSpan::worker(&env.name, env.worker_id, pid),
                // Started as the standby: the agent's span (and epoch) come with the promotion.
                _ if init.standby => ProcessSpan::standby(&env.name, pid, promote_rx.clone()),
                _ => ProcessSpan::agent(&env.name, init.epoch, pid),
            };
            let io = Io { reader, writer, listeners, promote: (promote_tx, promote_rx) };
            span.instrument(serve(env, init, io, span.clone(), agent_fn, worker_fn)).await
        }
        Err(e) => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), "cannot join the cluster");
            1
        }
    }
}

type Reader = FramedRead<UnixReadHalf, ChildCodec>;
type Writer = FramedWrite<UnixWriteHalf, ChildCodec>;

/// Guards against orphaning, takes the IPC channel, reads `Init` and receives
/// the listening sockets.
async fn join(env: &ChildEnv) -> Result<(Init, Reader, Writer, ReceivedListeners), Error> {
    die_with_master(env.master_pid)?;
    let (rd, wr) = take_ipc(env.ipc_fd)?;
    let mut reader = FramedRead::new(rd, ChildCodec::new());
    let writer = FramedWrite::new(wr, ChildCodec::new());
    let init = match tokio::time::timeout(INIT_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ToChild::Init(init)))) => init,
        Ok(Some(Ok(other))) => return Err(Error::child_setup(format!("the master sent {other:?} before Init"), None)),
        Ok(Some(Err(e))) => {
            return Err(Error::child_setup(format!("its IPC channel failed: {e}"), None));
        }
        Ok(None) => return Err(Error::MasterGone),
        Err(_) => return Err(Error::child_setup(format!("no Init from the master within {INIT_TIMEOUT:?}"), None)),
    };
    if init.role != env.role || init.worker_id != env.worker_id || init.cluster != env.cluster {
        return Err(Error::child_setup(
            format!(
                "the master's Init ({} {:?} of {:?}) does not match the environment ({} {:?} of {:?})",
                init.role, init.worker_id, init.cluster, env.role, env.worker_id, env.cluster
            ),
            None,
        ));
    }
    let listeners = receive_listeners(env, init.listeners).await?;
    Ok((init, reader, writer, listeners))
}

/// Reads the `count` listening sockets the master sends on the descriptor channel.
async fn receive_listeners(env: &ChildEnv, count: u32) -> Result<ReceivedListeners, Error> {
    let mut received = ReceivedListeners::default();
    if count == 0 {
        return Ok(received);
    }
    let Some(fd) = env.fd_channel else {
        return Err(Error::child_setup(format!("{ENV_FD_CHANNEL} is missing but {count} listeners are due"), None));
    };
    let io = |what: &str, e: std::io::Error| Error::child_setup(format!("its descriptor channel {what}"), Some(e));
    nix::sys::stat::fstat(fd).map_err(|e| io("is not open", std::io::Error::from_raw_os_error(e as i32)))?;
    // SAFETY: `fd` was inherited from the master for exactly this purpose
    // (named by TANDEM_FD_CHANNEL) and is open (checked above); this is the
    // only place that wraps it, once per process (after `take_ipc`, which
    // guards against a second run()).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| io("could not be set up", std::io::Error::from_raw_os_error(e as i32)))?;
    let channel = Arc::new(crate::fdpass::FdChannel::new(owned).map_err(|e| io("could not be set up", e))?);
    received.round_robin = Some(crate::round_robin::WorkerSide::new(Arc::clone(&channel)));
    while received.len() < count as usize {
        let message = tokio::time::timeout(INIT_TIMEOUT, channel.recv())
            .await
            .map_err(|_| Error::child_setup(format!("its listeners did not arrive within {INIT_TIMEOUT:?}"), None))?
            .map_err(|e| io("failed", e))?;
        let Some(message) = message else { return Err(Error::MasterGone) };
        received.add(&message.header, message.fd).map_err(|problem| Error::child_setup(problem, None))?;
    }
    Ok(received)
}

/// Asks the kernel to SIGKILL this process when its parent dies, then checks
/// the parent is still the master (it may have died before the call).
fn die_with_master(master_pid: u32) -> Result<(), Error> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(|e| {
        Error::child_setup("it could not set PR_SET_PDEATHSIG", Some(std::io::Error::from_raw_os_error(e as i32)))
    })?;
    let parent = nix::unistd::getppid().as_raw();
    if u32::try_from(parent).ok() != Some(master_pid) {
        return Err(Error::child_setup(
            format!("its master (pid {master_pid}) is gone (parent is now {parent})"),
            None,
        ));
    }
    Ok(())
}

static IPC_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the inherited IPC socket.
fn take_ipc(fd: RawFd) -> Result<(UnixReadHalf, UnixWriteHalf), Error> {
    use nix::sys::stat::{SFlag, fstat};
    if IPC_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(Error::child_setup("its IPC channel was already taken by an earlier run()", None));
    }
    let stat = fstat(fd).map_err(|e| {
        Error::child_setup(format!("its IPC fd {fd} is not open"), Some(std::io::Error::from_raw_os_error(e as i32)))
    })?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(Error::child_setup(format!("its IPC fd {fd} is not a socket"), None));
    }
    // SAFETY: `fd` was inherited from the master for exactly this purpose
    // (named by TANDEM_IPC_FD), is open and a socket (checked above), and
    // nothing else in this process owns it: `IPC_TAKEN` makes this the only
    // place that ever wraps it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let io = |e: std::io::Error| Error::child_setup("its IPC channel could not be set up", Some(e));
    // Our own children (if the user spawns any) must not inherit it.
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| io(std::io::Error::from_raw_os_error(e as i32)))?;
    tandem_protocol::unix::split_std(StdUnixStream::from(owned)).map_err(io)
}

/// What `serve` runs on: the IPC channel's halves, the sockets received, and
/// the channel of a standby's promotion.
struct Io {
    reader: Reader,
    writer: Writer,
    listeners: ReceivedListeners,
    promote: (watch::Sender<Option<crate::Promotion>>, watch::Receiver<Option<crate::Promotion>>),
}

/// Runs the start function; its tasks run in `span` (a standby's switches to
/// the agent's at its promotion).
async fn serve(env: ChildEnv, init: Init, io: Io, span: ProcessSpan, agent_fn: AgentFn, worker_fn: WorkerFn) -> i32 {
    let Io { reader, writer, listeners, promote: (promote_tx, promote_rx) } = io;
    let pid = std::process::id();
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel::<FromChild>(WRITER_CAPACITY);
    // Link messages: bounded by the links' credits (see `link`), never waited for.
    let (links_tx, links_rx) = mpsc::unbounded_channel::<FromChild>();
    let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_LINKS_CAPACITY);
    let incoming = (env.role == ProcessRole::Agent).then_some(incoming_tx);
    let links = LinkTable::new(init.link_capacity as usize, links_tx, incoming);
    let shared = Arc::new(ChildShared::new(tx, links));
    let me = match (env.role, env.worker_id) {
        (ProcessRole::Worker, Some(id)) => Origin::Worker { id, pid },
        _ => Origin::Agent { pid, epoch: init.epoch },
    };
    let endpoint = Arc::new(Endpoint {
        me,
        inbox: Inbox::new(init.subscription_capacity as usize),
        transport: Transport::Child(Arc::clone(&shared)),
    });
    let stop = CancellationToken::new();
    let (ready_tx, ready_rx) = watch::channel(init.cluster_ready);
    let agent_info = init.agent.clone().unwrap_or(AgentInfo {
        pid: 0,
        epoch: 0,
        socket: init.runtime_dir.join("leader.sock"),
        up: false,
    });
    let (agent_tx, agent_rx) = watch::channel(agent_info);
    let core = Arc::new(ChildContext {
        init,
        pid,
        messenger: Messenger::new(Arc::clone(&endpoint)),
        stop: stop.clone(),
        shared: Arc::clone(&shared),
        ready_sent: AtomicBool::new(false),
        cluster_ready: ready_rx,
        listeners: std::sync::Mutex::new(listeners),
        promoted: promote_rx,
    });

    if let Ok(listeners) = core.listeners.lock()
        && let Some(rr) = listeners.round_robin.as_ref().filter(|rr| rr.len() > 0)
    {
        rr.spawn_reader(stop.clone(), &tracker);
    }
    let flush = CancellationToken::new();
    let writer_task = tokio::spawn(span.instrument(write_loop(writer, rx, links_rx, flush.clone())));
    let dispatch = Dispatch {
        endpoint,
        shared,
        stop: stop.clone(),
        cluster_ready: ready_tx,
        agent: agent_tx,
        promote: promote_tx,
    };
    tracker.spawn(span.instrument(read_loop(reader, dispatch)));
    match crate::signals::child_signals(stop) {
        Ok(signals) => {
            tracker.spawn(span.instrument(signals));
        }
        Err(e) => tracing::warn!(error = %e, "could not install signal handlers; SIGTERM will kill this process"),
    }

    tracing::debug!("started");
    let start = match env.role {
        ProcessRole::Agent => agent_fn(AgentContext::new(core, incoming_rx)),
        _ => worker_fn(WorkerContext::new(Arc::clone(&core), env.worker_id.unwrap_or(0), agent_rx)),
    };
    // A panic still ends the process (the hook has printed it), but only once
    // what the function had sent is written: a `ready()` it awaited reaches the
    // master even when the runtime has no other thread to run the writer on.
    let result = match std::panic::AssertUnwindSafe(start).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            tracing::error!("start function panicked; exiting");
            flush.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
            std::panic::resume_unwind(panic);
        }
    };
    let code = match result {
        Ok(()) => {
            tracing::debug!("start function returned; exiting");
            0
        }
        Err(e) if matches!(e.downcast_ref::<Error>(), Some(Error::StandbyStopped)) => {
            tracing::debug!("stopped as the standby; exiting");
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "start function failed; exiting");
            1
        }
    };
    // Send what is still queued (replies, frames) before exiting.
    flush.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    code
}

/// Writes what is queued for the master until the queue closes or `flush` is
/// cancelled (then what is still queued is written first). Any write error,
/// a refused frame included, ends it: the master is gone, and the reader sees
/// EOF and exits the process.
async fn write_loop(
    mut w: Writer,
    rx: mpsc::Receiver<FromChild>,
    links: mpsc::UnboundedReceiver<FromChild>,
    flush: CancellationToken,
) {
    let _ =
        tandem_protocol::internal::write_loop(&mut ToMaster { rx, links, flush }, &mut w, WriteLimits::default()).await;
}

struct ToMaster {
    rx: mpsc::Receiver<FromChild>,
    /// The links' frames, credits and closes.
    links: mpsc::UnboundedReceiver<FromChild>,
    flush: CancellationToken,
}

impl WriteSource for ToMaster {
    type Item = FromChild;
    type Tag = ();

    async fn next(&mut self) -> Option<FromChild> {
        tokio::select! {
            biased;
            Some(item) = self.rx.recv() => Some(item),
            Some(item) = self.links.recv() => Some(item),
            _ = self.flush.cancelled() => self.try_next(),
        }
    }

    fn try_next(&mut self) -> Option<FromChild> {
        self.rx.try_recv().or_else(|_| self.links.try_recv()).ok()
    }

    fn tag(_: &FromChild) {}

    fn refused(&mut self, (): (), error: CodecError) -> Refused<FromChild> {
        Refused::Fatal(error)
    }
}

struct Dispatch {
    endpoint: Arc<Endpoint>,
    shared: Arc<ChildShared>,
    stop: CancellationToken,
    cluster_ready: watch::Sender<bool>,
    agent: watch::Sender<AgentInfo>,
    /// A standby's promotion.
    promote: watch::Sender<Option<crate::Promotion>>,
}

async fn read_loop(mut reader: Reader, d: Dispatch) {
    loop {
        match reader.next().await {
            Some(Ok(msg)) => d.dispatch(msg),
            Some(Err(e)) => {
                tracing::error!(error = %e, "bad frame from the master; exiting");
                break;
            }
            None => {
                tracing::warn!("IPC channel closed: the master is gone; exiting");
                break;
            }
        }
    }
    d.shared.fail_all();
    let _ = std::io::stdout().flush();
    std::process::exit(MASTER_GONE_EXIT);
}

impl Dispatch {
    /// Never waits: the reader must keep draining the channel.
    fn dispatch(&self, msg: ToChild) {
        match msg {
            ToChild::Init(_) => tracing::warn!("a second Init from the master; ignored"),
            ToChild::AgentChanged(info) => {
                tracing::debug!(agent.pid = info.pid, epoch = info.epoch, up = info.up, "agent changed");
                self.agent.send_replace(info);
            }
            ToChild::ClusterReady => {
                self.cluster_ready.send_replace(true);
            }
            ToChild::Promote { epoch, succeeded } => {
                tracing::debug!(epoch, succeeded, "promoted: this standby leads now");
                self.promote.send_replace(Some(crate::Promotion { epoch, succeeded }));
            }
            ToChild::Ping { seq } => {
                // Answered here, by the task that reads the channel: only a
                // runtime that runs answers. When the writer's queue is full
                // the master is not reading; this ping then goes unanswered.
                if let Err(e) = self.shared.writer.try_send(FromChild::Pong { seq }) {
                    tracing::debug!(error = %e, seq, "ping not answered");
                }
            }
            ToChild::Stop { grace_ms } => {
                tracing::debug!(grace_ms, "the master asks this process to stop");
                self.stop.cancel();
            }
            ToChild::Outcome { id, outcome: Outcome::LinkOpened { link } } => {
                // Registered here, before any of the link's frames can be read.
                let frame_link = self.shared.links.attach(link);
                self.shared.complete(id, Answer::Link(frame_link));
            }
            ToChild::Outcome { id, outcome } => self.shared.complete(id, Answer::Outcome(outcome)),
            ToChild::Deliver(Delivery { topic, payload, from, request }) => {
                self.endpoint.deliver(topic, from, payload, request)
            }
            ToChild::IncomingLink { link, worker_id, pid } => self.shared.links.incoming(link, worker_id, pid),
            ToChild::LinkFrame { link, frame } => self.shared.links.deliver(link, &frame),
            ToChild::LinkClosed { link, reason } => self.shared.links.peer_closed(link, &reason),
            ToChild::LinkCredit { link, credit } => self.shared.links.credit(link, credit),
        }
    }
}
