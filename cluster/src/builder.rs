//! The entry point: `Cluster::builder(name)...run()`, called from the user's
//! `main` in every process. The master re-runs the same executable for the
//! agent and the workers; there `run` finds its role in the environment and
//! runs the matching start function instead of the master.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;

use crate::app::{AgentFn, MasterFn, WorkerFn};
use crate::child::{self, ChildEnv};
use crate::{
    AgentContext, AgentReady, BoxError, Config, Error, ListenAddr, ListenerSpec, MasterContext, ProcessRole,
    RestartPolicy, ShareMode, WorkerContext,
};

/// A master/agent/worker cluster.
#[derive(Debug)]
pub struct Cluster;

impl Cluster {
    /// Starts describing a cluster. `name` must be the same in every process.
    ///
    /// The same `main` runs as the master, the agent and every worker:
    /// [`run_blocking`](Builder::run_blocking) runs this process's part.
    ///
    /// ```no_run
    /// use tandem_cluster::{AgentReady, BoxError, Cluster};
    ///
    /// fn main() -> Result<(), BoxError> {
    ///     tandem_cluster::init_tracing();
    ///     Cluster::builder("myapp")
    ///         .workers(2)
    ///         .listen("http", "127.0.0.1:8080")?
    ///         .agent(|ctx| async move {
    ///             // Start the Leader here (`tandem::cluster_glue::start_leader`).
    ///             ctx.ready(AgentReady { socket: ctx.default_socket_path() }).await?;
    ///             ctx.stopped().await;
    ///             Ok(())
    ///         })
    ///         .worker(|ctx| async move {
    ///             let listener = ctx.tcp_listener("http")?; // bound once by the master
    ///             ctx.ready().await?;
    ///             loop {
    ///                 tokio::select! {
    ///                     accepted = listener.accept() => drop(accepted?),
    ///                     _ = ctx.stopped() => return Ok(()),
    ///                 }
    ///             }
    ///         })
    ///         .run_blocking()?;
    ///     Ok(())
    /// }
    /// ```
    pub fn builder(name: impl Into<String>) -> Builder {
        Builder { name: name.into(), config: Config::default(), agent: None, worker: None, master: None }
    }
}

/// Describes a cluster; [`run`](Self::run) starts it (or, in a child, runs the child's part).
pub struct Builder {
    name: String,
    config: Config,
    agent: Option<AgentFn>,
    worker: Option<WorkerFn>,
    master: Option<MasterFn>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("agent", &self.agent.is_some())
            .field("worker", &self.worker.is_some())
            .field("master", &self.master.is_some())
            .finish()
    }
}

impl Builder {
    /// Sets an environment variable in every child the master starts (see
    /// [`Config::child_env`]).
    pub fn child_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.child_env.push((key.into(), value.into()));
        self
    }

    /// The number of workers. The default is the number of CPUs this process
    /// may use (see [`Config::workers`]).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = Some(n);
        self
    }

    /// The cluster's name for operators (`tandem status NAME`); the default is
    /// the executable's file name. See [`Config::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Serve `/metrics` on this address (port 0: any free port). See [`Config::metrics`].
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.metrics = Some(addr);
        self
    }

    /// The most connections `/metrics` serves at once (one more is refused
    /// with a `503` and counted). See [`Config::metrics_max_connections`].
    #[cfg(feature = "metrics")]
    pub fn metrics_max_connections(mut self, n: usize) -> Self {
        self.config.metrics_max_connections = Some(n);
        self
    }

    /// How long a `/metrics` connection has to send a complete request head,
    /// and how long it may move no byte at all, before it is closed. See
    /// [`Config::metrics_header_timeout`] and [`Config::metrics_idle_timeout`].
    #[cfg(feature = "metrics")]
    pub fn metrics_timeouts(mut self, header: Duration, idle: Duration) -> Self {
        self.config.metrics_header_timeout = header;
        self.config.metrics_idle_timeout = idle;
        self
    }

    /// All settings at once.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// How long the agent and each worker may take to report ready.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.config.agent_start_timeout = timeout;
        self.config.worker_start_timeout = timeout;
        self
    }

    /// How long workers, then the agent, may take to stop before being killed.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.config.worker_stop_timeout = timeout;
        self.config.agent_stop_timeout = timeout;
        self
    }

    /// Declares a listener named `name` on `addr` (`host:port`, port 0 for any
    /// free port; `unix:PATH` or an absolute path for a Unix socket), shared
    /// the default way: `reuseport` for TCP on Linux, `shared` otherwise. The
    /// master binds it before any child starts (a bind error fails
    /// [`run`](Self::run)); workers take it with
    /// [`WorkerContext::listener`](crate::WorkerContext::listener).
    pub fn listen(self, name: impl Into<String>, addr: &str) -> Result<Self, Error> {
        let addr = ListenAddr::parse(addr)?;
        let mode = ShareMode::default_for(&addr);
        Ok(self.listen_with(name, addr, mode))
    }

    /// Declares a listener with an explicit sharing mode.
    pub fn listen_with(mut self, name: impl Into<String>, addr: ListenAddr, mode: ShareMode) -> Self {
        self.config.listeners.push(ListenerSpec { name: name.into(), addr, mode });
        self
    }

    /// The memory limit (RSS, bytes) of each worker: above it a worker is
    /// replaced gracefully (see [`Config::worker_max_memory`]).
    pub fn worker_max_memory(mut self, bytes: u64) -> Self {
        self.config.worker_max_memory = Some(bytes);
        self
    }

    /// The memory limit (RSS, bytes) of the agent (see [`Config::agent_max_memory`]).
    pub fn agent_max_memory(mut self, bytes: u64) -> Self {
        self.config.agent_max_memory = Some(bytes);
        self
    }

    /// Keeps a hot standby next to the agent, promoted at the next epoch when
    /// the agent dies (see [`Config::standby`]). The default is off.
    pub fn standby(mut self, on: bool) -> Self {
        self.config.standby = on;
        self
    }

    /// How many worker slots a reload replaces at once (at least 1; the default is 1).
    pub fn reload_parallelism(mut self, n: usize) -> Self {
        self.config.reload_parallelism = n.max(1);
        self
    }

    /// Captures the children's stdout and stderr into files under
    /// `dir/<name>/` (`agent.log`, `worker-<K>.log`), rotated at
    /// [`Config::log_file_size`] and kept within [`Config::log_quota`] in
    /// total. See [`Config::log_dir`].
    pub fn log_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.log_dir = Some(dir.into());
        self
    }

    /// The log files' rotation size and total quota, in bytes (see
    /// [`Config::log_file_size`] and [`Config::log_quota`]).
    pub fn log_limits(mut self, file_size: u64, quota: u64) -> Self {
        self.config.log_file_size = file_size;
        self.config.log_quota = quota;
        self
    }

    /// How dead processes are restarted.
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.config.restart = policy;
        self
    }

    /// The agent's start function: start the Leader, `ctx.ready(..)`, serve
    /// until `ctx.stopped()`, return. Without one, the agent reports ready at
    /// once with [`AgentContext::default_socket_path`] and waits to be stopped.
    pub fn agent<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(AgentContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.agent = Some(Box::new(move |ctx| f(ctx).boxed()));
        self
    }

    /// The workers' start function: connect the Follower, `ctx.ready()`, work
    /// until `ctx.stopped()`, return. Without one, workers report ready at once
    /// and wait to be stopped.
    pub fn worker<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(WorkerContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.worker = Some(Box::new(move |ctx| f(ctx).boxed()));
        self
    }

    /// Code run in the master alongside supervision, from before the agent
    /// starts until shutdown: read [`MasterContext::events`], use the messenger.
    /// Returning `Ok` does not stop the cluster; returning `Err` does.
    pub fn master<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(MasterContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.master = Some(Box::new(move |ctx| f(ctx).boxed()));
        self
    }

    /// Runs this process's part, inside a tokio runtime.
    ///
    /// In the master: starts the cluster and returns after a graceful shutdown
    /// (SIGTERM, SIGINT, [`MasterContext::shutdown`]) with `Ok(())`. In the
    /// agent and the workers: runs the start function and **exits the process**
    /// (code 0 when it returned `Ok`); it does not return.
    pub async fn run(self) -> Result<(), Error> {
        let Builder { name, config, agent, worker, master } = self;
        if let Some(version) = std::env::var_os(crate::spawn::ENV_IPC_VERSION)
            && version.to_str() != Some(crate::spawn::IPC_VERSION.to_string().as_str())
        {
            // Started by a master of another build (a reload onto an incompatible
            // executable): refuse before reading anything from it.
            eprintln!(
                "tandem: this executable speaks IPC version {} but its master speaks {version:?}; \
                 refusing to join (restart the whole cluster to change versions)",
                crate::spawn::IPC_VERSION
            );
            std::process::exit(crate::spawn::IPC_MISMATCH_EXIT);
        }
        match ChildEnv::from_env()? {
            // The master's loop runs as a task of its own, not as the future
            // the caller's `block_on` polls: a `block_on` future that is woken
            // makes a current-thread runtime check the driver once more before
            // it sleeps, an extra `epoll_wait` per relayed frame.
            None => match tokio::spawn(async move {
                config.validate()?;
                crate::master::run(name, config, master).await
            })
            .await
            {
                Ok(result) => result,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                // Cancelled: the runtime itself is shutting down.
                Err(_) => Err(Error::ShuttingDown),
            },
            Some(env) => {
                if env.cluster != name {
                    return Err(Error::child_setup(
                        format!("it belongs to cluster {:?}, not {name:?}", env.cluster),
                        None,
                    ));
                }
                let agent = agent.unwrap_or_else(|| Box::new(|ctx| default_agent(ctx).boxed()));
                let worker = worker.unwrap_or_else(|| Box::new(|ctx| default_worker(ctx).boxed()));
                let code = child::run(env, agent, worker).await;
                let _ = std::io::Write::flush(&mut std::io::stdout());
                std::process::exit(code)
            }
        }
    }

    /// [`run`](Self::run) on a new tokio runtime, for a plain `fn main`: the
    /// master on one thread, the agent multi-threaded, and each worker on the
    /// CPUs this process may use ([`default_workers`](crate::default_workers))
    /// divided by the workers at start, rounded down, at least 1 thread; one
    /// thread is a current-thread runtime (so with the default worker count,
    /// one per CPU, every worker runs on one thread, like a Node worker).
    ///
    /// The workers share the CPUs: with one worker per CPU (the default
    /// count), a multi-thread runtime in each would put CPUs × CPUs threads on
    /// CPUs cores, whose work stealing and wake-ups cost CPU per request (2
    /// workers on 2 cores, `bench/http.sh`: a current-thread runtime per worker
    /// served about 1.1× the keep-alive requests per CPU-second of a 2-thread
    /// one, and 1.5–1.9× the `Connection: close` ones). Mind that
    /// `tokio::task::block_in_place` panics on a current-thread runtime
    /// (`spawn_blocking` works): a worker that needs it, or more threads, runs
    /// [`run`](Self::run) from its own runtime.
    ///
    /// The master relays every messenger frame, and a relay is latency-bound:
    /// on one thread its reader, router and writer hand frames to each other
    /// without waking another thread (measured on 2 cores: the messenger's
    /// ping-pong p50 about halves, its pipelined calls/s rise by a fifth).
    /// Call [`run`](Self::run) from your own runtime to choose otherwise.
    pub fn run_blocking(self) -> Result<(), Error> {
        let runtime = match ProcessRole::of_this_process() {
            ProcessRole::Master => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            ProcessRole::Worker => match worker_threads(self.config.worker_count()) {
                1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
                n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
            },
            ProcessRole::Agent | ProcessRole::Standby => {
                tokio::runtime::Builder::new_multi_thread().enable_all().build()
            }
        };
        runtime.map_err(Error::Runtime)?.block_on(self.run())
    }
}

/// The runtime threads of each worker that [`Builder::run_blocking`] starts,
/// for `workers` workers: the CPUs this process may use divided by `workers`,
/// rounded down, at least 1.
fn worker_threads(workers: usize) -> usize {
    (crate::config::default_workers() / workers.max(1)).max(1)
}

async fn default_agent(ctx: AgentContext) -> Result<(), BoxError> {
    if ctx.is_standby() {
        // No Leader to mirror: ready to take the (empty) place at once.
        ctx.standby_ready(0).await?;
        ctx.promoted().await?;
    }
    ctx.ready(AgentReady { socket: ctx.default_socket_path() }).await?;
    ctx.stopped().await;
    Ok(())
}

async fn default_worker(ctx: WorkerContext) -> Result<(), BoxError> {
    ctx.ready().await?;
    ctx.stopped().await;
    Ok(())
}

#[cfg(test)]
mod runtime_tests {
    use super::worker_threads;

    #[test]
    fn workers_share_the_cpus() {
        let cpus = crate::default_workers();
        assert_eq!(worker_threads(1), cpus, "one worker gets every CPU");
        assert_eq!(worker_threads(cpus), 1, "one worker per CPU: one thread each");
        assert_eq!(worker_threads(cpus * 4), 1, "more workers than CPUs: still one thread");
        assert_eq!(worker_threads(0), cpus, "0 workers (refused at start) does not divide by zero");
        if cpus >= 2 {
            assert_eq!(worker_threads(2), cpus / 2);
        }
    }
}
