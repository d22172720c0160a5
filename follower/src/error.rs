//! What can go wrong for a caller.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::{ErrorKind, RemoteError};

/// Why a call, subscription or publish did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The deadline passed first; the call was cancelled at the leader.
    #[error("no answer within the {0:?} deadline")]
    DeadlineExceeded(Duration),
    /// There is no leader right now (it died, or is being replaced); retry later.
    #[error("the leader was lost")]
    LeaderLost,
    /// No leader with a ready upstream appeared within the wait.
    #[error("no ready leader within {0:?}")]
    NotReady(Duration),
    /// The leader or its upstream answered with an error. Its message is part
    /// of this one's, so a single log line says what was wrong.
    #[error("the leader answered with an error: {0}")]
    Remote(RemoteError),
    /// The leader refused this follower's hello (token, protocol version or
    /// channels). The same hello is not sent again; a different leader may
    /// accept it (see [`Connector::new_leader`](crate::Connector::new_leader)).
    #[error("the leader rejected this follower: {0}")]
    Rejected(RemoteError),
    /// This process can never reach a leader with its settings (a bad name,
    /// directory or socket path, or the elected leader cannot serve). Not retried.
    #[error("cannot start: {0}")]
    Startup(StartupFailure),
    /// The handle was closed.
    #[error("the client is closed")]
    Closed,
    /// [`Connection::step_down`](crate::Connection::step_down): this process
    /// does not lead, or leads by a fixed role that it cannot hand on (a
    /// [`LocalConnector`](crate::LocalConnector): the cluster's agent, which its
    /// master replaces).
    #[error("this process does not lead (or cannot hand its leadership on): nothing to step down from")]
    NotLeader,
}

impl Error {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::DeadlineExceeded(_) | Error::LeaderLost | Error::NotReady(_) => true,
            Error::Remote(e) => e.is_retryable(),
            Error::Closed | Error::Rejected(_) | Error::Startup(_) | Error::NotLeader => false,
        }
    }

    /// Whether the error is a deadline expiry (here or at the leader).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::DeadlineExceeded(_) => true,
            Error::Remote(e) => e.kind == ErrorKind::DeadlineExceeded,
            _ => false,
        }
    }

    /// The remote error, if the leader sent one (an answer's or a rejection's).
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(e) | Error::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Self {
        Error::Remote(e)
    }
}

/// Why a process can never reach a leader with its settings. Returned (inside
/// an `io::Error`, see [`StartupError::into_io`]) by a [`Connector`](crate::Connector);
/// the driver then stops retrying and fails every call with [`Error::Startup`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// The election name cannot name files in the directory.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The socket path does not fit in a Unix socket address.
    #[error(
        "the socket path {path} is {len} bytes, over the {max}-byte limit of Unix socket paths; choose a shorter directory or name"
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The most a Unix socket path may hold.
        max: usize,
    },
    /// The directory lets other users in.
    #[error(
        "refusing to use {dir}: its mode is {mode:04o}, which lets other users in; run `chmod 700 {dir}` (with systemd, set RuntimeDirectoryMode=0700) or choose another directory"
    )]
    InsecureDirectory {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The directory belongs to another user.
    #[error(
        "refusing to use {dir}: it belongs to uid {owner}, not to this user (uid {uid}); choose a directory of this user's, or have uid {owner} or root run `chown {uid} {dir}`"
    )]
    ForeignDirectory {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// The path is a file (or a symbolic link to one), not a directory.
    #[error("refusing to use {dir}: it is not a directory (a file, or a link to one); choose another directory")]
    NotADirectory {
        /// The path.
        dir: PathBuf,
    },
    /// The directory (or a file in it) cannot be created or opened.
    #[error("cannot use {path}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
    /// This process won the election but its leader cannot serve.
    #[error("this process was elected leader but cannot serve on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: tandem_leader::Error,
    },
}

impl StartupError {
    /// Wraps the error for [`Connector::connect`](crate::Connector::connect):
    /// the driver recognizes it and does not retry.
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }

    /// The startup error inside `error`, if a connector put one there.
    pub(crate) fn from_io(error: std::io::Error) -> Result<StartupFailure, std::io::Error> {
        if !error.get_ref().is_some_and(|inner| inner.is::<StartupError>()) {
            return Err(error);
        }
        let kind = error.kind();
        match error.into_inner().map(|inner| inner.downcast::<StartupError>()) {
            Some(Ok(startup)) => Ok(StartupFailure(Arc::new(*startup))),
            Some(Err(other)) => Err(std::io::Error::new(kind, other)),
            None => Err(std::io::Error::from(kind)),
        }
    }
}

/// A [`StartupError`] that can be cloned into every failed call and the
/// connection's state.
#[derive(Debug, Clone)]
pub struct StartupFailure(pub Arc<StartupError>);

impl StartupFailure {
    /// The error.
    pub fn error(&self) -> &StartupError {
        &self.0
    }
}

impl std::fmt::Display for StartupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The whole chain: this is the one line a user sees before the process exits.
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&*self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl PartialEq for StartupFailure {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StartupFailure {}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;
    use crate::Standalone;

    #[test]
    fn each_refusal_of_the_standalone_directory_names_its_own_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();

        // Mode 0700, wrong owner: chmod would not help. (A fresh directory
        // given to `nobody` as root; `/`, root's, otherwise.)
        let foreign = if nix::unistd::geteuid().is_root() {
            let dir = tmp.path().join("foreign");
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            dir
        } else {
            PathBuf::from("/")
        };
        let owner = std::fs::metadata(&foreign).unwrap().uid();
        let error = Standalone::check("n", &foreign).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, StartupError::ForeignDirectory { owner: o, .. } if o == owner), "{message}");
        assert!(message.contains(&format!("belongs to uid {owner}")), "{message}");
        assert!(
            message.contains(&format!("chown {uid} {}", foreign.display())) && !message.contains("chmod"),
            "{message}"
        );

        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = Standalone::check("n", &loose).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, StartupError::InsecureDirectory { mode: 0o755, .. }), "{message}");
        assert!(
            message.contains(&format!("run `chmod 700 {}`", loose.display())) && !message.contains("chown"),
            "{message}"
        );

        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let error = Standalone::check("n", &file).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, StartupError::NotADirectory { .. }), "{message}");
        assert!(!message.contains("chmod") && !message.contains("chown"), "{message}");
    }
}
