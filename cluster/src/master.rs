//! The master: the executor of the cluster. It owns the processes, their
//! channels, the listening and control sockets and one timer queue, and
//! carries out the actions of the state machines that decide: the router
//! (messages and links), the stop sequence ([`stop`](crate::stop)), the
//! workers' reload ([`reload`](crate::reload)), the agent's reload
//! ([`agent_reload`](crate::agent_reload)), the memory limits
//! ([`memory`](crate::memory)) and each slot's crash-loop backoff
//! ([`supervisor`](crate::supervisor)).
//!
//! One task (the loop in [`Master::serve`]) owns all the state; it never waits
//! on a child. Per child, a reader task feeds it decoded frames, a writer task
//! drains that child's two bounded queues, and a waiter task reaps it
//! ([`child_io`](crate::child_io)). The loop only ever `try_send`s to those queues.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod children;

use crate::agent_reload::AgentReload;
use crate::app::MasterFn;
use crate::child_io::Input;
use crate::cluster_control::{ClusterControl, ControlCall, ReplaceReason};
use crate::control::{ControlServer, ControlStats, MasterHandle, OpsCall, Snapshot};
use crate::events::Events;
use crate::ipc::{Delivery, FromChild, Outcome, ToChild};
use crate::lifecycle::{Action, Machine, Timer, grace_ms};
use crate::listeners::BoundListeners;
use crate::master_context::MasterContext;
use crate::memory::MemoryLimits;
use crate::messenger::{Inbox, LocalCall, Messenger, Port, Transport};
use crate::reload::Reload;
use crate::round_robin::{Cmd as RrCmd, RoundRobin};
use crate::router::{Action as Route, Peers, Responder, Router};
use crate::runtime_dir::{RuntimeDir, new_token};
use crate::signals::{MasterSignal, MasterSignals};
use crate::spawn::Program;
use crate::status::{ProcessState, StatusRow, StatusTable, rss_bytes};
use crate::stop::{Graces, StopSequence};
use crate::supervisor::{Proc, Slots};
use crate::timers::TimerQueue;
use crate::types::{AgentInfo, ProcKey, Sender, SlotId};
use crate::{BoxError, ClusterEvent, Config, Error, Role, StartFailure, WorkerId};

/// Inputs queued for the loop (bounded: readers wait when it is full, which
/// back-pressures the children's sockets).
const INPUT_CAPACITY: usize = 1024;
/// Calls from the master's own messenger (full: its callers wait).
const LOCAL_CAPACITY: usize = 256;
/// Events buffered for slow readers of [`Events`] (full: the slowest reader lags).
const EVENTS_CAPACITY: usize = 1024;
/// A child whose IPC channel closed but which has not exited after this long is killed.
const EOF_KILL_AFTER: Duration = Duration::from_secs(2);
/// How often expired requests are pruned.
const PRUNE_EVERY: Duration = Duration::from_millis(500);
/// How often the master samples its children's RSS against their memory limits.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The most inputs handled in one turn of the master's loop.
const INPUT_BURST: usize = 256;

/// What does not change in the master's life: who it is, where, what it starts.
#[derive(Debug)]
struct Setup {
    config: Config,
    name: String,
    pid: u32,
    started_at: Instant,
    dir: RuntimeDir,
    token: String,
    /// What children are started from (the executable as on disk at each spawn).
    program: Program,
    /// The control socket's name.
    control_name: String,
}

/// What the master tells its children about the cluster, and how far it got.
#[derive(Debug)]
struct Progress {
    /// The last epoch handed to an agent.
    epoch: u64,
    agent_info: Option<AgentInfo>,
    next_generation: u64,
    workers_started: bool,
    /// The first cluster-ready was announced.
    announced: bool,
}

/// The sockets the master holds for its whole life.
#[derive(Debug)]
struct Sockets {
    /// The listening sockets, bound before any child starts, kept open until exit.
    listeners: Arc<BoundListeners>,
    /// The round-robin dispatcher, when a listener uses that mode.
    round_robin: Option<RoundRobin>,
    /// The control socket, until `serve` starts serving it.
    control: Option<ControlServer>,
}

/// What comes into the loop besides signals and timers (every channel bounded).
#[derive(Debug)]
struct Inbound {
    input_tx: mpsc::Sender<Input>,
    input: mpsc::Receiver<Input>,
    local: mpsc::Receiver<LocalCall>,
    control_tx: mpsc::Sender<ControlCall>,
    control: mpsc::Receiver<ControlCall>,
    ops_tx: mpsc::Sender<OpsCall>,
    ops: mpsc::Receiver<OpsCall>,
}

/// What goes out of the loop to its observers.
#[derive(Debug)]
struct Outbound {
    events: broadcast::Sender<ClusterEvent>,
    /// The first receiver, subscribed before any event, for the master function.
    first_events: Option<broadcast::Receiver<ClusterEvent>>,
    /// Counters the control socket and `/metrics` read (reloads, whatever started them).
    stats: Arc<ControlStats>,
}

/// The master's tasks and the tokens that end them.
#[derive(Debug)]
struct Lifetime {
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// The master function asked for a stop.
    shutdown_requested: CancellationToken,
    /// Cancelled when a stop begins (the master function's view).
    stopping: CancellationToken,
}

pub(crate) struct Master {
    setup: Setup,
    progress: Progress,
    slots: Slots,
    sockets: Sockets,
    stop: StopSequence,
    reload: Reload,
    agent_reload: AgentReload,
    memory: MemoryLimits,
    /// Every deadline of the master, in one queue polled by the loop.
    timers: TimerQueue<Timer>,
    router: Router,
    port: Arc<Port>,
    inbound: Inbound,
    outbound: Outbound,
    lifetime: Lifetime,
    hook_error: Option<BoxError>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master").field("name", &self.setup.name).field("pid", &self.setup.pid).finish_non_exhaustive()
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
        let slots = Slots::new(config.worker_count() as WorkerId, &config.restart);
        let (input_tx, input) = mpsc::channel(INPUT_CAPACITY);
        let (local_tx, local) = mpsc::channel(LOCAL_CAPACITY);
        let (events, first_events) = broadcast::channel(EVENTS_CAPACITY);
        let (control_tx, control_rx) = mpsc::channel(crate::cluster_control::CONTROL_CALLS_CAPACITY);
        let port = Arc::new(Port {
            me: Sender::Master { pid },
            inbox: Inbox::new(config.subscription_capacity),
            transport: Transport::Master(local_tx),
        });
        tracing::debug!(runtime_dir = %dir.path().display(), workers = config.worker_count(), "master starting");
        // Full: the control socket's and the metrics' callers wait.
        let (ops_tx, ops) = mpsc::channel(LOCAL_CAPACITY);
        Ok(Master {
            setup: Setup { config, name, pid, started_at: Instant::now(), dir, token, program, control_name },
            progress: Progress {
                epoch: 0,
                agent_info: None,
                next_generation: 1,
                workers_started: false,
                announced: false,
            },
            slots,
            sockets: Sockets { listeners, round_robin, control: Some(control) },
            stop: StopSequence::default(),
            reload: Reload::default(),
            agent_reload: AgentReload::default(),
            memory: MemoryLimits::default(),
            timers: TimerQueue::default(),
            router: Router::default(),
            port,
            inbound: Inbound { input_tx, input, local, control_tx, control: control_rx, ops_tx, ops },
            outbound: Outbound { events, first_events: Some(first_events), stats: Arc::new(ControlStats::default()) },
            lifetime: Lifetime {
                tasks,
                cancel,
                shutdown_requested: CancellationToken::new(),
                stopping: CancellationToken::new(),
            },
            hook_error: None,
        })
    }

    async fn serve(&mut self, hook: Option<MasterFn>) -> Result<(), Error> {
        let mut signals = MasterSignals::install().map_err(Error::Signals)?;
        let handle = MasterHandle {
            calls: self.inbound.ops_tx.clone(),
            reload: self.control(),
            messenger: Messenger::new(Arc::clone(&self.port)),
            stats: Arc::clone(&self.outbound.stats),
        };
        let metrics_addr = match self.setup.config.metrics {
            Some(addr) => {
                let limits = crate::metrics_endpoint::Limits::from_config(&self.setup.config);
                let round_robin = self.sockets.round_robin.as_ref().map(RoundRobin::stats);
                let (tasks, cancel) = (&self.lifetime.tasks, self.lifetime.cancel.clone());
                Some(crate::metrics::serve(addr, limits, handle.clone(), round_robin, tasks, cancel).await?)
            }
            None => None,
        };
        if let Some(control) = self.sockets.control.take() {
            control.spawn(handle, &self.lifetime.tasks, self.lifetime.cancel.clone());
        }
        if let Some(hook) = hook {
            self.start_hook(hook, metrics_addr);
        }
        if let Err(source) = self.start(SlotId::Agent) {
            return Err(Error::Spawn { what: "agent".into(), source });
        }
        self.after(PRUNE_EVERY, Timer::Prune);
        if self.setup.config.worker_max_memory.is_some() || self.setup.config.agent_max_memory.is_some() {
            self.after(MEMORY_SAMPLE_EVERY, Timer::MemorySample);
        }
        // Zero turns hang detection off: no ping is ever armed.
        if !self.setup.config.ping_interval.is_zero() {
            self.after(self.setup.config.ping_interval, Timer::Ping);
        }
        while !self.stop.is_done() {
            tokio::select! {
                Some(input) = self.inbound.input.recv() => {
                    self.on_input(input);
                    // What else the readers queued meanwhile, before the other
                    // branches are polled again: a relay burst costs one pass
                    // over the signals and timers, not one per frame.
                    for _ in 0..INPUT_BURST {
                        if self.stop.is_done() {
                            break;
                        }
                        let Ok(input) = self.inbound.input.try_recv() else { break };
                        self.on_input(input);
                    }
                }
                Some(call) = self.inbound.local.recv() => self.on_local(call),
                Some(call) = self.inbound.ops.recv() => self.on_ops(call),
                signal = signals.recv() => match signal {
                    MasterSignal::Stop => self.begin_stop(),
                    MasterSignal::Status => self.print_status(),
                    MasterSignal::Reload => self.request_reload(None),
                },
                Some(call) = self.inbound.control.recv() => match call {
                    ControlCall::Reload { reply } => self.request_reload(reply),
                    ControlCall::ReloadAgent { reply } => self.request_agent_reload(reply),
                },
                timer = self.timers.next() => self.on_timer(timer),
                _ = self.lifetime.shutdown_requested.cancelled(), if !self.stop.is_stopping() => self.begin_stop(),
            }
        }
        if self.setup.config.status_at_exit {
            self.print_status();
        }
        tracing::debug!("all children exited; master exiting");
        self.port.inbox.close();
        self.lifetime.cancel.cancel();
        self.lifetime.tasks.close();
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
        let events = self.outbound.first_events.take().map(Events::new);
        let ctx = MasterContext::new(
            self.setup.pid,
            self.setup.dir.path().to_owned(),
            self.setup.token.clone(),
            Messenger::new(Arc::clone(&self.port)),
            events,
            self.outbound.events.subscribe(),
            self.lifetime.shutdown_requested.clone(),
            self.lifetime.stopping.clone(),
            self.control(),
            self.sockets.listeners.infos(),
        )
        .with_operations(self.setup.control_name.clone(), metrics_addr);
        let input = self.inbound.input_tx.clone();
        self.lifetime.tasks.spawn(
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
    fn emit(&self, event: ClusterEvent) {
        let replacing = self.reload.running().is_some() || self.agent_reload.is_running();
        match &event {
            // Hung: logged at ERROR, with its fields, where it is decided.
            ClusterEvent::Spawned { .. }
            | ClusterEvent::AgentReady { .. }
            | ClusterEvent::WorkerReady { .. }
            | ClusterEvent::Hung { .. } => {
                tracing::debug!(%event, "cluster event")
            }
            ClusterEvent::Exited { .. } if self.stop.is_stopping() || replacing => {
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
                self.outbound.stats.reloads_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ClusterEvent::ReloadFailed { .. } => {
                self.outbound.stats.reloads_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            _ => {}
        }
        // Err: nobody listens.
        let _ = self.outbound.events.send(event);
    }

    /// Arms `timer` to fire after `delay` (in the master's one timer queue).
    fn after(&mut self, delay: Duration, timer: Timer) {
        self.timers.after(delay, timer);
    }

    /// A handle to ask this master for a reload.
    fn control(&self) -> ClusterControl {
        ClusterControl::new(self.inbound.control_tx.clone())
    }

    fn graces(&self) -> Graces {
        Graces { workers: self.setup.config.worker_stop_timeout, agent: self.setup.config.agent_stop_timeout }
    }

    fn reload_settings(&self) -> crate::reload::Settings {
        crate::reload::Settings {
            parallelism: self.setup.config.reload_parallelism,
            start_timeout: self.setup.config.worker_start_timeout,
            stop_timeout: self.setup.config.worker_stop_timeout,
        }
    }

    // ---- carrying out the lifecycle machines' actions ------------------------

    /// Carries out `actions` in order. What an action gives back (a spawn's
    /// outcome, a machine run again) is carried out next, before the rest.
    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let more = self.carry_out_step(action);
            for a in more.into_iter().rev() {
                queue.push_front(a);
            }
        }
    }

    fn carry_out_step(&mut self, action: Action) -> Vec<Action> {
        match action {
            Action::Stop { to, grace } => {
                if let Some(p) = self.slots.proc(to) {
                    p.control(ToChild::Stop { grace_ms: grace_ms(grace) });
                }
            }
            Action::Kill(key) => {
                if let Some(p) = self.slots.proc_mut(key) {
                    p.kill();
                }
            }
            Action::TimedOut(key) => {
                if let Some(p) = self.slots.proc_mut(key) {
                    p.timed_out = true;
                }
            }
            Action::Retire(key) => {
                if let Some(rr) = &self.sockets.round_robin {
                    rr.notify(RrCmd::Retire(key));
                }
            }
            Action::SetState(id, state) => {
                if let Some(s) = self.slots.get_mut(id) {
                    s.state = state;
                }
            }
            Action::After(delay, timer) => self.after(delay, timer),
            Action::Emit(event) => self.emit(event),
            Action::Abandon(id) => {
                if let Some(s) = self.slots.get_mut(id)
                    && (s.proc.take().is_some() | s.previous.take().is_some())
                {
                    s.state = ProcessState::Stopped;
                }
            }
            Action::Replace(id) => return self.replace(id),
            Action::Restore(id) => {
                if let Some(s) = self.slots.get_mut(id)
                    && let Some(old) = s.previous.take()
                {
                    s.proc = Some(old);
                    s.state = ProcessState::Ready;
                }
            }
            Action::Relaunch(id) => {
                let outcome = self.launch(id).map_err(|e| e.to_string()).and_then(|()| self.count_new_process(id));
                return self.agent_reload.on_launched(outcome, id);
            }
            Action::Restart(id) => self.schedule_restart(id),
            Action::ReplaceOverMemory(id) => return self.reload.replace_over_memory(id),
            Action::Reply(reply) => reply.send(),
            Action::Advance(Machine::Stop) => return self.stop.on_advance(&self.slots, self.graces()),
            Action::Advance(Machine::Reload) => {
                let settings = self.reload_settings();
                return self.reload.on_advance(&self.slots, settings);
            }
        }
        Vec::new()
    }

    /// Moves worker `id`'s process aside (it serves on) and spawns its successor.
    fn replace(&mut self, id: WorkerId) -> Vec<Action> {
        let slot = SlotId::Worker(id);
        if let Some(s) = self.slots.get_mut(slot)
            && let Some(old) = s.proc.take()
        {
            s.previous = Some(old);
        }
        let outcome = self.launch(slot).map_err(|e| e.to_string()).and_then(|()| self.count_new_process(slot));
        self.reload.on_launched(id, outcome)
    }

    /// A replacement's process was spawned: the status table's `restarts`
    /// counts every new process of the slot. Its key and pid.
    fn count_new_process(&mut self, slot: SlotId) -> Result<(ProcKey, u32), String> {
        let s = self.slots.get_mut(slot).ok_or("no such slot")?;
        s.restarts += 1;
        s.proc.as_ref().map(|p| (p.key, p.pid)).ok_or_else(|| "the new process is gone".to_owned())
    }

    // ---- the loop's inputs -------------------------------------------------

    fn on_input(&mut self, input: Input) {
        match input {
            Input::FromChild(key, msg) => self.on_child_message(key, msg),
            Input::BadFrame(key, error) => {
                if let Some(proc) = self.slots.get_mut(key.slot).and_then(|s| s.proc_mut(key)) {
                    tracing::error!(pid = proc.pid, error, "bad frame from a child; killing it");
                    proc.kill();
                }
            }
            Input::Eof(key, failure) => {
                if let Some(proc) = self.slots.proc(key) {
                    if let Some(error) = failure {
                        tracing::warn!(pid = proc.pid, error, "reading from a child failed; it is gone or going");
                    }
                    self.after(EOF_KILL_AFTER, Timer::EofKill(key));
                }
            }
            Input::Exited(key, status) => self.on_exit(key, status),
            Input::HookFailed(e) => {
                self.hook_error = Some(e);
                if !self.stop.is_stopping() {
                    self.begin_stop();
                }
            }
        }
    }

    fn on_child_message(&mut self, key: ProcKey, msg: FromChild) {
        let Some(proc) = self.slots.proc(key) else {
            return; // from a process already reaped
        };
        let origin = proc.sender();
        match msg {
            FromChild::Ready(ready) => self.on_ready(key, ready),
            FromChild::Pong { seq } => {
                if let Some(live) = self.slots.proc_mut(key).and_then(|p| p.liveness.as_mut()) {
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
                let origin = Sender::Master { pid: self.setup.pid };
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
    fn route(&mut self, step: impl FnOnce(&mut Router, Peers<'_>) -> Vec<Route>) {
        let peers = Peers { slots: &self.slots, stopping: self.stop.is_stopping() };
        let mut actions = step(&mut self.router, peers);
        for action in actions.drain(..) {
            self.carry_out(action);
        }
        self.router.recycle(actions);
    }

    fn carry_out(&mut self, action: Route) {
        match action {
            Route::Data { to, msg } => {
                // The router checked the room; only a process gone meanwhile refuses.
                if let Some(proc) = self.slots.proc(to)
                    && let Err(e) = proc.data.try_send(msg)
                {
                    tracing::warn!(pid = proc.pid, slot = %to.slot, error = %e, "data message not queued");
                }
            }
            Route::Control { to, msg } => {
                if let Some(proc) = self.slots.proc(to) {
                    proc.control(msg);
                }
            }
            // Err: the caller gave up.
            Route::Answer { reply, outcome } => drop(reply.send(outcome)),
            Route::Deliver(Delivery { topic, payload, from, request }) => {
                self.port.deliver(topic, from, payload, request)
            }
            Route::Status(responder) => {
                let answer = responder.answer(Outcome::Status(self.status_table()));
                self.carry_out(answer);
            }
        }
    }

    /// A process exited (and is out of its slot): the round-robin dispatcher
    /// forgets it, and the router fails its requests and closes its links.
    fn process_gone(&mut self, proc: &Proc) {
        let key = proc.key;
        if let Some(rr) = &self.sockets.round_robin {
            rr.notify(RrCmd::Remove(key));
        }
        self.route(|router, peers| router.on_gone(peers, key));
    }

    // ---- timers ------------------------------------------------------------

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::StartDeadline(key) => self.start_deadline(key),
            Timer::Restart { slot, id } => {
                if self.stop.is_stopping() {
                    return;
                }
                let Some(s) = self.slots.get_mut(slot) else { return };
                if s.timer != id || !matches!(s.state, ProcessState::BackingOff | ProcessState::Failed) {
                    return;
                }
                s.restarts += 1;
                if let Err(e) = self.start(slot) {
                    self.spawn_failed(slot, &e);
                }
            }
            Timer::Retry { slot, id } => {
                if self.stop.is_stopping() {
                    return;
                }
                let Some(s) = self.slots.get_mut(slot) else { return };
                if s.timer != id || s.state != ProcessState::BackingOff {
                    return;
                }
                if let Err(e) = self.start(slot) {
                    self.spawn_failed(slot, &e);
                }
            }
            Timer::StopDeadline(id) => {
                let actions = self.stop.on_deadline(id, &self.slots);
                self.apply(actions);
            }
            Timer::ReapDeadline(id) => {
                let actions = self.stop.on_reap_deadline(id, &self.slots);
                self.apply(actions);
            }
            Timer::DrainDeadline(key) => {
                if let Some(p) = self.slots.proc_mut(key) {
                    tracing::warn!(pid = p.pid, "stopped worker did not exit within its grace period; SIGKILL");
                    p.kill();
                }
            }
            Timer::AgentStopDeadline(key) => {
                if let Some(agent) = self.slots.get_mut(key.slot).and_then(|s| s.proc_mut(key)) {
                    tracing::warn!(pid = agent.pid, "stopped agent did not exit within its grace period; SIGKILL");
                    agent.kill();
                }
            }
            Timer::EofKill(key) => {
                if let Some(proc) = self.slots.proc_mut(key) {
                    tracing::warn!(pid = proc.pid, "IPC channel closed but the process lives on; killing it");
                    proc.kill();
                }
            }
            Timer::Prune => {
                self.route(|router, _| router.on_tick(Instant::now()));
                self.refill_reserve();
                self.after(PRUNE_EVERY, Timer::Prune);
            }
            Timer::MemorySample => {
                self.check_memory();
                self.after(MEMORY_SAMPLE_EVERY, Timer::MemorySample);
            }
            Timer::Ping => {
                self.check_liveness(Instant::now());
                self.after(self.setup.config.ping_interval, Timer::Ping);
            }
        }
    }

    /// A process's start deadline: a replacement is stopped (its reload rolls
    /// back); any other process still starting is killed.
    fn start_deadline(&mut self, key: ProcKey) {
        let settings = self.reload_settings();
        if let Some(actions) = self.reload.on_start_timeout(&self.slots, key, settings) {
            return self.apply(actions);
        }
        let timeout = match key.slot {
            SlotId::Agent => self.setup.config.agent_start_timeout,
            SlotId::Worker(_) => self.setup.config.worker_start_timeout,
        };
        let Some(slot) = self.slots.get_mut(key.slot) else { return };
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

    // ---- reloads, memory, stop ---------------------------------------------

    /// Starts a reload of the workers (SIGHUP: no reply; the outcome is an event and a log line).
    fn request_reload(&mut self, reply: Option<crate::lifecycle::ReloadReply>) {
        let gate = crate::reload::Gate {
            stopping: self.stop.is_stopping(),
            announced: self.progress.announced,
            running: self.agent_reload.is_running().then_some(ReplaceReason::AgentReload),
        };
        let actions = self.reload.request(&self.slots, gate, reply);
        self.apply(actions);
    }

    /// Starts a reload of the agent, or refuses it (answered at once).
    fn request_agent_reload(&mut self, reply: crate::lifecycle::AgentReloadReply) {
        let exe = self.setup.program.exe.clone();
        let gate = crate::agent_reload::Gate {
            stopping: self.stop.is_stopping(),
            announced: self.progress.announced,
            running: self.reload.running(),
            memory_stop: self.memory.agent_stopping(),
            executable: crate::agent_reload::executable(&exe),
            exe,
        };
        let Some(agent) = self.slots.agent() else { return };
        let actions = self.agent_reload.request(agent, gate, self.setup.config.agent_stop_timeout, reply);
        self.apply(actions);
    }

    /// Samples every child's RSS against its memory limit.
    fn check_memory(&mut self) {
        let config = &self.setup.config;
        let sample = crate::memory::Sample {
            now: Instant::now(),
            agent_limit: config.agent_max_memory,
            worker_limit: config.worker_max_memory,
            agent_grace: config.agent_stop_timeout,
            stopping: self.stop.is_stopping(),
            announced: self.progress.announced,
            replacing: self.reload.running().is_some(),
            agent_reloading: self.agent_reload.is_running(),
        };
        let actions = self.memory.on_sample(&mut self.slots, sample, rss_bytes);
        self.apply(actions);
    }

    /// The first call starts a graceful stop; a second one skips the grace.
    fn begin_stop(&mut self) {
        let first = !self.stop.is_stopping();
        let mut actions = self.stop.begin(&self.slots, self.graces());
        if first {
            self.lifetime.stopping.cancel();
            // After the `ShutdownStarted` event: the reloads in progress end, answered.
            let mut aborted = self.reload.abort();
            aborted.extend(self.agent_reload.abort());
            let at = actions.len().min(1);
            actions.splice(at..at, aborted);
        }
        self.apply(actions);
    }

    fn advance_stop(&mut self) {
        let actions = self.stop.on_advance(&self.slots, self.graces());
        self.apply(actions);
    }

    // ---- control (the `tandem` CLI and the metrics) -------------------------

    fn on_ops(&mut self, call: OpsCall) {
        match call {
            OpsCall::Snapshot(reply) => {
                let snapshot = Snapshot {
                    name: self.setup.control_name.clone(),
                    pid: self.setup.pid,
                    uptime: self.setup.started_at.elapsed(),
                    stopping: self.stop.is_stopping(),
                    announced: self.progress.announced,
                    table: self.status_table(),
                    messages: self.router.counts(),
                };
                let _ = reply.send(snapshot);
            }
            OpsCall::Stop(reply) => {
                let mut pids = vec![self.setup.pid];
                pids.extend(self.slots.iter().filter_map(|s| s.proc.as_ref()).map(|p| p.pid));
                if !self.stop.is_stopping() {
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
            pid: Some(self.setup.pid),
            state: if self.stop.is_stopping() { ProcessState::Stopping } else { ProcessState::Ready },
            restarts: 0,
            uptime: Some(self.setup.started_at.elapsed()),
            rss_bytes: rss_bytes(self.setup.pid),
            epoch: None,
        };
        let mut rows = vec![master];
        rows.extend(self.slots.iter().map(|s| s.status_row()));
        StatusTable { rows }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // Normally all children have exited; if `serve` failed early, do not
        // leave any behind.
        for slot in self.slots.iter_mut() {
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
        let tasks = master.lifetime.tasks.clone();
        drop(master);
        Master::drain(tasks).await;
        result
    }
    .instrument(span)
    .await
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

#[cfg(test)]
mod tests {
    use super::*;

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
