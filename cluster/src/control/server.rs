//! The master side: the bound socket (one master per name), its accept
//! loop, and each connection's requests and answers.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tandem_protocol::internal::Throttle;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handle::{
    MASTER_GONE, MasterHandle, OpsCall, millis, reload_agent, reload_workers, restart_agent, restart_worker, scale,
};
use super::limits::{
    ECHO_PREFIX, IDLE_TIMEOUT, LOCK_FILE, MAX_CONNECTIONS, MAX_LINE, MAX_REQUEST_LINE, PID_FILE, SOCKET_FILE,
    WRITE_TIMEOUT,
};
use super::names::{clusters_dir, default_name, private_dir, validate_name};
use super::wire::{Request, Response, StopReport, cut, encode_reply};
use crate::Error;

/// The bound control socket, its directory lock and pid file.
#[derive(Debug)]
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    pid_file: PathBuf,
    /// The name's directory, removed with the lock file at drop.
    dir: PathBuf,
    lock: Option<nix::fcntl::Flock<File>>,
}

impl ControlServer {
    /// Takes the name (or fails with [`Error::NameInUse`]) and binds the socket.
    pub(crate) fn bind(name: &str) -> Result<Self, Error> {
        Self::bind_in(&clusters_dir(), name)
    }

    pub(crate) fn bind_in(clusters: &Path, name: &str) -> Result<Self, Error> {
        validate_name(name)?;
        let dir = clusters.join(name);
        let setup = |source| Error::Control { what: "control socket", path: dir.display().to_string(), source };
        let pid_file = dir.join(PID_FILE);
        // The name's directory goes when its master stops: (re)made under the lock's retry.
        let prepare = || private_dir(clusters).and_then(|()| private_dir(&dir));
        let lock = match crate::runtime_dir::lock_name_dir(&dir, LOCK_FILE, prepare).map_err(setup)? {
            Some(lock) => lock,
            None => {
                let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                return Err(Error::NameInUse { name: name.to_owned(), pid });
            }
        };
        let path = dir.join(SOCKET_FILE);
        // We hold the lock: a socket file here is a dead master's.
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed the control socket of a master that died"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(setup(e)),
        }
        let listener = UnixListener::bind(&path).map_err(setup)?;
        let mut file = File::create(&pid_file).map_err(setup)?;
        writeln!(file, "{}", std::process::id()).map_err(setup)?;
        tracing::debug!(path = %path.display(), "control socket");
        Ok(ControlServer { listener, path, pid_file, dir, lock: Some(lock) })
    }

    /// Binds the default name (the executable's file name); when a live
    /// cluster has it, the first free one of `<name>-2`, `<name>-3`, ... (up
    /// to `-100`), said at INFO. Returns the name taken.
    pub(crate) fn bind_default() -> Result<(String, Self), Error> {
        let base = default_name();
        let mut last = None;
        for n in 1..=100 {
            let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
            match Self::bind(&name) {
                Ok(server) => {
                    if n > 1 {
                        tracing::info!(
                            name,
                            taken = base,
                            "a cluster named {base:?} is running; this one is named {name:?}"
                        );
                    }
                    return Ok((name, server));
                }
                Err(e @ Error::NameInUse { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::NameInUse { name: base, pid: 0 }))
    }

    /// Serves connections until `cancel`.
    pub(crate) fn spawn(self, handle: MasterHandle, tracker: &TaskTracker, cancel: CancellationToken) {
        let tasks = tracker.clone();
        tracker.spawn(
            async move {
                let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                let uid = nix::unistd::getuid().as_raw();
                let mut errors = tandem_protocol::internal::AcceptErrors::new("control");
                let mut refusals = Throttle::default();
                let warnings = Arc::new(Warnings::default());
                loop {
                    let stream = tokio::select! {
                        accepted = self.listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                errors.succeeded();
                                stream
                            }
                            Err(e) => {
                                // Out of descriptors: one of the master's reserve for this accept.
                                if crate::descriptors::release_one_for(&e) {
                                    continue;
                                }
                                tokio::time::sleep(errors.failed(&e)).await;
                                continue;
                            }
                        },
                        _ = cancel.cancelled() => break,
                    };
                    match stream.peer_cred() {
                        Ok(cred) if cred.uid() == uid => {}
                        Ok(cred) => {
                            tracing::warn!(peer.uid = cred.uid(), "control connection from another user refused");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control connection without credentials refused");
                            continue;
                        }
                    }
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        refuse(stream);
                        if let Some(suppressed) = refusals.hit() {
                            tracing::warn!(
                                limit = MAX_CONNECTIONS,
                                suppressed,
                                "control connection refused: serving the limit of control connections"
                            );
                        }
                        continue;
                    };
                    let framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
                    let (handle, cancel, warnings) = (handle.clone(), cancel.clone(), Arc::clone(&warnings));
                    tasks.spawn(
                        async move {
                            serve_connection(framed, handle, cancel, &warnings).await;
                            drop(permit);
                        }
                        .in_current_span(),
                    );
                }
                drop(self);
            }
            .in_current_span(),
        );
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // The lock is still ours: these files are ours to remove.
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.pid_file);
        if let Some(lock) = self.lock.take() {
            crate::runtime_dir::remove_name_dir(&self.dir, LOCK_FILE, lock);
        }
    }
}

/// Writes the refusal to a connection over [`MAX_CONNECTIONS`] and closes
/// it, without a task: the line (about 150 bytes) goes into the new socket's
/// empty send buffer at once. A request the client sent first stays unread;
/// its client reads the refusal, then the reset.
pub(crate) fn refuse(stream: UnixStream) {
    let mut line = encode_reply(&Response::too_many_connections(), MAX_LINE);
    line.push('\n');
    let written = stream.into_std().and_then(|mut stream| stream.write(line.as_bytes()));
    match written {
        Ok(n) if n == line.len() => {}
        Ok(n) => tracing::debug!(written = n, bytes = line.len(), "control refusal cut short"),
        Err(e) => tracing::debug!(error = %e, "control refusal not written"),
    }
}

/// The rate limits of the warnings that a flood of connections can repeat.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    bad_requests: std::sync::Mutex<Throttle>,
    slow_readers: std::sync::Mutex<Throttle>,
}

impl Warnings {
    /// Whether to log one more `which` now: `Some(held back since the last one)`.
    fn hit(which: &std::sync::Mutex<Throttle>) -> Option<u64> {
        which.lock().unwrap_or_else(|p| p.into_inner()).hit()
    }
}

/// Writes one answer, whole, within [`WRITE_TIMEOUT`]. `false` when the
/// connection is to be closed: the client went away, or did not read.
pub(crate) async fn send(
    framed: &mut Framed<UnixStream, LinesCodec>,
    response: &Response,
    warnings: &Warnings,
) -> bool {
    let line = encode_reply(response, MAX_LINE);
    let bytes = line.len();
    match tokio::time::timeout(WRITE_TIMEOUT, framed.send(line)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control client gone before its answer was written");
            false
        }
        Err(_) => {
            if let Some(suppressed) = Warnings::hit(&warnings.slow_readers) {
                tracing::warn!(
                    bytes,
                    timeout_ms = millis(WRITE_TIMEOUT),
                    suppressed,
                    "control client did not read its answer in time; connection closed and its slot freed"
                );
            }
            false
        }
    }
}

pub(crate) async fn serve_connection(
    mut framed: Framed<UnixStream, LinesCodec>,
    handle: MasterHandle,
    cancel: CancellationToken,
    warnings: &Warnings,
) {
    loop {
        let line = tokio::select! {
            line = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => line,
            _ = cancel.cancelled() => return,
        };
        let line = match line {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(LinesCodecError::MaxLineLengthExceeded))) => {
                // The codec leaves what it read of the line in the buffer.
                let response = Response::line_too_long(framed.read_buffer());
                if let Some(suppressed) = Warnings::hit(&warnings.bad_requests) {
                    tracing::warn!(
                        limit = MAX_REQUEST_LINE,
                        suppressed,
                        "control request line too long; connection closed"
                    );
                }
                let _ = send(&mut framed, &response, warnings).await;
                return;
            }
            Ok(Some(Err(LinesCodecError::Io(e)))) if e.kind() != io::ErrorKind::InvalidData => {
                tracing::debug!(error = %e, "control connection failed");
                return;
            }
            Ok(Some(Err(LinesCodecError::Io(e)))) => {
                // A line that is not UTF-8.
                let response = Response::err(format!("bad request line: {e}"));
                if let Some(suppressed) = Warnings::hit(&warnings.bad_requests) {
                    tracing::warn!(error = %e, suppressed, "unreadable control request; connection closed");
                }
                let _ = send(&mut framed, &response, warnings).await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::debug!(?request, "control request");
                answer(request, &handle).await
            }
            Err(e) => {
                if let Some(suppressed) = Warnings::hit(&warnings.bad_requests) {
                    tracing::warn!(bytes = line.len(), error = %cut(&e.to_string(), 2 * ECHO_PREFIX), suppressed, "bad control request");
                }
                Response::bad_request(&line, &e)
            }
        };
        if !send(&mut framed, &response, warnings).await {
            return;
        }
    }
}

pub(crate) async fn answer(request: Request, handle: &MasterHandle) -> Response {
    match request {
        Request::Info => match handle.snapshot().await {
            Ok(s) => {
                let mut info = MasterHandle::info(&s);
                info.log_dir = handle.stats.logs.as_ref().map(|l| l.dir().to_owned());
                Response::ok(info)
            }
            Err(e) => Response::err(e),
        },
        Request::Status => {
            let leader = handle.agent_stats().await;
            match handle.snapshot().await {
                Ok(s) => Response::ok(handle.processes(&s, leader)),
                Err(e) => Response::err(e),
            }
        }
        Request::Leader => match handle.agent_stats().await {
            Some(stats) => Response::ok(stats),
            None => Response::err("the agent did not answer (not running, or it serves no report)"),
        },
        Request::Reload => match reload_workers(handle).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::reload_failed(e),
        },
        Request::ReloadAgent => match reload_agent(handle).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::reload_failed(e),
        },
        Request::Scale { workers } => match scale(handle, workers).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::reload_failed(e),
        },
        Request::Restart { worker } => match restart_worker(handle, worker).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::reload_failed(e),
        },
        Request::RestartAgent => match restart_agent(handle).await {
            Ok(report) => Response::ok(report),
            Err(e) => Response::reload_failed(e),
        },
        Request::Stop => {
            let (tx, rx) = oneshot::channel();
            if handle.calls.send(OpsCall::Stop(tx)).await.is_err() {
                return Response::err(MASTER_GONE);
            }
            match rx.await {
                Ok(pids) => Response::ok(StopReport { pids }),
                Err(_) => Response::err(MASTER_GONE),
            }
        }
    }
}
