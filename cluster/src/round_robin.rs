//! The `round-robin` sharing mode: the master accepts, and hands each
//! connection to the next ready worker over its descriptor channel (Node's
//! `RoundRobinHandle` model).
//!
//! ```text
//! master: accept ──> dispatcher ── "C <id> <name>" + fd ──> worker (its RoundRobinListener)
//!                        ^                                      │ accept() returns it
//!                        └────────────── "A <id>" (ack) ────────┘ or "B <id>" (back: stopping)
//!                                                                  or "L <id>" (lost: see below)
//! ```
//!
//! The master keeps its own descriptor of each connection until the worker
//! acknowledges it (before reading a byte from it). A connection handed back
//! by a stopping worker, or left unacknowledged by a worker that died, is
//! given to another worker: nobody has read from it, so nothing is lost. A
//! worker is given at most [`MAX_UNACKED`] connections it has not
//! acknowledged (so a busy or stuck worker is skipped); when no worker can
//! take one, connections wait in a backlog of [`BACKLOG`], beyond which they
//! are closed (logged at WARN: the client sees a reset).
//!
//! A worker out of descriptors receives the header of a handed connection but
//! not its descriptor (the kernel closes it: `MSG_CTRUNC`). It answers
//! `L <id>`; the master then closes its own copy, the last one, so the client
//! sees the connection closed instead of a hang, and counts it
//! ([`RoundRobinStats`], `tandem_round_robin_lost_total` in `/metrics`). Both
//! sides log it at WARN the first time, then at most once per
//! [`WARN_EVERY`](tandem_protocol::internal::WARN_EVERY) with the count held back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tandem_protocol::internal::Throttle;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::fdpass::FdChannel;
use crate::identity::ProcKey;

/// Connections a worker may hold unacknowledged before it is skipped.
pub const MAX_UNACKED: usize = 64;
/// Accepted connections waiting for a worker; beyond this they are closed.
pub const BACKLOG: usize = 4096;
/// Commands queued for the dispatcher (accept loops wait when it is full).
const COMMANDS: usize = 1024;

#[derive(Debug)]
pub(crate) enum Cmd {
    Register {
        key: ProcKey,
        channel: Arc<FdChannel>,
    },
    Ready(ProcKey),
    /// Stopping: no new connections.
    Retire(ProcKey),
    /// Gone: its unacknowledged connections go to others.
    Remove(ProcKey),
    Accepted {
        listener: usize,
        fd: OwnedFd,
    },
    Ack {
        key: ProcKey,
        id: u64,
    },
    Back {
        key: ProcKey,
        id: u64,
    },
    /// The worker could not receive the connection's descriptor.
    Lost {
        key: ProcKey,
        id: u64,
    },
}

/// The master's round-robin counters.
#[derive(Debug, Default)]
pub(crate) struct RoundRobinStats {
    /// Handed connections a worker could not receive (closed by the master).
    lost: AtomicU64,
}

impl RoundRobinStats {
    /// Registers the counters in `registry` (for `/metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let lost = prometheus_client::metrics::counter::Counter::<u64>::default();
        lost.inc_by(self.lost.load(Ordering::Relaxed));
        registry.register(
            "tandem_round_robin_lost",
            "Handed-off connections a worker could not receive (out of descriptors); closed",
            lost,
        );
    }
}

/// The master's handle on the dispatcher.
#[derive(Debug, Clone)]
pub(crate) struct RoundRobin {
    tx: mpsc::Sender<Cmd>,
    stats: Arc<RoundRobinStats>,
}

impl RoundRobin {
    /// Starts the dispatcher and one accept loop per listener
    /// (`(name, listening socket)`, TCP).
    pub(crate) fn start(
        listeners: Vec<(String, OwnedFd)>,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(COMMANDS);
        let names: Vec<String> = listeners.iter().map(|(n, _)| n.clone()).collect();
        let stats = Arc::new(RoundRobinStats::default());
        for (index, (name, fd)) in listeners.into_iter().enumerate() {
            let std = std::net::TcpListener::from(fd);
            std.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(std)?;
            let (tx, cancel) = (tx.clone(), cancel.clone());
            let span = tracing::info_span!("round_robin", listener = %name);
            tasks.spawn(accept_loop(listener, index, tx, cancel).instrument(span));
        }
        let dispatcher = Dispatcher {
            names,
            workers: HashMap::new(),
            order: Vec::new(),
            ready_early: HashSet::new(),
            next: 0,
            next_id: 0,
            backlog: VecDeque::new(),
            tx: tx.clone(),
            tasks: tasks.clone(),
            cancel: cancel.clone(),
            stats: Arc::clone(&stats),
            lost_log: Throttle::default(),
        };
        tasks.spawn(dispatcher.run(rx, cancel).in_current_span());
        Ok(RoundRobin { tx, stats })
    }

    /// The dispatcher's counters.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))] // read by `/metrics` and tests
    pub(crate) fn stats(&self) -> Arc<RoundRobinStats> {
        Arc::clone(&self.stats)
    }

    pub(crate) fn register(&self, key: ProcKey, channel: Arc<FdChannel>) -> impl Future<Output = ()> + Send + 'static {
        let tx = self.tx.clone();
        async move {
            let _ = tx.send(Cmd::Register { key, channel }).await;
        }
    }

    /// Lifecycle notices from the master loop. Never waits: when the queue is
    /// full (accepted connections pile up), the notice is sent by a task.
    pub(crate) fn notify(&self, cmd: Cmd) {
        match self.tx.try_send(cmd) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                tracing::debug!("round-robin dispatcher queue full; sending the notice from a task");
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    index: usize,
    tx: mpsc::Sender<Cmd>,
    cancel: CancellationToken,
) {
    let mut errors = tandem_protocol::internal::AcceptErrors::new("round-robin");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = cancel.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                errors.succeeded();
                let fd = match stream.into_std() {
                    Ok(s) => OwnedFd::from(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not take an accepted connection");
                        continue;
                    }
                };
                if tx.send(Cmd::Accepted { listener: index, fd }).await.is_err() {
                    return;
                }
            }
            // EMFILE and friends: WARN (rate-limited) and a growing pause; the
            // connection waits in the backlog meanwhile.
            Err(e) => tokio::time::sleep(errors.failed(&e)).await,
        }
    }
}

#[derive(Debug)]
struct Worker {
    out: mpsc::Sender<(String, OwnedFd)>,
    ready: bool,
    /// Handed out, not acknowledged yet: (listener, the master's copy).
    unacked: HashMap<u64, (usize, OwnedFd)>,
}

struct Dispatcher {
    names: Vec<String>,
    workers: HashMap<ProcKey, Worker>,
    /// Round-robin order of the registered workers.
    order: Vec<ProcKey>,
    ready_early: HashSet<ProcKey>,
    next: usize,
    next_id: u64,
    backlog: VecDeque<(usize, OwnedFd)>,
    tx: mpsc::Sender<Cmd>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    stats: Arc<RoundRobinStats>,
    lost_log: Throttle,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, cancel: CancellationToken) {
        loop {
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd { Some(cmd) => cmd, None => return },
                _ = cancel.cancelled() => return,
            };
            self.on(cmd);
        }
    }

    fn on(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Register { key, channel } => {
                let (out, out_rx) = mpsc::channel(MAX_UNACKED);
                let ready = self.ready_early.remove(&key);
                self.workers.insert(key, Worker { out, ready, unacked: HashMap::new() });
                self.order.push(key);
                let span = tracing::info_span!("round_robin_worker", slot = %key.slot);
                self.tasks
                    .spawn(write_worker(Arc::clone(&channel), out_rx, self.cancel.clone()).instrument(span.clone()));
                self.tasks.spawn(read_worker(channel, key, self.tx.clone(), self.cancel.clone()).instrument(span));
                self.drain_backlog();
            }
            Cmd::Ready(key) => match self.workers.get_mut(&key) {
                Some(w) => {
                    w.ready = true;
                    self.drain_backlog();
                }
                None => {
                    self.ready_early.insert(key);
                }
            },
            Cmd::Retire(key) => {
                if let Some(w) = self.workers.get_mut(&key) {
                    w.ready = false;
                }
            }
            Cmd::Remove(key) => {
                self.ready_early.remove(&key);
                self.order.retain(|k| *k != key);
                if let Some(w) = self.workers.remove(&key) {
                    for (_, (listener, fd)) in w.unacked {
                        self.dispatch(listener, fd);
                    }
                }
            }
            Cmd::Accepted { listener, fd } => self.dispatch(listener, fd),
            Cmd::Ack { key, id } => {
                if let Some(w) = self.workers.get_mut(&key) {
                    // Dropping the master's copy; the worker owns the connection now.
                    w.unacked.remove(&id);
                }
                self.drain_backlog();
            }
            Cmd::Back { key, id } => {
                let returned = self.workers.get_mut(&key).and_then(|w| {
                    w.ready = false; // only a stopping worker hands connections back
                    w.unacked.remove(&id)
                });
                if let Some((listener, fd)) = returned {
                    self.dispatch(listener, fd);
                }
            }
            Cmd::Lost { key, id } => {
                let lost_connection = self.workers.get_mut(&key).and_then(|w| w.unacked.remove(&id));
                if let Some(connection) = lost_connection {
                    let lost = self.stats.lost.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(suppressed) = self.lost_log.hit() {
                        tracing::warn!(
                            slot = %key.slot,
                            lost,
                            suppressed,
                            "a worker could not receive a handed-off connection (it is out of descriptors); \
                             the connection is closed"
                        );
                    }
                    // Dropping the master's copy, the last one: the client sees the close.
                    drop(connection);
                }
                self.drain_backlog();
            }
        }
    }

    fn drain_backlog(&mut self) {
        while let Some((listener, fd)) = self.backlog.pop_front() {
            if let Err((listener, fd)) = self.try_give(listener, fd) {
                self.backlog.push_front((listener, fd));
                return;
            }
        }
    }

    fn dispatch(&mut self, listener: usize, fd: OwnedFd) {
        if !self.backlog.is_empty() {
            return self.queue(listener, fd);
        }
        if let Err((listener, fd)) = self.try_give(listener, fd) {
            self.queue(listener, fd);
        }
    }

    fn queue(&mut self, listener: usize, fd: OwnedFd) {
        if self.backlog.len() >= BACKLOG {
            tracing::warn!(backlog = BACKLOG, "no worker can take connections and the backlog is full; closing one");
            return;
        }
        self.backlog.push_back((listener, fd));
    }

    /// Gives the connection to the next ready worker with room, or returns it.
    fn try_give(&mut self, listener: usize, fd: OwnedFd) -> Result<(), (usize, OwnedFd)> {
        let n = self.order.len();
        for step in 0..n {
            let key = self.order[(self.next + step) % n];
            let Some(w) = self.workers.get_mut(&key) else { continue };
            if !w.ready || w.unacked.len() >= MAX_UNACKED {
                continue;
            }
            let copy = match fd.try_clone() {
                Ok(copy) => copy,
                Err(e) => {
                    tracing::warn!(error = %e, "could not duplicate a connection; closing it");
                    return Ok(());
                }
            };
            self.next_id += 1;
            let id = self.next_id;
            let header = format!("C {id} {}", self.names.get(listener).map_or("", String::as_str));
            if w.out.try_send((header, copy)).is_err() {
                continue; // its writer is behind or gone: try the next one
            }
            w.unacked.insert(id, (listener, fd));
            self.next = (self.next + step + 1) % n;
            return Ok(());
        }
        Err((listener, fd))
    }
}

async fn write_worker(channel: Arc<FdChannel>, mut rx: mpsc::Receiver<(String, OwnedFd)>, cancel: CancellationToken) {
    loop {
        let (header, fd) = tokio::select! {
            item = rx.recv() => match item { Some(item) => item, None => return },
            _ = cancel.cancelled() => return,
        };
        if let Err(e) = channel.send(&header, Some(fd.as_fd())).await {
            // The worker is gone; its exit makes the master re-dispatch what it held.
            tracing::debug!(error = %e, "could not hand a connection to a worker");
            return;
        }
    }
}

async fn read_worker(channel: Arc<FdChannel>, key: ProcKey, tx: mpsc::Sender<Cmd>, cancel: CancellationToken) {
    loop {
        let message = tokio::select! {
            message = channel.recv() => message,
            _ = cancel.cancelled() => return,
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad message on a worker's descriptor channel; ignoring the channel");
                return;
            }
        };
        let mut parts = message.header.split(' ');
        let cmd = match (parts.next(), parts.next().and_then(|id| id.parse().ok()), message.fd) {
            (Some("A"), Some(id), None) => Cmd::Ack { key, id },
            (Some("B"), Some(id), None) => Cmd::Back { key, id },
            (Some("L"), Some(id), None) => Cmd::Lost { key, id },
            _ => {
                tracing::warn!(header = %message.header, "unexpected message from a worker's descriptor channel; ignored");
                continue;
            }
        };
        if tx.send(cmd).await.is_err() {
            return;
        }
    }
}

// ---- the worker's side -----------------------------------------------------

/// What went wrong on a worker's descriptor channel: counted, and logged at
/// WARN the first time, then at most once per `WARN_EVERY` per kind.
#[derive(Debug, Default)]
struct ChannelFailures {
    lost: u64,
    lost_log: Throttle,
    bad: u64,
    bad_log: Throttle,
}

impl ChannelFailures {
    fn lost(&mut self, id: u64, fd_lost: bool) {
        self.lost += 1;
        if let Some(suppressed) = self.lost_log.hit() {
            let cause = if fd_lost {
                "this process is out of descriptors (raise `ulimit -n` or lower the connections a worker keeps)"
            } else {
                "the message carried no descriptor"
            };
            tracing::warn!(
                connection.id = id,
                lost = self.lost,
                suppressed,
                "could not receive a handed-off connection: {cause}; the master closes it"
            );
        }
    }

    fn bad_message(&mut self, error: &io::Error) {
        self.bad += 1;
        if let Some(suppressed) = self.bad_log.hit() {
            tracing::warn!(%error, bad = self.bad, suppressed, "bad message on the descriptor channel; ignored");
        }
    }

    fn unexpected(&mut self, header: &str) {
        self.bad += 1;
        if let Some(suppressed) = self.bad_log.hit() {
            let header: String = header.chars().take(64).collect();
            tracing::warn!(%header, bad = self.bad, suppressed, "unexpected message on the descriptor channel; ignored");
        }
    }
}

/// Connections handed to one round-robin listener of this worker, not taken yet.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    items: Mutex<VecDeque<(u64, OwnedFd)>>,
    notify: Notify,
}

/// A round-robin listener, as a worker sees it: `accept` returns the
/// connections the master hands to this worker.
#[derive(Debug)]
pub struct RoundRobinListener {
    name: String,
    queue: Arc<Queue>,
    channel: Arc<FdChannel>,
    stop: CancellationToken,
    local: Option<SocketAddr>,
}

impl RoundRobinListener {
    /// The next connection. After the worker is asked to stop, it never
    /// resolves (connections go to the other workers).
    pub async fn accept(&mut self) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
        loop {
            if self.stop.is_cancelled() {
                return std::future::pending().await;
            }
            let item = self.queue.items.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
            let Some((id, fd)) = item else {
                tokio::select! {
                    _ = self.queue.notify.notified() => {}
                    _ = self.stop.cancelled() => {}
                }
                continue;
            };
            // Acknowledge before reading a byte: from now on it is ours.
            self.channel.send(&format!("A {id}"), None).await?;
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true)?;
            let peer = std.peer_addr()?;
            return Ok((tokio::net::TcpStream::from_std(std)?, peer));
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the master listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no local address"))
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for RoundRobinListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match RoundRobinListener::accept(self).await {
                Ok(accepted) => return accepted,
                // A connection that closed before we took it, or a master gone.
                Err(e) => tracing::debug!(error = %e, "round-robin accept failed"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        RoundRobinListener::local_addr(self)
    }
}

/// The worker's side of its descriptor channel once the listeners arrived:
/// routes handed connections to their listener's queue, or hands them back
/// when the worker is stopping or the listener was not taken.
#[derive(Debug)]
pub(crate) struct WorkerSide {
    channel: Arc<FdChannel>,
    queues: HashMap<String, (Arc<Queue>, Option<SocketAddr>)>,
    taken: Arc<Mutex<HashSet<String>>>,
}

impl WorkerSide {
    pub(crate) fn new(channel: Arc<FdChannel>) -> Self {
        WorkerSide { channel, queues: HashMap::new(), taken: Arc::default() }
    }

    pub(crate) fn declare(&mut self, name: &str, local: Option<SocketAddr>) {
        self.queues.insert(name.to_owned(), (Arc::default(), local));
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.queues.contains_key(name)
    }

    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }

    pub(crate) fn take(&self, name: &str, stop: CancellationToken) -> Option<RoundRobinListener> {
        let (queue, local) = self.queues.get(name)?;
        if !self.taken.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned()) {
            return None;
        }
        Some(RoundRobinListener {
            name: name.to_owned(),
            queue: Arc::clone(queue),
            channel: Arc::clone(&self.channel),
            stop,
            local: *local,
        })
    }

    /// Reads handed connections until the channel closes.
    pub(crate) fn spawn_reader(&self, stop: CancellationToken, tasks: &TaskTracker) {
        let channel = Arc::clone(&self.channel);
        let queues: HashMap<String, Arc<Queue>> =
            self.queues.iter().map(|(n, (q, _))| (n.clone(), Arc::clone(q))).collect();
        let taken = Arc::clone(&self.taken);
        tasks.spawn(
            async move {
                let give_back = |id: u64| {
                    let channel = Arc::clone(&channel);
                    async move {
                        if let Err(e) = channel.send(&format!("B {id}"), None).await {
                            tracing::debug!(error = %e, "could not hand a connection back");
                        }
                    }
                };
                let mut failures = ChannelFailures::default();
                loop {
                    let message = tokio::select! {
                        message = channel.recv() => message,
                        _ = stop.cancelled() => break,
                    };
                    let message = match message {
                        Ok(Some(m)) => m,
                        Ok(None) => return,
                        // One malformed message (consumed): the next one may be fine.
                        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                            failures.bad_message(&e);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the descriptor channel failed; no more round-robin connections");
                            return;
                        }
                    };
                    let mut parts = message.header.splitn(3, ' ');
                    let (Some("C"), Some(id), Some(name)) =
                        (parts.next(), parts.next().and_then(|i| i.parse::<u64>().ok()), parts.next())
                    else {
                        failures.unexpected(&message.header);
                        continue;
                    };
                    let Some(fd) = message.fd else {
                        // Out of descriptors: the kernel closed ours; the master
                        // closes its copy, the last one, when it reads `L`.
                        failures.lost(id, message.fd_lost);
                        if let Err(e) = channel.send(&format!("L {id}"), None).await {
                            tracing::debug!(error = %e, "could not tell the master a connection was lost");
                        }
                        continue;
                    };
                    let is_taken = taken.lock().unwrap_or_else(PoisonError::into_inner).contains(name);
                    match queues.get(name).filter(|_| is_taken) {
                        Some(queue) => {
                            queue.items.lock().unwrap_or_else(PoisonError::into_inner).push_back((id, fd));
                            queue.notify.notify_one();
                        }
                        None => give_back(id).await,
                    }
                }
                // Stopping: hand back what was not taken, and whatever still comes.
                for queue in queues.values() {
                    let items: Vec<(u64, OwnedFd)> =
                        queue.items.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
                    for (id, _fd) in items {
                        give_back(id).await;
                    }
                }
                while let Ok(Some(message)) = channel.recv().await {
                    if let Some(id) = message.header.strip_prefix("C ").and_then(|r| r.split(' ').next()?.parse().ok()) {
                        give_back(id).await;
                    }
                }
            }
            .in_current_span(),
        );
    }
}

#[cfg(test)]
mod tests;
