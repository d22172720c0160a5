//! The master: starts the agent then the workers, supervises them, routes their
//! messages and links, and stops everything in order.
//!
//! One task (the loop in [`Master::serve`]) owns all the state; it never waits
//! on a child. Per child, a reader task feeds it decoded frames, a writer task
//! drains that child's two bounded queues (control first, then data), and a
//! waiter task owns the `Child`, kills it on request and reaps it (waitpid).
//! The loop only ever `try_send`s to those queues.

use std::ffi::OsString;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_protocol::CodecError;
use tandem_protocol::internal::{Refused, WriteLimits, WriteSource, error_chain};
use tandem_protocol::unix::{UnixReadHalf, UnixWriteHalf};
use tokio::process::Child;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::app::MasterFn;
use crate::backoff::Restart;
use crate::cluster_control::{ClusterControl, ControlCall};
use crate::control::{ControlServer, ControlStats, MasterHandle, OpsCall, Snapshot};
use crate::events::Events;
use crate::ipc::{Delivery, FromChild, Init, MasterCodec, Outcome, Ready, ToChild};
use crate::listeners::BoundListeners;
use crate::liveness::{Liveness, Verdict};
use crate::master_context::MasterContext;
use crate::messenger::{Inbox, LocalCall, Messenger, Port, Transport};
use crate::round_robin::{Cmd as RrCmd, RoundRobin};
use crate::router::{Action, Peers, Responder, Router};
use crate::runtime_dir::{RuntimeDir, new_token};
use crate::shutdown::{MasterSignal, MasterSignals, Stage, Stopping};
use crate::spawn::Program;
use crate::status::{ProcessState, StatusRow, StatusTable, rss_bytes};
use crate::supervisor::{Proc, Slot};
use crate::types::{AgentInfo, ProcKey, Sender, SlotId};
use crate::{BoxError, ClusterEvent, Config, Error, ExitReason, ProcessRef, Role, StartFailure, WorkerId};

/// Inputs queued for the loop (bounded: readers wait when it is full, which
/// back-pressures the children's sockets).
const INPUT_CAPACITY: usize = 1024;
/// Calls from the master's own messenger.
const LOCAL_CAPACITY: usize = 256;
/// Control messages per child: more than `MAX_OUTSTANDING_OPS` outcomes plus lifecycle messages.
const CONTROL_CAPACITY: usize = crate::messenger::MAX_OUTSTANDING_OPS + 64;
/// Events buffered for slow readers of [`Events`].
const EVENTS_CAPACITY: usize = 1024;
/// How long to wait for a SIGKILLed process to be reaped before giving up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// A child whose IPC channel closed but which has not exited after this long is killed.
const EOF_KILL_AFTER: Duration = Duration::from_secs(2);
/// How often expired requests are pruned.
const PRUNE_EVERY: Duration = Duration::from_millis(500);
/// How often the master samples its children's RSS against their memory limits.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Frames written to a child per flush after the first.
const WRITE_BATCH: usize = 64;
/// The most inputs handled in one turn of the master's loop.
const INPUT_BURST: usize = 256;

/// What the loop reacts to.
#[derive(Debug)]
pub(crate) enum Input {
    FromChild(ProcKey, FromChild),
    /// The child sent bytes that are not an IPC message (the error, with its causes).
    BadFrame(ProcKey, String),
    /// The child's end of the channel closed; with why when reading failed
    /// (it died with bytes unread, most often) rather than at a clean EOF.
    Eof(ProcKey, Option<String>),
    Exited(ProcKey, Option<ExitStatus>),
    Timer(Timer),
    HookFailed(BoxError),
}

#[derive(Debug)]
pub(crate) enum Timer {
    StartDeadline(ProcKey),
    Restart {
        slot: SlotId,
        id: u64,
    },
    /// Another attempt after a spawn failed for a transient lack of resources
    /// (not a restart: not counted in the slot's restarts).
    Retry {
        slot: SlotId,
        id: u64,
    },
    StopDeadline(u64),
    /// A replaced worker's grace period is over.
    DrainDeadline(ProcKey),
    /// The agent stopped (for its memory limit, or for a reload) did not exit in time.
    AgentStopDeadline(ProcKey),
    ReapDeadline(u64),
    EofKill(ProcKey),
}

pub(crate) struct Master {
    pub(crate) config: Config,
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) started_at: Instant,
    dir: RuntimeDir,
    token: String,
    /// What children are started from (the executable as on disk at each spawn).
    pub(crate) program: Program,
    /// The listening sockets, bound before any child starts, kept open until exit.
    pub(crate) listeners: Arc<BoundListeners>,
    /// The round-robin dispatcher, when a listener uses that mode.
    pub(crate) round_robin: Option<RoundRobin>,
    pub(crate) agent: Slot,
    pub(crate) workers: Vec<Slot>,
    /// The last epoch handed to an agent.
    epoch: u64,
    pub(crate) agent_info: Option<AgentInfo>,
    next_generation: u64,
    workers_started: bool,
    pub(crate) announced: bool,
    /// The replacement run (reload or memory limit) in progress.
    pub(crate) replacing: Option<crate::reload::Run>,
    pub(crate) memory_holds: crate::reload::MemoryHolds,
    /// The agent was asked to stop for exceeding its memory limit.
    pub(crate) agent_memory_stop: bool,
    /// The reload of the agent in progress.
    pub(crate) agent_reload: Option<crate::agent_reload::AgentReload>,
    control_tx: mpsc::Sender<ControlCall>,
    control_rx: mpsc::Receiver<ControlCall>,
    pub(crate) stopping: Option<Stopping>,
    next_deadline: u64,
    pub(crate) router: Router,
    pub(crate) port: Arc<Port>,
    events: broadcast::Sender<ClusterEvent>,
    events_rx: Option<broadcast::Receiver<ClusterEvent>>,
    input_tx: mpsc::Sender<Input>,
    input_rx: mpsc::Receiver<Input>,
    local_rx: mpsc::Receiver<LocalCall>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    shutdown_requested: CancellationToken,
    stopping_token: CancellationToken,
    hook_error: Option<BoxError>,
    control_name: String,
    control_server: Option<ControlServer>,
    ops_tx: mpsc::Sender<OpsCall>,
    ops_rx: mpsc::Receiver<OpsCall>,
    /// Counters the control socket and `/metrics` read (reloads, whatever started them).
    ops_stats: Arc<ControlStats>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master").field("name", &self.name).field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Master {
    fn new(name: String, config: Config) -> Result<Self, Error> {
        let pid = std::process::id();
        let listeners = Arc::new(BoundListeners::bind(&config.listeners, config.worker_count())?);
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let rr_sockets = listeners.round_robin().map_err(|source| Error::Listen {
            name: "round-robin".into(),
            addr: "(duplicating the socket)".into(),
            source,
        })?;
        let round_robin = if rr_sockets.is_empty() {
            None
        } else {
            Some(RoundRobin::start(rr_sockets, &tasks, cancel.clone()).map_err(|source| Error::Listen {
                name: "round-robin".into(),
                addr: "(starting the accept loop)".into(),
                source,
            })?)
        };
        let (control_name, control) = match &config.name {
            Some(name) => (name.clone(), ControlServer::bind(name)?),
            None => ControlServer::bind_default()?,
        };
        let dir = RuntimeDir::create(&name)?;
        let token = new_token()?;
        crate::descriptors::master_reserve().refill();
        let exe = crate::spawn::program_path().map_err(|source| Error::Spawn { what: "agent".into(), source })?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        check_child_env(&config.child_env)?;
        let program = Program { exe, args, cluster: name.clone(), master_pid: pid, env: config.child_env.clone() };
        let workers = (1..=config.worker_count())
            .map(|id| Slot::new(SlotId::Worker(id as WorkerId), config.restart.clone()))
            .collect();
        let (input_tx, input_rx) = mpsc::channel(INPUT_CAPACITY);
        let (local_tx, local_rx) = mpsc::channel(LOCAL_CAPACITY);
        let (events, events_rx) = broadcast::channel(EVENTS_CAPACITY);
        let (control_tx, control_rx) = mpsc::channel(crate::cluster_control::CONTROL_CALLS_CAPACITY);
        let port = Arc::new(Port {
            me: Sender::Master { pid },
            inbox: Inbox::new(config.subscription_capacity),
            transport: Transport::Master(local_tx),
        });
        tracing::debug!(runtime_dir = %dir.path().display(), workers = config.worker_count(), "master starting");
        let (ops_tx, ops_rx) = mpsc::channel(LOCAL_CAPACITY);
        Ok(Master {
            agent: Slot::new(SlotId::Agent, config.restart.clone()),
            config,
            name,
            pid,
            started_at: Instant::now(),
            dir,
            token,
            program,
            listeners,
            round_robin,
            workers,
            epoch: 0,
            agent_info: None,
            next_generation: 1,
            workers_started: false,
            announced: false,
            replacing: None,
            memory_holds: Default::default(),
            agent_memory_stop: false,
            agent_reload: None,
            control_tx,
            control_rx,
            stopping: None,
            next_deadline: 0,
            router: Router::default(),
            port,
            events,
            events_rx: Some(events_rx),
            input_tx,
            input_rx,
            local_rx,
            tasks,
            cancel,
            shutdown_requested: CancellationToken::new(),
            stopping_token: CancellationToken::new(),
            hook_error: None,
            control_name,
            control_server: Some(control),
            ops_tx,
            ops_rx,
            ops_stats: Arc::new(ControlStats::default()),
        })
    }

    async fn serve(&mut self, hook: Option<MasterFn>) -> Result<(), Error> {
        let mut signals = MasterSignals::install().map_err(Error::Signals)?;
        let handle = MasterHandle {
            calls: self.ops_tx.clone(),
            reload: self.control(),
            messenger: Messenger::new(Arc::clone(&self.port)),
            stats: Arc::clone(&self.ops_stats),
        };
        #[cfg(feature = "metrics")]
        let metrics_addr = match self.config.metrics {
            Some(addr) => {
                let limits = crate::metrics_endpoint::Limits::from_config(&self.config);
                let round_robin = self.round_robin.as_ref().map(RoundRobin::stats);
                Some(
                    crate::metrics::serve(addr, limits, handle.clone(), round_robin, &self.tasks, self.cancel.clone())
                        .await?,
                )
            }
            None => None,
        };
        #[cfg(not(feature = "metrics"))]
        let metrics_addr = None;
        if let Some(control) = self.control_server.take() {
            control.spawn(handle, &self.tasks, self.cancel.clone());
        }
        if let Some(hook) = hook {
            self.start_hook(hook, metrics_addr);
        }
        if let Err(source) = self.start(SlotId::Agent) {
            return Err(Error::Spawn { what: "agent".into(), source });
        }
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut memory = tokio::time::interval(MEMORY_SAMPLE_EVERY);
        memory.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Zero (hang detection off) never ticks; `interval` refuses a zero period.
        let pinging = !self.config.ping_interval.is_zero();
        let mut ping = tokio::time::interval(self.config.ping_interval.max(Duration::from_millis(1)));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !matches!(self.stopping, Some(Stopping { stage: Stage::Done, .. })) {
            tokio::select! {
                Some(input) = self.input_rx.recv() => {
                    self.on_input(input);
                    // What else the readers queued meanwhile, before the other
                    // branches are polled again: a relay burst costs one pass
                    // over the signals and timers, not one per frame.
                    for _ in 0..INPUT_BURST {
                        if matches!(self.stopping, Some(Stopping { stage: Stage::Done, .. })) {
                            break;
                        }
                        let Ok(input) = self.input_rx.try_recv() else { break };
                        self.on_input(input);
                    }
                }
                Some(call) = self.local_rx.recv() => self.on_local(call),
                Some(call) = self.ops_rx.recv() => self.on_ops(call),
                signal = signals.recv() => match signal {
                    MasterSignal::Stop => self.begin_stop(),
                    MasterSignal::Status => self.print_status(),
                    MasterSignal::Reload => self.request_reload(None),
                },
                Some(call) = self.control_rx.recv() => self.on_control(call),
                _ = memory.tick(), if self.config.worker_max_memory.is_some() || self.config.agent_max_memory.is_some() => {
                    self.check_memory()
                }
                _ = ping.tick(), if pinging => self.check_liveness(Instant::now()),
                _ = self.shutdown_requested.cancelled(), if self.stopping.is_none() => self.begin_stop(),
                _ = prune.tick() => {
                    self.route(|router, _| router.on_tick(Instant::now()));
                    self.refill_reserve();
                }
            }
        }
        if self.config.status_at_exit {
            self.print_status();
        }
        tracing::debug!("all children exited; master exiting");
        self.port.inbox.close();
        self.cancel.cancel();
        self.tasks.close();
        match self.hook_error.take() {
            Some(e) => Err(Error::MasterFailed(e)),
            None => Ok(()),
        }
    }

    /// Waits (briefly) for the master's tasks; called after `serve`, once the
    /// event sender is dropped so the hook's event stream ends.
    async fn drain(tasks: TaskTracker) {
        if tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await.is_err() {
            tracing::debug!("some master tasks still running at exit");
        }
    }

    fn start_hook(&mut self, hook: MasterFn, metrics_addr: Option<std::net::SocketAddr>) {
        let events = self.events_rx.take().map(Events::new);
        let ctx = MasterContext::new(
            self.pid,
            self.dir.path().to_owned(),
            self.token.clone(),
            Messenger::new(Arc::clone(&self.port)),
            events,
            self.events.subscribe(),
            self.shutdown_requested.clone(),
            self.stopping_token.clone(),
            self.control(),
            self.listeners.infos(),
        )
        .with_operations(self.control_name.clone(), metrics_addr);
        let input = self.input_tx.clone();
        self.tasks.spawn(
            async move {
                if let Err(e) = hook(ctx).await {
                    tracing::error!(error = %e, "the master function failed; shutting down");
                    let _ = input.send(Input::HookFailed(e)).await;
                }
            }
            .in_current_span(),
        );
    }

    // ---- events and timers -------------------------------------------------

    /// Sends an event to the master function's stream and logs it once: the
    /// routine start-up steps at DEBUG, deaths and crash loops at WARN (at
    /// DEBUG during shutdown, where exits are expected), the rest at INFO.
    pub(crate) fn emit(&self, event: ClusterEvent) {
        match &event {
            // Hung: logged at ERROR, with its fields, where it is decided.
            ClusterEvent::Spawned { .. }
            | ClusterEvent::AgentReady { .. }
            | ClusterEvent::WorkerReady { .. }
            | ClusterEvent::Hung { .. } => {
                tracing::debug!(%event, "cluster event")
            }
            ClusterEvent::Exited { .. }
                if self.stopping.is_some() || self.replacing.is_some() || self.agent_reload.is_some() =>
            {
                tracing::debug!(%event, "cluster event")
            }
            ClusterEvent::Exited { .. }
            | ClusterEvent::StartFailed { .. }
            | ClusterEvent::RestartScheduled { .. }
            | ClusterEvent::SlotFailed { .. } => tracing::warn!(%event, "cluster event"),
            _ => tracing::info!(%event, "cluster event"),
        }
        // Reloads from SIGHUP, the API and the control socket alike.
        match &event {
            ClusterEvent::ReloadDone { .. } | ClusterEvent::AgentReloaded { .. } => {
                self.ops_stats.reloads_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ClusterEvent::ReloadFailed { .. } => {
                self.ops_stats.reloads_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            _ => {}
        }
        // Err: nobody listens.
        let _ = self.events.send(event);
    }

    pub(crate) fn after(&self, delay: Duration, timer: Timer) {
        let tx = self.input_tx.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => { let _ = tx.send(Input::Timer(timer)).await; }
                _ = cancel.cancelled() => {}
            }
        });
    }

    pub(crate) fn slot_mut(&mut self, id: SlotId) -> Option<&mut Slot> {
        match id {
            SlotId::Agent => Some(&mut self.agent),
            SlotId::Worker(n) => self.workers.get_mut((n as usize).checked_sub(1)?),
        }
    }

    pub(crate) fn slot(&self, id: SlotId) -> Option<&Slot> {
        match id {
            SlotId::Agent => Some(&self.agent),
            SlotId::Worker(n) => self.workers.get((n as usize).checked_sub(1)?),
        }
    }

    /// The live process named by `key` (the slot's, or its predecessor still draining).
    pub(crate) fn proc(&self, key: ProcKey) -> Option<&Proc> {
        let slot = self.slot(key.slot)?;
        slot.proc.iter().chain(slot.previous.iter()).find(|p| p.key == key)
    }

    /// A handle to ask this master for a reload.
    pub(crate) fn control(&self) -> ClusterControl {
        ClusterControl::new(self.control_tx.clone())
    }

    // ---- spawning ----------------------------------------------------------

    /// Spawns a process for `slot`. A spawn error is returned for the very
    /// first agent; later ones are handled as a failed start (restart with backoff).
    fn start(&mut self, slot: SlotId) -> std::io::Result<()> {
        let first = self.next_generation == 1;
        match self.launch(slot) {
            Err(e) if !first => {
                self.spawn_failed(slot, &e);
                Ok(())
            }
            result => result,
        }
    }

    /// Spawns a process into `slot` (replacing `slot.proc`); a spawn error is returned.
    pub(crate) fn launch(&mut self, slot: SlotId) -> std::io::Result<()> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let key = ProcKey { slot, generation };
        let epoch = match slot {
            SlotId::Agent => {
                self.epoch += 1;
                self.epoch
            }
            SlotId::Worker(_) => 0,
        };
        let spawned = self.spawn_process(slot)?;
        let pid = spawned.pid;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let (data_tx, data_rx) = mpsc::channel(self.config.queue_capacity.max(1));
        let (kill_tx, kill_rx) = oneshot::channel();
        let (rd, wr) = spawned.stream;
        let span = match slot {
            SlotId::Agent => tracing::info_span!("child", child.role = "agent", child.pid = pid, epoch),
            SlotId::Worker(id) => tracing::info_span!("child", child.role = "worker", worker.id = id, child.pid = pid),
        };
        self.tasks.spawn(write_to_child(wr, control_rx, data_rx).instrument(span.clone()));
        self.tasks.spawn(read_from_child(rd, key, self.input_tx.clone()).instrument(span.clone()));
        let listeners = match slot {
            SlotId::Worker(id) if !self.listeners.is_empty() => {
                let count = self.listeners.for_worker(id).len();
                let task =
                    send_listeners(Arc::clone(&self.listeners), id, spawned.fd_channel, self.round_robin.clone(), key);
                self.tasks.spawn(task.instrument(span.clone()));
                count
            }
            _ => 0,
        };
        self.tasks.spawn(wait_for_child(spawned.child, kill_rx, key, self.input_tx.clone()).instrument(span));

        let init = Init {
            cluster: self.name.clone(),
            role: slot.role(),
            worker_id: slot.worker_id(),
            master_pid: self.pid,
            runtime_dir: self.dir.path().to_owned(),
            token: self.token.clone(),
            epoch,
            agent: match slot {
                SlotId::Worker(_) => self.agent_info.clone(),
                SlotId::Agent => None,
            },
            cluster_ready: self.announced,
            link_capacity: u32::try_from(self.config.link_window()).unwrap_or(u32::MAX),
            subscription_capacity: u32::try_from(self.config.subscription_capacity).unwrap_or(u32::MAX),
            listeners: u32::try_from(listeners).unwrap_or(u32::MAX),
        };
        let proc = Proc::new(key, pid, control_tx, data_tx, epoch, kill_tx);
        proc.control(ToChild::Init(init));
        let process = proc.process_ref();
        let timeout = match slot {
            SlotId::Agent => self.config.agent_start_timeout,
            SlotId::Worker(_) => self.config.worker_start_timeout,
        };
        if let Some(s) = self.slot_mut(slot) {
            s.proc = Some(proc);
            s.state = ProcessState::Starting;
            s.backoff.spawned();
            let transient = std::mem::take(&mut s.transient_failures);
            if transient > 0 {
                tracing::info!(%slot, pid, failed_attempts = transient, "spawned again: the resources freed");
            }
        }
        self.after(timeout, Timer::StartDeadline(key));
        self.emit(ClusterEvent::Spawned { process, epoch: (slot == SlotId::Agent).then_some(epoch) });
        Ok(())
    }

    /// Spawns a child; when the descriptor table is full, gives back the
    /// reserve and tries once more, then takes the reserve again.
    fn spawn_process(&mut self, slot: SlotId) -> std::io::Result<crate::spawn::Spawned> {
        let error = match self.program.spawn(slot.role(), slot.worker_id()) {
            Err(e) if crate::descriptors::is_fd_exhaustion(&e) && crate::descriptors::master_reserve().held() > 0 => e,
            result => {
                self.refill_reserve();
                return result;
            }
        };
        let mut reserve = crate::descriptors::master_reserve();
        let released = reserve.release();
        let result = self.program.spawn(slot.role(), slot.worker_id());
        let held = reserve.refill();
        drop(reserve);
        match &result {
            Ok(spawned) => {
                tracing::warn!(%slot, error = %error, released, held, pid = spawned.pid, "descriptor table full: spawned with the reserve")
            }
            Err(e) => tracing::debug!(%slot, error = %e, released, held, "descriptor table full even with the reserve"),
        }
        result
    }

    /// Reopens what of the descriptor reserve is missing (a no-op when it is full).
    fn refill_reserve(&self) {
        let mut reserve = crate::descriptors::master_reserve();
        let before = reserve.held();
        if before < crate::descriptors::RESERVE && reserve.refill() == crate::descriptors::RESERVE {
            tracing::info!(reopened = crate::descriptors::RESERVE - before, "descriptor reserve complete again");
        }
    }

    fn spawn_failed(&mut self, slot: SlotId, error: &std::io::Error) {
        let process = ProcessRef { role: slot.role(), worker_id: slot.worker_id(), pid: None };
        if crate::descriptors::is_transient(error) {
            self.spawn_failed_transiently(slot, error);
            return;
        }
        tracing::error!(slot = %slot, error = %error, "could not spawn");
        self.emit(ClusterEvent::StartFailed { process, reason: StartFailure::Spawn(error.to_string()) });
        self.schedule_restart(slot);
    }

    /// The spawn failed for a lack of resources that frees by itself: retry
    /// with a capped backoff, without counting towards the crash-loop limit
    /// (the slot stays `BackingOff`, never `Failed`). WARN the first time.
    fn spawn_failed_transiently(&mut self, slot: SlotId, error: &std::io::Error) {
        let Some(s) = self.slot_mut(slot) else { return };
        s.transient_failures = s.transient_failures.saturating_add(1);
        s.state = ProcessState::BackingOff;
        s.timer += 1;
        let (failures, id) = (s.transient_failures, s.timer);
        let delay = crate::descriptors::transient_retry_delay(failures);
        if failures == 1 {
            tracing::warn!(
                %slot,
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
                "could not spawn for a lack of resources; retrying until it frees (not counted as a crash)"
            );
        } else {
            tracing::debug!(%slot, error = %error, failures, "spawn still short of resources");
        }
        self.after(delay, Timer::Retry { slot, id });
    }

    pub(crate) fn schedule_restart(&mut self, slot: SlotId) {
        let Some(s) = self.slot_mut(slot) else { return };
        let (decision, id) = s.died();
        match decision {
            Restart::After { delay, failures } => {
                self.emit(ClusterEvent::RestartScheduled {
                    role: slot.role(),
                    worker_id: slot.worker_id(),
                    after: delay,
                    failures,
                });
                self.after(delay, Timer::Restart { slot, id });
            }
            Restart::Failed { retry_after, failures } => {
                tracing::error!(slot = %slot, failures, "crash loop: slot marked failed");
                self.emit(ClusterEvent::SlotFailed {
                    role: slot.role(),
                    worker_id: slot.worker_id(),
                    failures,
                    retry_after,
                });
                self.after(retry_after, Timer::Restart { slot, id });
                self.check_cluster_ready();
            }
        }
    }

    // ---- the loop's inputs -------------------------------------------------

    fn on_input(&mut self, input: Input) {
        match input {
            Input::FromChild(key, msg) => self.on_child_message(key, msg),
            Input::BadFrame(key, error) => {
                if let Some(proc) = self.slot_mut(key.slot).and_then(|s| s.proc_mut(key)) {
                    tracing::error!(pid = proc.pid, error, "bad frame from a child; killing it");
                    proc.kill();
                }
            }
            Input::Eof(key, failure) => {
                if let Some(proc) = self.proc(key) {
                    if let Some(error) = failure {
                        tracing::warn!(pid = proc.pid, error, "reading from a child failed; it is gone or going");
                    }
                    self.after(EOF_KILL_AFTER, Timer::EofKill(key));
                }
            }
            Input::Exited(key, status) => self.on_exit(key, status),
            Input::Timer(timer) => self.on_timer(timer),
            Input::HookFailed(e) => {
                self.hook_error = Some(e);
                if self.stopping.is_none() {
                    self.begin_stop();
                }
            }
        }
    }

    fn on_child_message(&mut self, key: ProcKey, msg: FromChild) {
        let Some(proc) = self.proc(key) else {
            return; // from a process already reaped
        };
        let origin = proc.sender();
        match msg {
            FromChild::Ready(ready) => self.on_ready(key, ready),
            FromChild::Pong { seq } => {
                if let Some(live) =
                    self.slot_mut(key.slot).and_then(|s| s.proc_mut(key)).and_then(|p| p.liveness.as_mut())
                {
                    live.answered(seq, Instant::now());
                }
            }
            FromChild::Op { id, op } => self.route(|router, peers| {
                router.on_op(peers, Instant::now(), origin, Some(key), op, Responder::Remote { key, id })
            }),
            FromChild::Reply { request, result } => self.route(|router, _| router.on_reply(Some(key), request, result)),
            FromChild::LinkFrame { link, frame } => {
                self.route(|router, peers| router.on_link_frame(peers, key, link, frame))
            }
            FromChild::LinkClose { link } => self.route(|router, peers| router.on_link_close(peers, key, link)),
            FromChild::LinkCredit { link, credit } => {
                self.route(|router, peers| router.on_link_credit(peers, key, link, credit))
            }
        }
    }

    fn on_local(&mut self, call: LocalCall) {
        match call {
            LocalCall::Op { op, reply } => {
                let origin = Sender::Master { pid: self.pid };
                self.route(|router, peers| {
                    router.on_op(peers, Instant::now(), origin, None, op, Responder::Local(reply))
                });
            }
            LocalCall::Reply { request, result } => self.route(|router, _| router.on_reply(None, request, result)),
        }
    }

    // ---- routing -----------------------------------------------------------

    /// Runs one step of the router against the current processes and carries
    /// out its actions, in order.
    fn route(&mut self, step: impl FnOnce(&mut Router, Peers<'_>) -> Vec<Action>) {
        let peers = Peers { agent: &self.agent, workers: &self.workers, stopping: self.stopping.is_some() };
        let mut actions = step(&mut self.router, peers);
        for action in actions.drain(..) {
            self.carry_out(action);
        }
        self.router.recycle(actions);
    }

    fn carry_out(&mut self, action: Action) {
        match action {
            Action::Data { to, msg } => {
                // The router checked the room; only a process gone meanwhile refuses.
                if let Some(proc) = self.proc(to)
                    && let Err(e) = proc.data.try_send(msg)
                {
                    tracing::warn!(pid = proc.pid, slot = %to.slot, error = %e, "data message not queued");
                }
            }
            Action::Control { to, msg } => {
                if let Some(proc) = self.proc(to) {
                    proc.control(msg);
                }
            }
            // Err: the caller gave up.
            Action::Answer { reply, outcome } => drop(reply.send(outcome)),
            Action::Deliver(Delivery { topic, payload, from, request }) => {
                self.port.deliver(topic, from, payload, request)
            }
            Action::Status(responder) => {
                let answer = responder.answer(Outcome::Status(self.status_table()));
                self.carry_out(answer);
            }
        }
    }

    /// A process exited (and is out of its slot): the round-robin dispatcher
    /// forgets it, and the router fails its requests and closes its links.
    pub(crate) fn process_gone(&mut self, proc: &Proc) {
        let key = proc.key;
        if let Some(rr) = &self.round_robin {
            rr.notify(RrCmd::Remove(key));
        }
        self.route(|router, peers| router.on_gone(peers, key));
    }

    fn on_ready(&mut self, key: ProcKey, ready: Ready) {
        let announced = self.announced;
        let watch = self
            .config
            .hang_timeout(key.slot)
            .map(|timeout| Liveness::new(timeout, self.config.ping_interval, Instant::now()));
        let Some(slot) = self.slot_mut(key.slot) else { return };
        if slot.state != ProcessState::Starting || slot.proc.as_ref().is_none_or(|p| p.key != key || p.timed_out) {
            return; // a second report, one during shutdown, or one after the deadline
        }
        match (key.slot, ready) {
            (SlotId::Agent, Ready::Agent { socket }) => {
                slot.state = ProcessState::Ready;
                slot.backoff.ready();
                let restarted = std::mem::replace(&mut slot.ever_ready, true);
                let Some(proc) = slot.proc.as_mut() else { return };
                proc.liveness = watch;
                proc.socket = Some(socket.clone());
                let (pid, epoch) = (proc.pid, proc.epoch);
                if announced {
                    proc.control(ToChild::ClusterReady);
                }
                let info = AgentInfo { pid, epoch, socket: socket.clone(), up: true };
                self.agent_info = Some(info.clone());
                self.emit(ClusterEvent::AgentReady { pid, epoch, socket });
                if restarted {
                    self.emit(ClusterEvent::AgentRestarted { pid, epoch });
                }
                for w in &self.workers {
                    if let Some(p) = &w.proc {
                        p.control(ToChild::AgentChanged(info.clone()));
                    }
                }
                if !self.workers_started {
                    self.workers_started = true;
                    for id in 1..=self.workers.len() {
                        let slot = SlotId::Worker(id as WorkerId);
                        if let Err(e) = self.start(slot) {
                            self.spawn_failed(slot, &e);
                        }
                    }
                }
                self.check_cluster_ready();
                self.agent_reload_ready(key);
            }
            (SlotId::Worker(id), Ready::Worker) => {
                slot.state = ProcessState::Ready;
                slot.backoff.ready();
                let replacing = slot.previous.is_some();
                let restarted = std::mem::replace(&mut slot.ever_ready, true) && !replacing;
                let Some(proc) = slot.proc.as_mut() else { return };
                proc.liveness = watch;
                let pid = proc.pid;
                if announced {
                    proc.control(ToChild::ClusterReady);
                }
                self.emit(ClusterEvent::WorkerReady { id, pid });
                if restarted {
                    self.emit(ClusterEvent::WorkerRestarted { id, pid });
                }
                if let Some(rr) = &self.round_robin {
                    rr.notify(RrCmd::Ready(key));
                }
                self.replacement_ready(key);
                self.check_cluster_ready();
            }
            (slot, _) => tracing::warn!(%slot, "a readiness report of the wrong role; ignored"),
        }
    }

    /// Announces cluster-ready once: the agent is ready and every worker is
    /// ready or marked failed.
    fn check_cluster_ready(&mut self) {
        if self.announced
            || self.stopping.is_some()
            || !self.workers_started
            || self.agent.state != ProcessState::Ready
            || !self.workers.iter().all(Slot::settled)
        {
            return;
        }
        self.announced = true;
        let agent = self.agent.proc.as_ref().map_or(0, |p| p.pid);
        let mut workers = Vec::new();
        let mut failed = Vec::new();
        for w in &self.workers {
            match (&w.proc, w.state) {
                (Some(p), ProcessState::Ready) => workers.push(p.pid),
                _ => failed.extend(w.id.worker_id()),
            }
        }
        for p in std::iter::once(&self.agent).chain(&self.workers).filter_map(|s| s.proc.as_ref()) {
            p.control(ToChild::ClusterReady);
        }
        self.emit(ClusterEvent::ClusterReady { master: self.pid, agent, workers, failed });
    }

    fn on_exit(&mut self, key: ProcKey, status: Option<ExitStatus>) {
        if self.replacement_exited(key, status.as_ref().map_or(ExitReason::Unknown, ExitReason::from_status)) {
            return;
        }
        if key.slot == SlotId::Agent {
            self.agent_memory_stop = false;
        }
        let Some(slot) = self.slot_mut(key.slot) else { return };
        let was_starting = slot.state == ProcessState::Starting;
        let Some(proc) = slot.take_proc(key) else { return };
        let exit = status.as_ref().map_or(ExitReason::Unknown, ExitReason::from_status);
        let uptime = proc.spawned_at.elapsed();
        let process = proc.process_ref();
        self.process_gone(&proc);
        self.emit(ClusterEvent::Exited { process: process.clone(), exit, uptime });
        if self.stopping.is_some() {
            if let Some(slot) = self.slot_mut(key.slot) {
                slot.state = ProcessState::Stopped;
            }
            self.advance_stop();
            return;
        }
        tracing::debug!(%process, %exit, "child died");
        if was_starting && !proc.timed_out {
            self.emit(ClusterEvent::StartFailed { process, reason: StartFailure::Exited(exit) });
        }
        if key.slot == SlotId::Agent
            && let Some(info) = self.agent_info.as_mut()
        {
            info.up = false;
            let info = info.clone();
            for w in &self.workers {
                if let Some(p) = &w.proc {
                    p.control(ToChild::AgentChanged(info.clone()));
                }
            }
        }
        if key.slot == SlotId::Agent && self.agent_reload_exited(&proc, exit) {
            return; // the old agent of a reload: its successor is started now, not after a backoff
        }
        self.schedule_restart(key.slot);
    }

    /// A ping tick: pings every ready process watched for hangs, and SIGKILLs
    /// one silent for its hang timeout (its exit is then handled as a crash:
    /// restart with backoff, a new epoch for the agent). Nothing is judged
    /// during shutdown, nor a process being replaced or stopped (those have
    /// their own deadlines).
    fn check_liveness(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        let mut hung = Vec::new();
        // An agent asked to stop for its memory limit has its own deadline.
        let agent = (!self.agent_memory_stop).then_some(&mut self.agent);
        for slot in agent.into_iter().chain(self.workers.iter_mut()) {
            if slot.state != ProcessState::Ready {
                continue;
            }
            let Some(proc) = slot.proc.as_mut() else { continue };
            let Some(live) = proc.liveness.as_mut() else { continue };
            match live.tick(now) {
                Verdict::Ping(seq) => proc.control(ToChild::Ping { seq }),
                Verdict::Hung { silent_for } => {
                    tracing::error!(
                        pid = proc.pid,
                        slot = %slot.id,
                        silent_ms = u64::try_from(silent_for.as_millis()).unwrap_or(u64::MAX),
                        "no answer to pings: hung; SIGKILL, then restart as after a crash"
                    );
                    proc.liveness = None;
                    proc.kill();
                    hung.push(ClusterEvent::Hung { process: proc.process_ref(), silent_for });
                }
            }
        }
        for event in hung {
            self.emit(event);
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::StartDeadline(key) => {
                let timeout = match key.slot {
                    SlotId::Agent => self.config.agent_start_timeout,
                    SlotId::Worker(_) => self.config.worker_start_timeout,
                };
                if self.replacement_timed_out(key, timeout) {
                    return;
                }
                let Some(slot) = self.slot_mut(key.slot) else { return };
                if slot.state != ProcessState::Starting {
                    return;
                }
                // The slot's starting process only: a predecessor being
                // replaced (`previous`) was ready long ago.
                let Some(proc) = slot.proc.as_mut().filter(|p| p.key == key) else { return };
                proc.timed_out = true;
                proc.kill();
                let process = proc.process_ref();
                tracing::error!(%process, ?timeout, "did not report ready in time; killed");
                self.emit(ClusterEvent::StartFailed { process, reason: StartFailure::TimedOut(timeout) });
            }
            Timer::Restart { slot, id } => {
                if self.stopping.is_some() {
                    return;
                }
                let Some(s) = self.slot_mut(slot) else { return };
                if s.timer != id || !matches!(s.state, ProcessState::BackingOff | ProcessState::Failed) {
                    return;
                }
                s.restarts += 1;
                if let Err(e) = self.start(slot) {
                    self.spawn_failed(slot, &e);
                }
            }
            Timer::Retry { slot, id } => {
                if self.stopping.is_some() {
                    return;
                }
                let Some(s) = self.slot_mut(slot) else { return };
                if s.timer != id || s.state != ProcessState::BackingOff {
                    return;
                }
                if let Err(e) = self.start(slot) {
                    self.spawn_failed(slot, &e);
                }
            }
            Timer::StopDeadline(id) => {
                let Some(stopping) = self.stopping else { return };
                if stopping.deadline_id != id {
                    return;
                }
                tracing::warn!(stage = ?stopping.stage, "grace period over; killing what is left");
                self.kill_stage(stopping.stage);
                self.after(REAP_TIMEOUT, Timer::ReapDeadline(id));
            }
            Timer::ReapDeadline(id) => {
                let Some(stopping) = self.stopping else { return };
                if stopping.deadline_id != id {
                    return;
                }
                tracing::error!(stage = ?stopping.stage, "killed processes were not reaped in time; giving up on them");
                let slots: Vec<SlotId> = match stopping.stage {
                    Stage::Workers => self.workers.iter().map(|w| w.id).collect(),
                    Stage::Agent => vec![SlotId::Agent],
                    Stage::Done => vec![],
                };
                for slot in slots {
                    if let Some(s) = self.slot_mut(slot)
                        && (s.proc.take().is_some() | s.previous.take().is_some())
                    {
                        s.state = ProcessState::Stopped;
                    }
                }
                self.advance_stop();
            }
            Timer::DrainDeadline(key) => self.drain_deadline(key),
            Timer::AgentStopDeadline(key) => {
                if let Some(agent) = self.agent.proc_mut(key) {
                    tracing::warn!(pid = agent.pid, "stopped agent did not exit within its grace period; SIGKILL");
                    agent.kill();
                }
            }
            Timer::EofKill(key) => {
                if let Some(proc) = self.slot_mut(key.slot).and_then(|s| s.proc_mut(key)) {
                    tracing::warn!(pid = proc.pid, "IPC channel closed but the process lives on; killing it");
                    proc.kill();
                }
            }
        }
    }

    // ---- shutdown ----------------------------------------------------------

    /// The first call starts a graceful stop; a second one skips the grace.
    fn begin_stop(&mut self) {
        if let Some(stopping) = self.stopping.as_mut() {
            if !stopping.forced {
                stopping.forced = true;
                tracing::warn!("second stop signal: skipping the grace period");
                self.emit(ClusterEvent::ShutdownStarted { forced: true });
                self.kill_stage(Stage::Workers);
                self.kill_stage(Stage::Agent);
            }
            return;
        }
        tracing::debug!("stopping: workers first, then the agent");
        self.emit(ClusterEvent::ShutdownStarted { forced: false });
        self.stopping_token.cancel();
        self.abort_run();
        self.abort_agent_reload();
        self.next_deadline += 1;
        self.stopping = Some(Stopping { stage: Stage::Workers, forced: false, deadline_id: self.next_deadline });
        let grace = self.config.worker_stop_timeout;
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        for w in &mut self.workers {
            for p in w.proc.iter().chain(w.previous.iter()) {
                if let Some(rr) = &self.round_robin {
                    rr.notify(RrCmd::Retire(p.key));
                }
            }
            if let Some(p) = &w.previous {
                p.control(ToChild::Stop { grace_ms });
            }
            match &w.proc {
                Some(p) => {
                    p.control(ToChild::Stop { grace_ms });
                    w.state = ProcessState::Stopping;
                }
                None if w.previous.is_some() => w.state = ProcessState::Stopping,
                None => w.state = ProcessState::Stopped,
            }
        }
        if self.agent.proc.is_none() {
            self.agent.state = ProcessState::Stopped;
        }
        self.after(grace, Timer::StopDeadline(self.next_deadline));
        self.advance_stop();
    }

    pub(crate) fn advance_stop(&mut self) {
        loop {
            let Some(stopping) = self.stopping else { return };
            match stopping.stage {
                Stage::Workers => {
                    if self.workers.iter().any(|w| w.proc.is_some() || w.previous.is_some()) {
                        return;
                    }
                    self.next_deadline += 1;
                    let id = self.next_deadline;
                    self.stopping = Some(Stopping { stage: Stage::Agent, deadline_id: id, ..stopping });
                    let grace = self.config.agent_stop_timeout;
                    if let Some(p) = &self.agent.proc {
                        tracing::debug!("workers stopped; stopping the agent");
                        p.control(ToChild::Stop { grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX) });
                        self.agent.state = ProcessState::Stopping;
                        self.after(grace, Timer::StopDeadline(id));
                        if stopping.forced {
                            self.kill_stage(Stage::Agent);
                        }
                    }
                }
                Stage::Agent => {
                    if self.agent.proc.is_some() {
                        return;
                    }
                    self.agent.state = ProcessState::Stopped;
                    self.stopping = Some(Stopping { stage: Stage::Done, ..stopping });
                }
                Stage::Done => return,
            }
        }
    }

    fn kill_stage(&mut self, stage: Stage) {
        let slots: Vec<&mut Slot> = match stage {
            Stage::Workers => self.workers.iter_mut().collect(),
            Stage::Agent => vec![&mut self.agent],
            Stage::Done => vec![],
        };
        for slot in slots {
            for p in slot.proc.iter_mut().chain(slot.previous.iter_mut()) {
                tracing::warn!(pid = p.pid, slot = %slot.id, "SIGKILL");
                p.kill();
            }
        }
    }

    // ---- control (the `tandem` CLI and the metrics) -------------------------

    fn on_ops(&mut self, call: OpsCall) {
        match call {
            OpsCall::Snapshot(reply) => {
                let snapshot = Snapshot {
                    name: self.control_name.clone(),
                    pid: self.pid,
                    uptime: self.started_at.elapsed(),
                    stopping: self.stopping.is_some(),
                    announced: self.announced,
                    table: self.status_table(),
                    messages: self.router.counts(),
                };
                let _ = reply.send(snapshot);
            }
            OpsCall::Stop(reply) => {
                let mut pids = vec![self.pid];
                pids.extend(
                    std::iter::once(&self.agent).chain(&self.workers).filter_map(|s| s.proc.as_ref()).map(|p| p.pid),
                );
                if self.stopping.is_none() {
                    tracing::info!("stop requested on the control socket");
                    self.begin_stop();
                }
                let _ = reply.send(pids);
            }
        }
    }

    // ---- status ------------------------------------------------------------

    /// The status table on stderr (SIGUSR1, exit); one JSON log event with `TANDEM_LOG=json`.
    fn print_status(&self) {
        let table = self.status_table();
        if crate::trace::json_logs() {
            let rows = serde_json::to_string(&table.rows).unwrap_or_default();
            tracing::info!(status = %rows, "status");
        } else {
            eprint!("{table}");
        }
    }

    pub(crate) fn status_table(&self) -> StatusTable {
        let master = StatusRow {
            role: Role::Master,
            worker_id: None,
            pid: Some(self.pid),
            state: if self.stopping.is_some() { ProcessState::Stopping } else { ProcessState::Ready },
            restarts: 0,
            uptime: Some(self.started_at.elapsed()),
            rss_bytes: rss_bytes(self.pid),
            epoch: None,
        };
        let mut rows = vec![master, self.agent.status_row()];
        rows.extend(self.workers.iter().map(Slot::status_row));
        StatusTable { rows }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // Normally all children have exited; if `serve` failed early, do not
        // leave any behind.
        for slot in std::iter::once(&mut self.agent).chain(self.workers.iter_mut()) {
            for p in slot.proc.iter_mut().chain(slot.previous.iter_mut()) {
                p.kill();
            }
        }
    }
}

/// Runs the master until shutdown, then waits briefly for its tasks.
pub(crate) async fn run(name: String, config: Config, hook: Option<MasterFn>) -> Result<(), Error> {
    let pid = std::process::id();
    let span = tracing::info_span!("tandem", role = "master", pid, cluster = %name);
    async move {
        match crate::descriptors::raise_nofile_limit() {
            Ok(crate::descriptors::Raised::Raised { from, to }) => {
                tracing::info!(from, to, "raised the soft descriptor limit (RLIMIT_NOFILE) to the hard limit")
            }
            Ok(crate::descriptors::Raised::AtHard(limit)) => {
                tracing::debug!(limit, "the descriptor limit (RLIMIT_NOFILE) is already at its hard limit")
            }
            Err(e) => tracing::warn!(error = %e, "could not raise the descriptor limit (RLIMIT_NOFILE)"),
        }
        let mut master = Master::new(name, config)?;
        let result = master.serve(hook).await;
        let tasks = master.tasks.clone();
        drop(master);
        Master::drain(tasks).await;
        result
    }
    .instrument(span)
    .await
}

/// Hands worker `id` its listening sockets over its descriptor channel. A
/// failure means the child is gone or broken; it then fails to start (it waits
/// for these sockets), which the supervisor reports and handles.
async fn send_listeners(
    listeners: Arc<BoundListeners>,
    id: WorkerId,
    fd_channel: std::os::fd::OwnedFd,
    round_robin: Option<RoundRobin>,
    key: ProcKey,
) {
    let channel = match crate::fdpass::FdChannel::new(fd_channel) {
        Ok(channel) => channel,
        Err(e) => {
            tracing::error!(error = %e, "could not set up the descriptor channel");
            return;
        }
    };
    for (header, fd) in listeners.for_worker(id) {
        if let Err(e) = channel.send(&header, fd).await {
            tracing::error!(error = %e, header, "could not pass a listening socket to the worker");
            return;
        }
    }
    // Round-robin connections and their acknowledgements use the same channel.
    if let Some(rr) = round_robin {
        rr.register(key, Arc::new(channel)).await;
    }
}

/// Refuses keys a child's environment cannot carry, or that the cluster sets itself.
fn check_child_env(env: &[(String, String)]) -> Result<(), Error> {
    for (key, value) in env {
        let reason = if key.is_empty() {
            "it is empty"
        } else if key.contains('=') || key.contains('\0') || value.contains('\0') {
            "a key may not hold '=' and neither key nor value a NUL byte"
        } else if key.starts_with("TANDEM_") {
            "TANDEM_* variables are the cluster's own"
        } else {
            continue;
        };
        return Err(Error::InvalidChildEnv { key: key.clone(), reason });
    }
    Ok(())
}

/// Writes queued messages to one child: control first, then data, in batches
/// of at most `WRITE_BATCH + 1`. Ends when both queues are closed or the child
/// is gone (its waiter reports the exit).
async fn write_to_child(wr: UnixWriteHalf, control: mpsc::Receiver<ToChild>, data: mpsc::Receiver<ToChild>) {
    let mut w = FramedWrite::new(wr, MasterCodec::new());
    let limits = WriteLimits::default().max_batch(WRITE_BATCH + 1);
    let _ = tandem_protocol::internal::write_loop(&mut ToChildQueues { control, data }, &mut w, limits).await;
}

struct ToChildQueues {
    control: mpsc::Receiver<ToChild>,
    data: mpsc::Receiver<ToChild>,
}

impl WriteSource for ToChildQueues {
    type Item = ToChild;
    type Tag = ();

    async fn next(&mut self) -> Option<ToChild> {
        tokio::select! {
            biased;
            Some(item) = self.control.recv() => Some(item),
            Some(item) = self.data.recv() => Some(item),
            else => None,
        }
    }

    fn try_next(&mut self) -> Option<ToChild> {
        self.control.try_recv().or_else(|_| self.data.try_recv()).ok()
    }

    fn tag(_: &ToChild) {}

    /// A message that cannot be encoded (too large) is dropped without breaking the channel.
    fn refused(&mut self, (): (), error: CodecError) -> Refused<ToChild> {
        tracing::warn!(error = %error, "message to a child dropped");
        Refused::Skip
    }
}

async fn read_from_child(rd: UnixReadHalf, key: ProcKey, tx: mpsc::Sender<Input>) {
    let mut reader = FramedRead::new(rd, MasterCodec::new());
    loop {
        let input = match reader.next().await {
            Some(Ok(msg)) => Input::FromChild(key, msg),
            Some(Err(e)) => {
                let input = match e {
                    CodecError::Io(_) => Input::Eof(key, Some(error_chain(&e))),
                    _ => Input::BadFrame(key, error_chain(&e)),
                };
                let _ = tx.send(input).await;
                return;
            }
            None => {
                let _ = tx.send(Input::Eof(key, None)).await;
                return;
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// Owns the child: reaps it (waitpid) when it exits, or SIGKILLs it on request
/// and then reaps it.
async fn wait_for_child(mut child: Child, kill: oneshot::Receiver<()>, key: ProcKey, tx: mpsc::Sender<Input>) {
    let status = tokio::select! {
        status = child.wait() => status,
        Ok(()) = kill => {
            if let Err(e) = child.start_kill() {
                tracing::warn!(error = %e, "SIGKILL failed");
            }
            child.wait().await
        }
    };
    let status = match status {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::error!(error = %e, "could not reap a child");
            None
        }
    };
    let _ = tx.send(Input::Exited(key, status)).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// What `read_from_child` reports for the bytes a child end writes and then how it goes away.
    async fn read_outcome(written: &[u8], child_reads_nothing_sent: bool) -> Input {
        let (master, mut child) = tokio::net::UnixStream::pair().unwrap();
        let (rd, mut wr) = tandem_protocol::unix::split(master).unwrap();
        child.write_all(written).await.unwrap();
        if child_reads_nothing_sent {
            // Bytes the child never read: closing its end resets the connection.
            wr.write_all(b"unread").await.unwrap();
        }
        drop(child);
        let key = ProcKey { slot: SlotId::Agent, generation: 1 };
        let (tx, mut rx) = mpsc::channel(4);
        tokio::time::timeout(TEST_TIMEOUT, read_from_child(rd, key, tx)).await.unwrap();
        rx.recv().await.unwrap()
    }

    #[tokio::test]
    async fn a_child_gone_with_bytes_unread_is_a_read_failure_with_its_cause_not_a_bad_frame() {
        match read_outcome(b"", true).await {
            Input::Eof(_, Some(error)) => assert!(error.contains("connection I/O failed: "), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_outcome(b"", false).await, Input::Eof(_, None)));
    }

    #[tokio::test]
    async fn bytes_that_are_no_ipc_message_are_a_bad_frame_with_the_decoder_s_reason() {
        match read_outcome(b"\x00\x00\x00\x01\xc1", false).await {
            Input::BadFrame(_, error) => assert!(error.starts_with("malformed frame body: "), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn child_env_refuses_what_a_child_cannot_carry_or_the_cluster_sets() {
        let env = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert!(check_child_env(&env("APP_REGISTRY", "127.0.0.1:7000")).is_ok());
        for (key, value, why) in
            [("", "x", "empty"), ("A=B", "x", "'='"), ("A", "x\0y", "NUL"), ("TANDEM_ROLE", "agent", "TANDEM_")]
        {
            match check_child_env(&env(key, value)) {
                Err(Error::InvalidChildEnv { key: k, reason }) => {
                    assert_eq!(k, key);
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{key:?}: {other:?}"),
            }
        }
    }
}
