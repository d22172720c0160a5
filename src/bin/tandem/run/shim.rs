//! A `tandem run` worker: a normal tandem worker (the master's IPC, ready,
//! stop, reload, memory limit and status all apply to it unchanged) that
//! runs the user's program as its child and stands for it.
//!
//! ```text
//! shim (tandem worker k)                          program
//!   take the listeners, bind NOTIFY_SOCKET and TANDEM_NOTIFY_STREAM
//!   fork ── fds 3.. = listeners, own process group, dies with the shim
//!        └─ exec `tandem run --exec-with-listen-pid -- PROGRAM ARGS`
//!              LISTEN_PID=<its pid>; exec PROGRAM ────> runs, serves fd 3
//!   <──────────────────── READY=1 (datagram, or a line) ───┘
//!   ready to the master (or after `ready = DELAY`)
//!   stop (reload, scale down, shutdown) ── SIGTERM to its group ──> drains, exits
//!   stop timeout over ───────────────────── SIGKILL to its group
//!   the program exited: the shim exits with its code (or its signal)
//! ```
//!
//! The program is its own process group, so a terminal's Ctrl-C reaches it
//! only through the master's orderly stop; it gets `PR_SET_PDEATHSIG` (SIGKILL)
//! so it never outlives its shim.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tandem::cluster::{BoxError, Listener, WorkerContext};

use super::notify::Notifications;
use super::settings::{Ready, Spec};

/// How long into the wait for `READY=1` the shim says, once, that it is still waiting.
const WAITING_HINT_AFTER: Duration = Duration::from_secs(5);

/// The topic on which a shim tells the master how its program ended before
/// it was ready ([`ProgramExit`]). Sending it (over the worker's own IPC
/// channel) also shows that this worker joined the cluster: the master then
/// reads the shim's exit code as the program's, never as a refusal of the IPC
/// version (which has the code 111, a code any program can also return).
pub const PROGRAM_EXITED_TOPIC: &str = "tandem.run.program-exited";

/// How long the shim waits for the master to take its [`ProgramExit`].
const TELL_MASTER_WITHIN: Duration = Duration::from_secs(1);

/// A program's end before it was ready, as its shim tells the master.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProgramExit {
    pub worker: u32,
    /// `code 111`, `signal 9 (SIGKILL)`.
    pub exit: String,
}

/// The exit code of a shim whose program did not report ready in time.
const NOT_READY_EXIT: i32 = 3;

/// A deadline that does not come (an unarmed timer).
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The cluster's own variables and `tandem run`'s, which the program must not inherit.
const REMOVED_ENV: &[&str] = &[
    "TANDEM_ROLE",
    "TANDEM_IPC_FD",
    "TANDEM_MASTER_PID",
    "TANDEM_CLUSTER",
    "TANDEM_NAME",
    "TANDEM_FD_CHANNEL",
    "TANDEM_IPC_VERSION",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "TANDEM_NOTIFY_STREAM",
    super::SPEC_ENV,
];

/// The worker's start function: runs the program until it exits, then
/// exits this process the same way.
pub async fn run(ctx: WorkerContext, spec: Arc<Spec>) -> Result<(), BoxError> {
    let id = ctx.id();
    let mut names = Vec::new();
    let mut sockets = Vec::new();
    for l in &spec.listeners {
        let fd: OwnedFd = match ctx.listener(&l.name)? {
            Listener::Tcp(listener) => listener.into_std()?.into(),
            Listener::Unix(listener) => listener.into_std()?.into(),
            other => return Err(format!("listener {}: {other:?} cannot be handed to a program", l.name).into()),
        };
        names.push(l.name.clone());
        sockets.push(fd);
    }
    // Above the fds the program gets (3..3+n), so that placing one never
    // overwrites another; close-on-exec, so only the placed copies survive.
    let first_free = 3 + RawFd::try_from(sockets.len())?;
    let sockets = sockets.iter().map(|fd| dup_above(fd, first_free)).collect::<std::io::Result<Vec<OwnedFd>>>()?;

    let mut notify = Notifications::bind(ctx.runtime_dir(), &format!("{id}-{}", std::process::id()))?;

    let mut command = tokio::process::Command::new("/proc/self/exe");
    command.args(["run", "--exec-with-listen-pid", "--"]).args(&spec.command);
    for key in REMOVED_ENV {
        command.env_remove(key);
    }
    command
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("TANDEM_WORKER_ID", id.to_string())
        .env("TANDEM_LEADER_SOCKET", ctx.agent_socket())
        .env("TANDEM_TOKEN", ctx.token())
        .env("NOTIFY_SOCKET", &notify.datagram_path)
        .env("TANDEM_NOTIFY_STREAM", &notify.stream_path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    if !sockets.is_empty() {
        command.env("LISTEN_FDS", sockets.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
    }
    if !spec.subscribe.is_empty() {
        command.env("TANDEM_SUBSCRIBE", spec.subscribe.join(","));
    }
    let raw: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
    let shim = libc::pid_t::try_from(std::process::id())?;
    // SAFETY: the closure runs in the forked child between fork and exec,
    // where only async-signal-safe calls are allowed: it calls only dup2,
    // setpgid, prctl and getppid (plain syscalls) and allocates nothing (`raw`
    // was built before the fork). The fds in `raw` are open in the shim
    // until after `spawn` returns (`sockets` lives until this function ends),
    // so the child's copies are valid.
    unsafe {
        command.pre_exec(move || {
            for (i, &fd) in raw.iter().enumerate() {
                // dup2 clears close-on-exec on the copy: it survives exec.
                if libc::dup2(fd, 3 + i as RawFd) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setpgid(0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The shim may have died before prctl: then we were re-parented.
            if libc::getppid() != shim {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| format!("cannot start `{}`: {e}", spec.command.join(" ")))?;
    let pid = child.id().ok_or("the program exited before its pid could be read")?;
    let group = libc::pid_t::try_from(pid)?;
    tracing::info!(worker.id = id, pid, "program started: {}", spec.command.join(" "));

    let mut ready = false;
    let mut stopping = false;
    let ready_deadline = tokio::time::sleep(spec.ready_timeout);
    let delay = tokio::time::sleep(match spec.ready {
        Ready::After(delay) => delay,
        Ready::Notify => spec.ready_timeout,
    });
    let hint = tokio::time::sleep(WAITING_HINT_AFTER);
    let kill_at = tokio::time::sleep(NEVER);
    tokio::pin!(ready_deadline, delay, hint, kill_at);
    let stop = ctx.stop_token();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            Some(line) = notify.next() => match line.as_str() {
                "READY=1" if !ready && !stopping => {
                    ctx.ready().await?;
                    ready = true;
                    tracing::info!(worker.id = id, pid, "program ready (READY=1)");
                }
                "STOPPING=1" => tracing::info!(worker.id = id, pid, "program stopping (STOPPING=1)"),
                other => tracing::debug!(worker.id = id, pid, notification = other, "program notification"),
            },
            () = &mut delay, if !ready && !stopping && matches!(spec.ready, Ready::After(_)) => {
                ctx.ready().await?;
                ready = true;
                tracing::info!(worker.id = id, pid, "program counted ready: running {:?} after its start", spec.ready_delay());
            }
            () = &mut hint, if !ready && !stopping && spec.ready == Ready::Notify => {
                tracing::warn!(
                    worker.id = id, pid,
                    "still waiting for READY=1 on NOTIFY_SOCKET after {WAITING_HINT_AFTER:?} (of {:?}); \
                     a program that does not send it needs `--ready DELAY` (e.g. --ready 2s)",
                    spec.ready_timeout
                );
            }
            () = &mut ready_deadline, if !ready && !stopping => {
                tracing::error!(
                    worker.id = id, pid,
                    "the program did not send READY=1 on NOTIFY_SOCKET within {:?}: killed. A program that does \
                     not speak sd_notify needs `--ready DELAY` (ready that long after its start)",
                    spec.ready_timeout
                );
                signal_group(group, libc::SIGKILL);
                let _ = child.wait().await;
                finish(&notify, NOT_READY_EXIT);
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                tracing::debug!(worker.id = id, pid, "stopping the program: SIGTERM");
                signal_group(group, libc::SIGTERM);
                kill_at.as_mut().reset(tokio::time::Instant::now() + spec.stop_timeout);
            }
            () = &mut kill_at, if stopping => {
                tracing::warn!(worker.id = id, pid, "the program did not exit within {:?} of SIGTERM: SIGKILL", spec.stop_timeout);
                signal_group(group, libc::SIGKILL);
                kill_at.as_mut().reset(tokio::time::Instant::now() + NEVER);
            }
        }
    };
    // What the program left behind in its group goes with it.
    signal_group(group, libc::SIGKILL);
    drop(sockets);
    if !ready && !stopping {
        let exit = match (status.code(), status.signal()) {
            (Some(code), _) => format!("code {code}"),
            (None, Some(signal)) => signal_text(signal),
            _ => status.to_string(),
        };
        let payload = tandem::cluster::encode(&ProgramExit { worker: id, exit })?;
        let told = ctx.messenger().send_to_master(PROGRAM_EXITED_TOPIC, payload);
        if let Err(error) = tokio::time::timeout(TELL_MASTER_WITHIN, told)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::debug!(worker.id = id, pid, %error, "could not tell the master how the program ended");
        }
    }
    match (status.code(), status.signal()) {
        (Some(0), _) if stopping => Ok(()),
        (Some(code), _) => {
            if !stopping {
                tracing::warn!(worker.id = id, pid, code, "the program exited");
            }
            finish(&notify, code)
        }
        (None, Some(signal)) => {
            if !stopping {
                tracing::warn!(worker.id = id, pid, signal, "the program was killed by a signal");
            }
            notify.remove();
            // The same end as the program's: the master's status shows the signal.
            // SAFETY: resetting a signal's disposition and raising it are plain
            // libc calls with no memory safety concern.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
                libc::raise(signal);
            }
            finish(&notify, 128 + signal)
        }
        _ => finish(&notify, 1),
    }
}

impl Spec {
    fn ready_delay(&self) -> Duration {
        match self.ready {
            Ready::After(delay) => delay,
            Ready::Notify => self.ready_timeout,
        }
    }
}

/// Exits this process with `code`, after removing the notification sockets.
fn finish(notify: &Notifications, code: i32) -> ! {
    notify.remove();
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code)
}

/// Sends `signal` to the program's process group (ESRCH, all gone, is fine).
fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-group, signal);
    }
}

/// A close-on-exec copy of `fd` numbered `min` or above.
fn dup_above(fd: &OwnedFd, min: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd we own returns a new fd or -1.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if copy == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// `tandem run --exec-with-listen-pid -- PROGRAM ARGS`: in the forked child,
/// sets `LISTEN_PID` to this process's pid (which exec keeps: it is the
/// program's) when listeners were passed, and execs the program. It returns
/// only when exec failed: 127 (not found) or 126 (not executable), as a shell.
pub fn exec_program(command: &[String]) -> ExitCode {
    let Some((program, args)) = command.split_first() else {
        eprintln!("tandem run: --exec-with-listen-pid without a program");
        return ExitCode::from(2);
    };
    let mut exec = std::process::Command::new(program);
    exec.args(args);
    if std::env::var_os("LISTEN_FDS").is_some() {
        exec.env("LISTEN_PID", std::process::id().to_string());
    }
    let error = exec.exec();
    let code = if error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
    eprintln!("tandem run: cannot run {}: {error}", Path::new(program).display());
    ExitCode::from(code)
}

/// `signal 9 (SIGKILL)`: the signal's number, and its name for the usual ones.
pub fn signal_text(signal: i32) -> String {
    let name = match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        _ => return format!("signal {signal}"),
    };
    format!("signal {signal} ({name})")
}
