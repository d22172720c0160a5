//! The control channel between the coordinator and every role process.
//!
//! ```text
//! coordinator: listens on <private dir>/control.sock
//! role process ──connect──> Hello{role, group, pid}      (path from TANDEM_BENCH_CONTROL)
//! coordinator  ──Cmd──────> Invoke / Subscribe / Receive / Publish / SubscribeOne / PublishOne / Stats / Quit
//! role process ──Report───> Ready / Invoked / Received / Published / Delivered / Role / Value / Serving / Failed
//! ```
//!
//! One JSON object per line, both ways. A role exits when the channel closes,
//! so nothing outlives the coordinator. The channel does not depend on who
//! spawned the process: cluster workers (the messenger transport) are the
//! master's children, not the coordinator's, and report the same way.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::clock::Window;
use crate::hist;

/// The environment variable holding the control socket's path.
pub const ENV: &str = "TANDEM_BENCH_CONTROL";

/// Coordinator → role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Call the echo upstream with `payload` bytes, `concurrency` calls in flight;
    /// start now (warm-up), count the calls that complete inside `window`.
    Invoke { concurrency: usize, payload: usize, window: Window },
    /// Subscribe to keys `k0..k{keys-1}`.
    Subscribe { keys: usize },
    /// Count the events published inside `window`; report once it is over (plus a drain).
    Receive { window: Window },
    /// Publish on `k0..k{keys-1}` during `window`: flat out when `interval_us` is 0,
    /// otherwise one event every `interval_us`.
    Publish { keys: usize, interval_us: u64, payload: usize, window: Window },
    /// Deliver-to-one: subscribe to `key` with `subscribe_one`, then report every
    /// batch of deliveries (written to the channel) before acking it, until `Quit`.
    SubscribeOne { key: String },
    /// Deliver-to-one: publish on `key` during `window` at `rate` events/s, in
    /// per-millisecond bursts, each event numbered from 0; wait with
    /// `EventSender::ready` while the leader's queue for the key is full.
    PublishOne { key: String, rate: u64, payload: usize, window: Window },
    /// Report the leader's statistics.
    Stats,
    /// Exit.
    Quit,
}

/// Role → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum Report {
    Hello {
        role: String,
        group: u32,
        pid: u32,
    },
    Ready,
    Invoked {
        calls: u64,
        errors: u64,
        /// Times a tandem follower lost its link to the leader during the phase (the floor: 0).
        #[serde(default)]
        links_lost: u64,
        hist: hist::Wire,
    },
    Subscribed,
    Received {
        events: u64,
        gaps: u64,
        #[serde(default)]
        links_lost: u64,
        hist: hist::Wire,
    },
    Published {
        events: u64,
    },
    /// Deliver-to-one: the publisher's count, and how long it waited in `EventSender::ready`.
    PublishedOne {
        events: u64,
        waited_ms: f64,
        /// Sends refused because the leader had dropped the key (nobody subscribed).
        refused: u64,
    },
    /// Deliver-to-one: one batch of deliveries a follower read, reported before it acks them.
    Delivered {
        /// The publisher's sequence number of each delivery.
        seqs: Vec<u64>,
        /// The leader's `position().seq` of each delivery (a redelivery keeps it).
        positions: Vec<u64>,
        /// Indices into `seqs` of the deliveries marked `redelivered()`.
        redelivered: Vec<u32>,
    },
    Stats {
        followers: usize,
        subscribers: usize,
        /// Deliver-to-one events the leader dropped undelivered (`Stats::undelivered_dropped`).
        #[serde(default)]
        undelivered_dropped: u64,
    },
    /// A standalone process's role changed.
    Role {
        leader: bool,
        epoch: u64,
    },
    /// A standalone process received its first value from a leader of `epoch`.
    Value {
        epoch: u64,
        seq: u64,
        recv_ns: u64,
    },
    /// A cluster agent's Leader is serving (bound and reported ready to the master).
    Serving {
        epoch: u64,
        at_ns: u64,
    },
    Failed {
        error: String,
    },
    /// Never sent: the coordinator's mark for a channel that closed.
    Gone,
}

/// One report, with the pid of the process that sent it.
#[derive(Debug)]
pub struct Incoming {
    pub pid: u32,
    pub report: Report,
}

type Peers = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<String>>>>;

/// Reports not yet claimed by a wait are kept, up to this many (then the oldest go).
const BACKLOG: usize = 100_000;

/// The coordinator's end: accepts role processes, sends commands, waits for reports.
pub struct Control {
    inbox: mpsc::UnboundedReceiver<Incoming>,
    peers: Peers,
    backlog: VecDeque<Incoming>,
    /// Processes whose reports nobody will wait for any more.
    forgotten: HashSet<u32>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Control {
    /// Listens at `path` (inside the coordinator's private directory).
    pub fn bind(path: &Path) -> Result<Control> {
        let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        let (tx, inbox) = mpsc::unbounded_channel();
        let peers = Peers::default();
        let accept = tokio::spawn(accept(listener, tx, peers.clone()));
        Ok(Control { inbox, peers, backlog: VecDeque::new(), forgotten: HashSet::new(), accept })
    }

    pub fn send(&self, pid: u32, cmd: &Cmd) -> Result<()> {
        let line = serde_json::to_string(cmd)?;
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peer = peers.get(&pid).ok_or_else(|| anyhow!("process {pid} is not connected"))?;
        peer.send(line).map_err(|_| anyhow!("process {pid} has gone"))
    }

    pub fn send_all(&self, pids: &[u32], cmd: &Cmd) -> Result<()> {
        pids.iter().try_for_each(|&pid| self.send(pid, cmd))
    }

    /// Drops what is kept from `pids` and ignores what they send from now on.
    pub fn forget(&mut self, pids: &[u32]) {
        self.forgotten.extend(pids);
        self.backlog.retain(|m| !self.forgotten.contains(&m.pid));
    }

    async fn next(&mut self, deadline: Instant) -> Option<Incoming> {
        tokio::time::timeout_at(deadline, self.inbox.recv()).await.ok().flatten()
    }

    /// Waits (up to `timeout`) for the first report that `pick` accepts; the
    /// others are kept for later waits. A `Failed` report from anyone is an error.
    pub async fn wait<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        pick: impl FnMut(&Incoming) -> Option<T>,
    ) -> Result<T> {
        match self.wait_until(Instant::now() + timeout, pick).await? {
            Some(value) => Ok(value),
            None => bail!("timed out after {timeout:?} waiting for {what}"),
        }
    }

    /// As [`Control::wait`], but reaching `deadline` is no error: `None`.
    pub async fn wait_until<T>(
        &mut self,
        deadline: Instant,
        mut pick: impl FnMut(&Incoming) -> Option<T>,
    ) -> Result<Option<T>> {
        if let Some(i) = self.backlog.iter().position(|m| pick(m).is_some()) {
            let incoming = self.backlog.remove(i).expect("position is in range");
            return Ok(pick(&incoming));
        }
        loop {
            let Some(incoming) = self.next(deadline).await else {
                return Ok(None);
            };
            if self.forgotten.contains(&incoming.pid) {
                continue;
            }
            if let Report::Failed { error } = &incoming.report {
                bail!("process {} failed: {error}", incoming.pid);
            }
            if let Some(value) = pick(&incoming) {
                return Ok(Some(value));
            }
            if self.backlog.len() >= BACKLOG {
                self.backlog.pop_front();
            }
            self.backlog.push_back(incoming);
        }
    }

    /// One report from each of `pids` that `pick` accepts. A process that exits first is an error.
    pub async fn collect<T>(
        &mut self,
        pids: &[u32],
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&Report) -> Option<T>,
    ) -> Result<HashMap<u32, T>> {
        let deadline = Instant::now() + timeout;
        let mut got = HashMap::new();
        while got.len() < pids.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (pid, value) = self
                .wait(left, what, |m| {
                    if !pids.contains(&m.pid) || got.contains_key(&m.pid) {
                        return None;
                    }
                    match &m.report {
                        Report::Gone => Some((m.pid, None)),
                        report => pick(report).map(|v| (m.pid, Some(v))),
                    }
                })
                .await?;
            let value = value.ok_or_else(|| anyhow!("process {pid} exited while the coordinator waited for {what}"))?;
            got.insert(pid, value);
        }
        Ok(got)
    }
}

async fn accept(listener: UnixListener, inbox: mpsc::UnboundedSender<Incoming>, peers: Peers) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        tokio::spawn(serve_peer(stream, inbox.clone(), peers.clone()));
    }
}

/// Reads one role's reports; writes the commands queued for it.
async fn serve_peer(stream: UnixStream, inbox: mpsc::UnboundedSender<Incoming>, peers: Peers) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(first)) = lines.next_line().await else { return };
    let Ok(hello @ Report::Hello { pid, .. }) = serde_json::from_str::<Report>(&first) else { return };
    // Unbounded: the coordinator sends a handful of commands per phase.
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    peers.lock().unwrap_or_else(|p| p.into_inner()).insert(pid, tx);
    tokio::spawn(async move {
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let _ = inbox.send(Incoming { pid, report: hello });
    while let Ok(Some(line)) = lines.next_line().await {
        let report = serde_json::from_str(&line)
            .unwrap_or_else(|e| Report::Failed { error: format!("unreadable report {line:?}: {e}") });
        let _ = inbox.send(Incoming { pid, report });
    }
    peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
    let _ = inbox.send(Incoming { pid, report: Report::Gone });
}

/// A role's commands, in order.
pub struct Commands {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
}

impl Commands {
    /// The next command; `None` once the coordinator has gone.
    pub async fn next(&mut self) -> Result<Option<Cmd>> {
        match self.lines.next_line().await? {
            None => Ok(None),
            Some(line) => Ok(Some(serde_json::from_str(&line).with_context(|| format!("bad command {line:?}"))?)),
        }
    }
}

enum Out {
    Line(String),
    Flush(oneshot::Sender<()>),
}

/// A role's reports: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Out>,
}

impl Reporter {
    pub fn send(&self, report: &Report) {
        if let Ok(line) = serde_json::to_string(report) {
            let _ = self.tx.send(Out::Line(line));
        }
    }

    /// Waits until every report sent so far is written to the channel (in the
    /// kernel's socket buffer: the coordinator reads it even if this process
    /// is killed next). An error if that takes longer than `timeout` or the
    /// channel has closed: the caller must not act as if the reports were written.
    pub async fn sync(&self, timeout: Duration) -> Result<()> {
        let (done, written) = oneshot::channel();
        self.tx.send(Out::Flush(done)).map_err(|_| anyhow!("the control channel has closed"))?;
        match tokio::time::timeout(timeout, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!("the control channel closed before the reports were written"),
            Err(_) => bail!("the reports were not written to the control channel within {timeout:?}"),
        }
    }

    /// Waits until every report sent so far is written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Out::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), written).await;
        }
    }
}

/// Connects a role process to its coordinator and says hello.
pub async fn connect(role: &str, group: u32) -> Result<(Commands, Reporter)> {
    let path = std::env::var_os(ENV).ok_or_else(|| anyhow!("{ENV} is not set: roles are started by the bench"))?;
    let stream = UnixStream::connect(&path).await.context("connect to the coordinator")?;
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Line(mut line) => {
                    line.push('\n');
                    if write.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Out::Flush(done) => {
                    let _ = write.flush().await;
                    let _ = done.send(());
                }
            }
        }
    });
    let reporter = Reporter { tx };
    reporter.send(&Report::Hello { role: role.to_string(), group, pid: std::process::id() });
    Ok((Commands { lines: BufReader::new(read).lines() }, reporter))
}
