//! What no retry can fix, checked before the election starts: a name that
//! names files, a socket path that fits, a private directory.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// Checks that `name` can name the election's files (`<name>.lock`, `.epoch`, `.sock`).
pub(super) fn validate_name(name: &str) -> Result<(), StartupError> {
    let reason = if name.is_empty() {
        "the name is empty"
    } else if name == "." || name == ".." {
        "the name may not be `.` or `..`"
    } else if name.contains('/') {
        "the name may not contain `/` (it names files in the directory)"
    } else if name.contains('\0') {
        "the name may not contain a NUL byte"
    } else if name.len() > 200 {
        "the name is longer than 200 bytes"
    } else {
        return Ok(());
    };
    Err(StartupError::InvalidName { name: name.to_string(), reason })
}

/// Checks that `path` fits in a Unix socket address.
pub(super) fn validate_socket_path(path: &Path) -> Result<(), StartupError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(StartupError::SocketPathTooLong { path: path.to_path_buf(), len, max: MAX_SOCKET_PATH });
    }
    Ok(())
}

/// Creates `dir` (0700) if missing; an existing one must be a directory of
/// this user that no other user may enter.
pub(super) fn ensure_private_dir(dir: &Path) -> Result<(), StartupError> {
    let io = |source| StartupError::Io { path: dir.to_path_buf(), source };
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            return Ok(());
        }
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(StartupError::NotADirectory { dir: dir.to_path_buf() });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(StartupError::ForeignDirectory { dir: dir.to_path_buf(), owner: meta.uid(), uid });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StartupError::InsecureDirectory { dir: dir.to_path_buf(), mode });
    }
    Ok(())
}

impl Standalone {
    /// Checks what no retry can fix, before anything starts: `name` names
    /// files (no `/`, not empty), the socket path `<dir>/<name>.sock` fits in a
    /// Unix socket address ([`MAX_SOCKET_PATH`] bytes), and `dir` is a
    /// directory of this user that no other user may enter (created 0700 if
    /// missing). The connector runs the same checks on its first connect.
    pub fn check(name: &str, dir: &Path) -> Result<(), StartupError> {
        validate_name(name)?;
        validate_socket_path(&dir.join(format!("{name}.sock")))?;
        ensure_private_dir(dir)
    }

    /// Checks, once, what no retry can fix.
    pub(super) fn validate(&mut self) -> Result<(), StartupError> {
        if !self.validated {
            Self::check(&self.name, &self.dir)?;
            self.validated = true;
        }
        Ok(())
    }
}
