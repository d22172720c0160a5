//! The one error type of this crate, worded from the caller's point of view.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tandem_protocol::RemoteError;

use crate::WorkerId;

/// A boxed error, as returned by the user's agent, worker and master functions.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The master could not create its private runtime directory.
    #[error("could not create the cluster's runtime directory under {base}")]
    RuntimeDir {
        /// The directory it tried to create it in.
        base: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another live cluster of this user already has this name.
    #[error(
        "a cluster named {name:?} is already running (master pid {pid}); stop it with `tandem stop {name}` or choose another name"
    )]
    NameInUse {
        /// The name.
        name: String,
        /// The running master's pid (0 when it could not be read).
        pid: u32,
    },
    /// The cluster name cannot be used as a directory name.
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A [`Config::child_env`](crate::Config::child_env) key that cannot be set in a child.
    #[error("invalid child_env key {key:?}: {reason}")]
    InvalidChildEnv {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The control socket or the metrics endpoint could not be set up.
    #[error("could not set up the {what} at {path}")]
    Control {
        /// `control socket` or `metrics endpoint`.
        what: &'static str,
        /// The socket path or address.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The master could not generate the cluster's random token.
    #[error("could not generate the cluster token")]
    Token(#[source] io::Error),
    /// The master could not start a child process (the first agent start only:
    /// later failures are reported as events and retried).
    #[error("could not start the {what}")]
    Spawn {
        /// Which process (`agent`, `worker 3`).
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The async runtime could not be started (`run_blocking`).
    #[error("could not start the async runtime")]
    Runtime(#[source] io::Error),
    /// The master could not install its signal handlers.
    #[error("could not install the signal handlers")]
    Signals(#[source] io::Error),
    /// This process was started as a cluster child but could not join its master.
    #[error("this process was started as a cluster child, but {problem}")]
    ChildSetup {
        /// What went wrong.
        problem: String,
        /// The cause, when there is one.
        #[source]
        source: Option<io::Error>,
    },
    /// The user's master function returned an error; the cluster was shut down.
    #[error("the master function failed")]
    MasterFailed(#[source] BoxError),
    /// The target process exists but cannot receive messages now (starting,
    /// restarting, failed or stopped).
    #[error("{target} is not running ({state})")]
    NotRunning {
        /// The target (`agent`, `worker 3`).
        target: String,
        /// Its state (`starting`, `backing off`, `failed`, ...).
        state: String,
    },
    /// There is no worker with this id.
    #[error("there is no worker {id} (the cluster has workers 1 to {workers})")]
    NoSuchWorker {
        /// The id asked for.
        id: WorkerId,
        /// How many workers the cluster has.
        workers: u32,
    },
    /// The target's bounded queue in the master is full; the message was not sent.
    #[error("the queue towards {target} is full")]
    QueueFull {
        /// The target.
        target: String,
    },
    /// No worker (other than the sender) is ready to receive a message.
    #[error("no worker is ready to receive the message")]
    NoReadyWorker,
    /// A request got no reply within its deadline.
    #[error("{target} sent no reply within {deadline:?}")]
    DeadlineExceeded {
        /// The target of the request.
        target: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The target of a request exited before replying.
    #[error("{target} exited before replying")]
    TargetExited {
        /// The target of the request.
        target: String,
    },
    /// The target has no subscriber for the request's topic, or dropped the
    /// request without replying.
    #[error("{target} has no handler for topic {topic:?}")]
    NoHandler {
        /// The target.
        target: String,
        /// The topic.
        topic: String,
    },
    /// The target's handler replied with an error.
    #[error("the handler replied with an error")]
    Remote(#[source] RemoteError),
    /// The agent is not ready (needed to open a link).
    #[error("the agent is not available ({state})")]
    AgentUnavailable {
        /// The agent's state.
        state: String,
    },
    /// The operation is only available in a worker.
    #[error("{what} is only available in a worker")]
    NotAWorker {
        /// The operation.
        what: &'static str,
    },
    /// A request needs exactly one target.
    #[error("a request needs a single target, not {target}")]
    InvalidTarget {
        /// The target given.
        target: String,
    },
    /// The master process is gone (this child is about to exit).
    #[error("the master is gone")]
    MasterGone,
    /// The cluster is shutting down and no longer accepts this operation.
    #[error("the cluster is shutting down")]
    ShuttingDown,
    /// This agent was the hot standby and was asked to stop before it was
    /// promoted: it never led. The agent's start function may return it
    /// (`?`); the process then exits with code 0, as after a normal stop.
    #[error("the standby was stopped before it was promoted")]
    StandbyStopped,
    /// A hot standby reported the agent ready before the master promoted it:
    /// refused, so that it never serves beside the agent (wait for
    /// [`AgentContext::promoted`](crate::AgentContext::promoted) first).
    #[error("the standby reported ready before it was promoted")]
    StandbyNotPromoted,
    /// A payload is larger than the IPC channel carries.
    #[error("a payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A payload could not be encoded as MessagePack.
    #[error("could not encode the payload")]
    Encode(#[source] RemoteError),
    /// A payload could not be decoded from MessagePack into the asked type.
    #[error("could not decode the payload")]
    Decode(#[source] RemoteError),
    /// A listener address or sharing mode could not be parsed.
    #[error("bad listener address {addr:?}: {problem}")]
    BadListenAddr {
        /// What was given.
        addr: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The master could not bind a declared listener (start-up fails).
    #[error("could not listen on {addr} for listener {name:?}")]
    Listen {
        /// The listener's name.
        name: String,
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The sockets passed by systemd's socket activation (`LISTEN_FDS`,
    /// `LISTEN_FDNAMES`) cannot be used (start-up fails).
    #[error("socket activation: {0}")]
    SocketActivation(String),
    /// The worker asked for a listener the cluster does not declare.
    #[error("no listener named {name:?} (declared: {declared:?})")]
    NoSuchListener {
        /// The name asked for.
        name: String,
        /// The names declared.
        declared: Vec<String>,
    },
    /// The listener is not of the kind asked for.
    #[error("listener {name:?} is not a {expected} listener")]
    WrongListenerKind {
        /// The name.
        name: String,
        /// The kind asked for.
        expected: &'static str,
    },
    /// The worker already took this listener.
    #[error("listener {name:?} was already taken by this worker")]
    ListenerTaken {
        /// The name.
        name: String,
    },
    /// More workers asked for at start than the cluster runs
    /// ([`MAX_WORKERS`](crate::MAX_WORKERS)); nothing was started.
    #[error("{asked} workers asked for; a cluster runs at most {max}")]
    TooManyWorkers {
        /// The count asked for.
        asked: usize,
        /// The limit.
        max: u32,
    },
    /// The log directory ([`Config::log_dir`](crate::Config::log_dir)) could
    /// not be created or is not ours (another user's, or writable by group or
    /// others); nothing was started.
    #[error("cannot keep the logs in {path}")]
    LogDir {
        /// The directory refused.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The log limits ([`Config::log_file_size`](crate::Config::log_file_size),
    /// [`Config::log_quota`](crate::Config::log_quota)) are out of range.
    #[error("invalid log limits: {problem}")]
    InvalidLogLimits {
        /// What is wrong, with the values.
        problem: String,
    },
}

impl Error {
    /// Whether trying the same operation again later may succeed (the target
    /// may be back, the queue drained, the agent restarted).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotRunning { .. }
                | Error::QueueFull { .. }
                | Error::NoReadyWorker
                | Error::DeadlineExceeded { .. }
                | Error::TargetExited { .. }
                | Error::AgentUnavailable { .. }
        )
    }

    /// Whether the error is a request deadline expiry.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::DeadlineExceeded { .. })
    }

    pub(crate) fn child_setup(problem: impl Into<String>, source: Option<io::Error>) -> Self {
        Error::ChildSetup { problem: problem.into(), source }
    }
}
