//! The client side: [`ControlClient`], for the `tandem` CLI, and the listing of
//! the running clusters of this user.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

use super::limits::{CODE_TOO_MANY_CONNECTIONS, LIST_TIMEOUT, MAX_LINE, PID_FILE, REFUSAL_READ_TIMEOUT, SOCKET_FILE};
use super::names::{clusters_dir, socket_path, validate_name};
use super::wire::{ClusterInfo, Request, Response};
use crate::ReloadError;

// ---- the client side ---------------------------------------------------------

/// Why a control request failed, from the CLI's point of view.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No cluster of this user has that name.
    #[error("no running cluster named {name:?}{}", known_list(.known))]
    NotRunning {
        /// The name asked for.
        name: String,
        /// The names of the clusters that answer.
        known: Vec<String>,
    },
    /// The socket exists but its master does not answer.
    #[error("cluster {name:?} is not answering on {}", .path.display())]
    NotAnswering {
        /// The name.
        name: String,
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket belongs to another user.
    #[error("permission denied on {}: the cluster belongs to another user", .path.display())]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The master answered something that is not a response line.
    #[error("bad answer from the cluster's master: {0}")]
    Protocol(String),
    /// The master closed the connection without an answer.
    #[error("the cluster's master closed the connection without answering")]
    Closed {
        /// What failed: sending the request or reading the answer.
        #[source]
        source: io::Error,
    },
    /// The master is serving its limit of control connections
    /// ([`MAX_CONNECTIONS`](super::MAX_CONNECTIONS)) and refused this one: try again.
    #[error("{0}")]
    Busy(String),
    /// The master refused or failed the command.
    #[error("{0}")]
    Failed(String),
    /// The master refused or failed a `reload`, `reload_agent`, `scale`,
    /// `restart` or `restart_agent`: why, typed (its `Display` is the
    /// master's answer in words).
    #[error(transparent)]
    Reload(ReloadError),
}

impl ControlError {
    /// Whether the same request may succeed if tried again later: the master
    /// was busy or did not answer, or a reload, scale or restart was refused
    /// because another one ran or the cluster (or the worker) was not ready
    /// ([`ReloadError::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            ControlError::Busy(_) | ControlError::NotAnswering { .. } => true,
            ControlError::Reload(e) => e.is_retryable(),
            _ => false,
        }
    }
}

pub(crate) fn known_list(known: &[String]) -> String {
    if known.is_empty() { "; no cluster is running".to_owned() } else { format!("; running: {}", known.join(", ")) }
}

/// A connection to one cluster's master.
#[derive(Debug)]
pub struct ControlClient {
    framed: Framed<UnixStream, LinesCodec>,
}

impl ControlClient {
    /// Connects to the cluster `name` of this user.
    pub async fn connect(name: &str) -> Result<ControlClient, ControlError> {
        Self::connect_to(&socket_path(name), name).await
    }

    /// Connects to the control socket at `path` (of the cluster `name`, for errors).
    pub async fn connect_to(path: &Path, name: &str) -> Result<ControlClient, ControlError> {
        let path = path.to_owned();
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                // The master drops a connection from another user without a
                // word (see `spawn`): say why here, not "connection closed".
                let (master, me) = (stream.peer_cred().map(|c| c.uid()), nix::unistd::getuid().as_raw());
                if let Ok(master) = master
                    && master != me
                {
                    let why = format!("the master runs as uid {master}, this is uid {me}");
                    return Err(ControlError::PermissionDenied {
                        path,
                        source: io::Error::new(io::ErrorKind::PermissionDenied, why),
                    });
                }
                Ok(ControlClient { framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE)) })
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(ControlError::PermissionDenied { path, source: e })
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound) || validate_name(name).is_err() => {
                Err(ControlError::NotRunning { name: name.to_owned(), known: running().await })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // A socket file without a master: a master that died.
                Err(ControlError::NotRunning { name: name.to_owned(), known: running().await })
            }
            Err(source) => Err(ControlError::NotAnswering { name: name.to_owned(), path, source }),
        }
    }

    /// Sends one request and returns its result.
    ///
    /// A master at its connection limit writes its refusal and closes the
    /// connection, possibly before the request is sent: then sending fails
    /// (`EPIPE`, `ECONNRESET`) and the refusal is still read, for
    /// [`ControlError::Busy`] rather than the broken pipe.
    pub async fn call(&mut self, request: Request) -> Result<serde_json::Value, ControlError> {
        let line = serde_json::to_string(&request).map_err(|e| ControlError::Protocol(e.to_string()))?;
        if let Err(e) = self.framed.send(line).await {
            let sent = io_error(e);
            return match tokio::time::timeout(REFUSAL_READ_TIMEOUT, self.framed.next()).await {
                Ok(Some(Ok(line))) => response_result(&line),
                _ => Err(ControlError::Closed { source: sent }),
            };
        }
        match self.framed.next().await {
            Some(Ok(line)) => response_result(&line),
            Some(Err(LinesCodecError::Io(e))) => Err(ControlError::Closed { source: e }),
            Some(Err(e)) => Err(ControlError::Protocol(e.to_string())),
            None => Err(ControlError::Closed { source: io::ErrorKind::UnexpectedEof.into() }),
        }
    }

    /// [`call`](Self::call), failing with [`ControlError::NotAnswering`] after `timeout`.
    pub async fn call_within(
        &mut self,
        name: &str,
        request: Request,
        timeout: Duration,
    ) -> Result<serde_json::Value, ControlError> {
        match tokio::time::timeout(timeout, self.call(request)).await {
            Ok(result) => result,
            Err(_) => Err(ControlError::NotAnswering {
                name: name.to_owned(),
                path: socket_path(name),
                source: io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")),
            }),
        }
    }

    /// [`call`](Self::call), decoding the result as `T`.
    pub async fn call_as<T: serde::de::DeserializeOwned>(&mut self, request: Request) -> Result<T, ControlError> {
        let value = self.call(request).await?;
        serde_json::from_value(value).map_err(|e| ControlError::Protocol(e.to_string()))
    }
}

pub(crate) fn io_error(e: LinesCodecError) -> io::Error {
    match e {
        LinesCodecError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// The result in one answer line.
pub(crate) fn response_result(line: &str) -> Result<serde_json::Value, ControlError> {
    let response: Response = serde_json::from_str(line).map_err(|e| ControlError::Protocol(e.to_string()))?;
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (true, None, _) => Ok(serde_json::Value::Null),
        (false, _, error) => {
            if let Some(e) = response.reload_error {
                return Err(ControlError::Reload(e));
            }
            let error = error.unwrap_or_else(|| "failed".into());
            if response.code.as_deref() == Some(CODE_TOO_MANY_CONNECTIONS) {
                Err(ControlError::Busy(error))
            } else {
                Err(ControlError::Failed(error))
            }
        }
    }
}

/// The names of this user's running clusters (answering or not), sorted.
pub async fn running() -> Vec<String> {
    list().await.into_iter().map(|listed| listed.name().to_owned()).collect()
}

/// One cluster in [`list`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Listed {
    /// Its master answered `info`.
    Answering(ClusterInfo),
    /// Its master holds the socket but gave no `info`.
    Silent(Silent),
}

impl Listed {
    /// The cluster's name.
    pub fn name(&self) -> &str {
        match self {
            Listed::Answering(info) => &info.name,
            Listed::Silent(silent) => &silent.name,
        }
    }
}

/// A cluster whose master gave no `info` to [`list`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Silent {
    /// The cluster's name.
    pub name: String,
    /// The master's pid, from its pid file.
    pub pid: Option<u32>,
    /// `not answering` (no answer within [`LIST_TIMEOUT`], or the connection
    /// failed) or `busy` (serving its limit of control connections).
    pub state: String,
    /// Why, in words.
    pub error: String,
}

/// Every running cluster of this user, sorted by name: `info` from each
/// master, asked at the same time, or why it gave none within
/// [`LIST_TIMEOUT`]. A socket nobody listens on (a master that died) is not
/// listed.
pub async fn list() -> Vec<Listed> {
    let dir = clusters_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join(SOCKET_FILE).exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| validate_name(name).is_ok())
        .collect();
    names.sort();
    let asks = names.into_iter().map(|name| {
        let dir = dir.join(&name);
        async move { list_one(name, &dir).await }
    });
    futures::future::join_all(asks).await.into_iter().flatten().collect()
}

/// `info` from the master in `dir`; `None` when nobody listens there.
pub(crate) async fn list_one(name: String, dir: &Path) -> Option<Listed> {
    let ask = async {
        let stream = match UnixStream::connect(dir.join(SOCKET_FILE)).await {
            Ok(stream) => stream,
            // A socket file left by a master that died.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => return None,
            Err(e) => return Some(Err(("not answering", e.to_string()))),
        };
        let mut client = ControlClient { framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE)) };
        Some(match client.call_as::<ClusterInfo>(Request::Info).await {
            Ok(info) => Ok(info),
            Err(e @ ControlError::Busy(_)) => Err(("busy", e.to_string())),
            Err(e) => Err(("not answering", error_chain(&e))),
        })
    };
    let (state, error) = match tokio::time::timeout(LIST_TIMEOUT, ask).await {
        Ok(None) => return None,
        Ok(Some(Ok(info))) => return Some(Listed::Answering(info)),
        Ok(Some(Err(why))) => why,
        Err(_) => ("not answering", format!("no answer within {LIST_TIMEOUT:?}")),
    };
    let pid = std::fs::read_to_string(dir.join(PID_FILE)).ok().and_then(|s| s.trim().parse().ok());
    Some(Listed::Silent(Silent { name, pid, state: state.to_owned(), error }))
}

/// `error` and its causes, `: `-separated.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line += &format!(": {cause}");
        source = cause.source();
    }
    line
}
