//! Starting a child: the same executable, re-run with a role marker in its
//! environment and one end of a fresh socketpair as its IPC channel.
//!
//! Both ends of the socketpair are created close-on-exec, so no other child
//! inherits them (each child's EOF then really means "the master is gone");
//! only the child's own end has the flag cleared, in the forked child, just
//! before `exec`.
//!
//! A child's stdout and stderr are the master's own, unless the cluster has a
//! log directory: then they are pipes the master reads into the child's log
//! file ([`logs`](crate::logs)).

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::Stdio;

use tandem_protocol::unix::{UnixReadHalf, UnixWriteHalf};
use tokio::process::{Child, Command};

use crate::{ProcessRole, WorkerId};

/// The environment variables a child reads (never secrets: the token travels over IPC).
pub(crate) const ENV_ROLE: &str = "TANDEM_ROLE";
pub(crate) const ENV_WORKER_ID: &str = "TANDEM_WORKER_ID";
pub(crate) const ENV_IPC_FD: &str = "TANDEM_IPC_FD";
pub(crate) const ENV_MASTER_PID: &str = "TANDEM_MASTER_PID";
pub(crate) const ENV_CLUSTER: &str = "TANDEM_CLUSTER";
/// The cluster's name as `tandem ls` shows it (`--name`, or the name taken
/// by default), for the children's log lines.
pub(crate) const ENV_NAME: &str = "TANDEM_NAME";
/// The child's end of its descriptor channel ([`fdpass`](crate::fdpass)).
pub(crate) const ENV_FD_CHANNEL: &str = "TANDEM_FD_CHANNEL";
/// The IPC version the master speaks; a child built with another refuses to start.
pub(crate) const ENV_IPC_VERSION: &str = "TANDEM_IPC_VERSION";

/// The version of the master/child protocol (IPC messages and the descriptor
/// channel). Bump it on any incompatible change: a reload onto an executable
/// with another version is refused (its workers exit with
/// [`IPC_MISMATCH_EXIT`] before joining, and the reload is rolled back).
/// 3: `Ping`/`Pong` (the master's hang detection).
/// 4: the hot standby (`Init::standby`, `Ready::Standby`, `Promote`).
pub(crate) const IPC_VERSION: u32 = 4;

/// The exit code of a child whose IPC version differs from its master's.
pub(crate) const IPC_MISMATCH_EXIT: i32 = 111;

/// The path children are started from: the executable's path as the master
/// was started with it (argv[0] made absolute, symlinks kept), so a deploy
/// that replaces the file or flips a symlink is picked up by the next spawn
/// (a reload); `current_exe()` (symlinks resolved) when argv[0] has no `/`
/// (found through PATH) or no longer names a file.
pub(crate) fn program_path() -> io::Result<std::path::PathBuf> {
    if let Some(argv0) = std::env::args_os().next().map(std::path::PathBuf::from)
        && argv0.as_os_str().as_encoded_bytes().contains(&b'/')
    {
        let path = if argv0.is_absolute() { argv0 } else { std::env::current_dir()?.join(argv0) };
        if path.is_file() {
            return Ok(path);
        }
    }
    std::env::current_exe()
}

/// A spawned child and the master's end of its IPC channel.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub child: Child,
    pub pid: u32,
    /// The master's end of the IPC channel, in halves (see `tandem_protocol::unix`).
    pub stream: (UnixReadHalf, UnixWriteHalf),
    /// The master's end of the child's descriptor channel.
    pub fd_channel: std::os::fd::OwnedFd,
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    pub exe: std::path::PathBuf,
    pub args: Vec<OsString>,
    pub cluster: String,
    /// The name the control socket serves (`tandem ls`), carried by every log line.
    pub name: String,
    pub master_pid: u32,
    /// Set in every child ([`Config::child_env`](crate::Config::child_env)).
    pub env: Vec<(String, String)>,
    /// Where the children's stdout and stderr go ([`Config::log_dir`](crate::Config::log_dir)):
    /// `None` leaves them the master's own.
    pub logs: Option<crate::logs::Logs>,
}

impl Program {
    pub(crate) fn spawn(&self, role: ProcessRole, worker_id: Option<WorkerId>) -> io::Result<Spawned> {
        spawn(self, role, worker_id)
    }
}

fn spawn(program: &Program, role: ProcessRole, worker_id: Option<WorkerId>) -> io::Result<Spawned> {
    let Program { exe, args, cluster, name, master_pid, env, logs } = program;
    let master_pid = *master_pid;
    // std creates both ends with SOCK_CLOEXEC.
    let (master_end, child_end) = StdUnixStream::pair()?;
    let child_fd = child_end.as_raw_fd();
    let (fd_master, fd_child) = crate::fdpass::pair()?;
    let fd_child_raw = fd_child.as_raw_fd();

    let mut cmd = Command::new(exe);
    // systemd's variables are the master's: its children are not the service's
    // main process and hold none of the passed sockets.
    for key in crate::systemd::ENV {
        cmd.env_remove(key);
    }
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(ENV_ROLE, role.as_str())
        .env(ENV_IPC_FD, child_fd.to_string())
        .env(ENV_MASTER_PID, master_pid.to_string())
        .env(ENV_CLUSTER, cluster)
        .env(ENV_NAME, name)
        .env(ENV_FD_CHANNEL, fd_child_raw.to_string())
        .env(ENV_IPC_VERSION, IPC_VERSION.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    if logs.is_some() {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    match worker_id {
        Some(id) => cmd.env(ENV_WORKER_ID, id.to_string()),
        None => cmd.env_remove(ENV_WORKER_ID),
    };
    let parent = libc::pid_t::try_from(master_pid).map_err(io::Error::other)?;
    // SAFETY: the closure runs in the forked child between fork and exec, where
    // only async-signal-safe functions may be called. It calls only fcntl, prctl
    // and getppid (plain syscalls), allocates nothing and touches no lock.
    // `child_fd` and `fd_child_raw` stay open in the master until after `spawn`
    // returns, so the child's copies of them are valid here.
    unsafe {
        cmd.pre_exec(move || {
            // Let the child's end (and only it) survive exec.
            if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::fcntl(fd_child_raw, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // Die with the master. Linux ties this to the thread that forked us:
            // the master spawns from its runtime's long-lived threads.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The master may have died before prctl: then we were re-parented.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    if let Some(logs) = logs {
        logs.capture(&crate::logs::stem(role, worker_id), child.stdout.take(), child.stderr.take());
    }
    drop(child_end);
    drop(fd_child);
    let pid = child.id().ok_or_else(|| io::Error::other("the child exited before its pid could be read"))?;
    let stream = tandem_protocol::unix::split_std(master_end)?;
    Ok(Spawned { child, pid, stream, fd_channel: fd_master })
}
