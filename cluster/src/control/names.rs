//! Where a cluster's control socket lives: names, their directories, and
//! the checks that keep them private to this user.

use std::io::{self};
use std::path::{Path, PathBuf};

use super::limits::SOCKET_FILE;
use crate::Error;

// ---- names and paths -------------------------------------------------------

/// Checks that `name` can name a cluster: 1 to 64 characters among ASCII
/// letters, digits, `.`, `_` and `-`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let invalid = |reason| Err(Error::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > 64 {
        return invalid("it must have 1 to 64 characters");
    }
    if name.starts_with('.') {
        return invalid("it must not start with '.'");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The default cluster name: the executable's file name.
pub fn default_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| {
            n.chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
                .collect::<String>()
        })
        .map(|n| n.trim_start_matches('.').chars().take(64).collect::<String>())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "tandem".to_owned())
}

/// The directory holding one sub-directory per cluster of this user:
/// `$XDG_RUNTIME_DIR/tandem` or `<temp dir>/tandem-<uid>`.
pub fn clusters_dir() -> PathBuf {
    let base = crate::runtime_dir::base_dir();
    if base == std::env::temp_dir() {
        base.join(format!("tandem-{}", nix::unistd::getuid().as_raw()))
    } else {
        base.join("tandem")
    }
}

/// The control socket of the cluster `name`.
pub fn socket_path(name: &str) -> PathBuf {
    clusters_dir().join(name).join(SOCKET_FILE)
}

/// Creates `path` with mode 0700 if missing, then checks it is a directory
/// (not a symlink) owned by this user and closed to group and others
/// ([`ensure_own_dir`](crate::runtime_dir::ensure_own_dir)).
pub(crate) fn private_dir(path: &Path) -> io::Result<()> {
    crate::runtime_dir::ensure_own_dir(path, crate::runtime_dir::Openness::Private, false)
}
