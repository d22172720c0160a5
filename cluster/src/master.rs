//! The master: the executor of the cluster. It owns the processes, their
//! channels, the listening and control sockets and one timer queue, and
//! carries out the actions of the state machines that decide: the router
//! (messages and links), the stop sequence ([`stop`](crate::stop)), the
//! workers' reload ([`reload`](crate::reload)), the agent's reload
//! ([`agent_reload`](crate::agent_reload)), the memory limits
//! ([`memory`](crate::memory)), the worker count ([`scale`](crate::scale))
//! and each slot's crash-loop backoff ([`supervisor`](crate::supervisor)).
//!
//! One task (the loop in [`Master::serve`]) owns all the state; it never waits
//! on a child. Per child, a reader task feeds it decoded frames, a writer task
//! drains that child's two bounded queues, and a waiter task reaps it
//! ([`child_io`](crate::child_io)). The loop only ever `try_send`s to those queues.

use std::ffi::OsString;
use std::sync::Arc;

use futures::FutureExt;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod children;
mod lifecycle;
mod operations;
mod standby;

use crate::agent_reload::AgentReload;
use crate::app::MasterFn;
use crate::child_io::Input;
use crate::control::{ControlServer, ControlStats, MasterHandle, OpsCall};
use crate::events::ClusterEvents;
use crate::identity::{AgentInfo, Origin, ProcKey, SlotId};
use crate::ipc::{Delivery, FromChild, Outcome};
use crate::lifecycle::Timer;
use crate::listeners::BoundListeners;
use crate::master_context::MasterContext;
use crate::memory::MemoryLimits;
use crate::messenger::{Endpoint, Inbox, LocalCall, Messenger, Transport};
use crate::reload::Reload;
use crate::reload_handle::{ClusterControl, ControlCall};
use crate::round_robin::{Cmd as RrCmd, RoundRobin};
use crate::router::{Action as Route, Peers, Responder, Router};
use crate::runtime_dir::{RuntimeDir, new_token};
use crate::scale::Scale;
use crate::signals::{MasterSignal, MasterSignals};
use crate::spawn::Program;
use crate::stop::{Graces, StopSequence};
use crate::supervisor::{Proc, Slots};
use crate::timers::TimerQueue;
use crate::{BoxError, ClusterEvent, Config, Error, ProcessRole, WorkerId};

/// Inputs queued for the loop (bounded: readers wait when it is full, which
/// back-pressures the children's sockets).
const INPUT_CAPACITY: usize = 1024;
/// Calls from the master's own messenger (full: its callers wait).
const LOCAL_CAPACITY: usize = 256;
/// Events buffered for slow readers of [`ClusterEvents`] (full: the slowest reader lags).
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
    /// How each slot's last process ended (the status table's `LAST EXIT`).
    last_exits: std::collections::HashMap<SlotId, crate::ExitReason>,
    /// Promoted standbys: the key their I/O tasks still report under, to the
    /// key they have in the agent's slot (removed at their exit).
    promoted: std::collections::HashMap<ProcKey, ProcKey>,
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

/// The lifecycle state machines the master carries out (each I/O-free).
#[derive(Debug)]
struct Machines {
    stop: StopSequence,
    reload: Reload,
    agent_reload: AgentReload,
    memory: MemoryLimits,
    scale: Scale,
    standby: crate::standby::Standby,
}

pub(crate) struct Master {
    setup: Setup,
    progress: Progress,
    slots: Slots,
    sockets: Sockets,
    machines: Machines,
    /// Every deadline of the master, in one queue polled by the loop.
    timers: TimerQueue<Timer>,
    router: Router,
    endpoint: Arc<Endpoint>,
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
        let logs = crate::logs::Logs::start(&config, &control_name)?;
        let program = Program {
            exe,
            args,
            cluster: name.clone(),
            name: control_name.clone(),
            master_pid: pid,
            env: config.child_env.clone(),
            logs: logs.clone(),
        };
        let mut slots = Slots::new(config.worker_count() as WorkerId, &config.restart);
        let standby = config.standby;
        if standby {
            slots.add_standby(&config.restart);
        }
        let desired = u32::try_from(config.worker_count()).unwrap_or(u32::MAX);
        let (input_tx, input) = mpsc::channel(INPUT_CAPACITY);
        let (local_tx, local) = mpsc::channel(LOCAL_CAPACITY);
        let (events, first_events) = broadcast::channel(EVENTS_CAPACITY);
        let (control_tx, control_rx) = mpsc::channel(crate::reload_handle::CONTROL_CALLS_CAPACITY);
        let endpoint = Arc::new(Endpoint {
            me: Origin::Master { pid },
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
                last_exits: std::collections::HashMap::new(),
                promoted: std::collections::HashMap::new(),
            },
            slots,
            sockets: Sockets { listeners, round_robin, control: Some(control) },
            machines: Machines {
                stop: StopSequence::default(),
                reload: Reload::default(),
                agent_reload: AgentReload::default(),
                memory: MemoryLimits::default(),
                scale: Scale::new(desired),
                standby: crate::standby::Standby::new(standby),
            },
            timers: TimerQueue::default(),
            router: Router::default(),
            endpoint,
            inbound: Inbound { input_tx, input, local, control_tx, control: control_rx, ops_tx, ops },
            outbound: Outbound {
                events,
                first_events: Some(first_events),
                stats: Arc::new(ControlStats::with_logs(logs)),
            },
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
            messenger: Messenger::new(Arc::clone(&self.endpoint)),
            stats: Arc::clone(&self.outbound.stats),
        };
        #[cfg(feature = "metrics")]
        let metrics_addr = match self.setup.config.metrics {
            Some(addr) => {
                let limits = crate::metrics_endpoint::Limits::from_config(&self.setup.config);
                let round_robin = self.sockets.round_robin.as_ref().map(RoundRobin::stats);
                let (tasks, cancel) = (&self.lifetime.tasks, self.lifetime.cancel.clone());
                Some(crate::metrics::serve(addr, limits, handle.clone(), round_robin, tasks, cancel).await?)
            }
            None => None,
        };
        #[cfg(not(feature = "metrics"))]
        let metrics_addr = None;
        crate::reaper::spawn_if_init(&self.lifetime.tasks, self.lifetime.cancel.clone());
        if let Some(notifier) = crate::systemd::Notifier::from_env() {
            let events = self.outbound.events.subscribe();
            crate::systemd::spawn(notifier, events, handle.clone(), &self.lifetime.tasks, self.lifetime.cancel.clone());
        }
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
        while !self.machines.stop.is_done() {
            tokio::select! {
                Some(input) = self.inbound.input.recv() => {
                    self.on_input(input);
                    // What else the readers queued meanwhile, before the other
                    // branches are polled again: a relay burst costs one pass
                    // over the signals and timers, not one per frame.
                    for _ in 0..INPUT_BURST {
                        if self.machines.stop.is_done() {
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
                    ControlCall::RestartAgent { reply } => {
                        self.outbound.stats.count_restart(ProcessRole::Agent);
                        self.request_agent_reload(reply)
                    }
                    ControlCall::RestartWorker { id, reply } => {
                        self.outbound.stats.count_restart(ProcessRole::Worker);
                        self.request_restart(id, reply)
                    }
                    ControlCall::Scale { to, reply } => self.request_scale(to, reply),
                },
                timer = self.timers.next() => self.on_timer(timer),
                _ = self.lifetime.shutdown_requested.cancelled(), if !self.machines.stop.is_stopping() => self.begin_stop(),
            }
        }
        if self.setup.config.status_at_exit {
            self.print_status();
        }
        tracing::debug!("all children exited; master exiting");
        self.endpoint.inbox.close();
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
        let events = self.outbound.first_events.take().map(ClusterEvents::new);
        let ctx = MasterContext::new(
            self.setup.pid,
            self.setup.dir.path().to_owned(),
            self.setup.token.clone(),
            Messenger::new(Arc::clone(&self.endpoint)),
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
                // A panic ends the cluster as an error does (it would otherwise
                // end only this task, and a cluster the master function was to
                // stop would run on with nobody to stop it).
                let outcome = std::panic::AssertUnwindSafe(hook(ctx)).catch_unwind().await;
                let error: BoxError = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".to_owned());
                        format!("the master function panicked: {what}").into()
                    }
                };
                tracing::error!(error = %error, "the master function failed; shutting down");
                let _ = input.send(Input::HookFailed(error)).await;
            }
            .in_current_span(),
        );
    }

    // ---- events and timers -------------------------------------------------

    /// Sends an event to the master function's stream and logs it, the one
    /// log line of that event (no other line of the cluster repeats it): at
    /// the level [`ClusterEvent`] documents, with target
    /// [`LOG_TARGET`](crate::events::LOG_TARGET) and the event's `Display` as
    /// the message.
    fn emit(&self, event: ClusterEvent) {
        use crate::events::LOG_TARGET;
        let replacing = self.machines.reload.running().is_some()
            || self.machines.agent_reload.is_running()
            || self.machines.scale.is_running();
        match &event {
            ClusterEvent::Spawned { .. } | ClusterEvent::AgentReady { .. } | ClusterEvent::WorkerReady { .. } => {
                tracing::debug!(target: LOG_TARGET, "{event}")
            }
            // Expected: the stop or the replacement asked for it.
            ClusterEvent::Exited { .. } if self.machines.stop.is_stopping() || replacing => {
                tracing::debug!(target: LOG_TARGET, "{event}")
            }
            ClusterEvent::StartFailed { .. } | ClusterEvent::SlotFailed { .. } | ClusterEvent::Hung { .. } => {
                tracing::error!(target: LOG_TARGET, "{event}")
            }
            ClusterEvent::Exited { .. }
            | ClusterEvent::RestartScheduled { .. }
            | ClusterEvent::MemoryLimit { .. }
            | ClusterEvent::ReloadFailed { .. }
            | ClusterEvent::ScaleFailed { .. } => tracing::warn!(target: LOG_TARGET, "{event}"),
            _ => tracing::info!(target: LOG_TARGET, "{event}"),
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

    // ---- the loop's inputs -------------------------------------------------

    fn on_input(&mut self, input: Input) {
        let input = self.promoted_key(input);
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
                if !self.machines.stop.is_stopping() {
                    self.begin_stop();
                }
            }
        }
    }

    fn on_child_message(&mut self, key: ProcKey, msg: FromChild) {
        let Some(proc) = self.slots.proc_mut(key) else {
            return; // from a process already reaped
        };
        proc.joined = true;
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
                let origin = Origin::Master { pid: self.setup.pid };
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
        let peers = Peers { slots: &self.slots, stopping: self.machines.stop.is_stopping() };
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
                self.endpoint.deliver(topic, from, payload, request)
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
    // `cluster` is the name `tandem ls` shows: known once the control socket is bound.
    let span = tracing::info_span!("tandem", role = "master", pid, cluster = tracing::field::Empty);
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
        tracing::Span::current().record("cluster", tracing::field::display(&master.setup.control_name));
        let result = master.serve(hook).await;
        let tasks = master.lifetime.tasks.clone();
        let logs = master.setup.program.logs.clone();
        drop(master);
        Master::drain(tasks).await;
        if let Some(logs) = logs {
            logs.finish().await;
        }
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
