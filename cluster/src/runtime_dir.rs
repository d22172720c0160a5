//! The master's private runtime directory (mode 0700, unique name, removed at
//! exit) and the cluster's random token.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// A directory only this user can enter, removed when dropped.
#[derive(Debug)]
pub(crate) struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates `tandem-<name>-<pid>-<random>` under `$XDG_RUNTIME_DIR` when it is
    /// a directory owned by this user, else under the temp dir.
    pub(crate) fn create(cluster: &str) -> Result<Self, crate::Error> {
        let base = base_dir();
        Self::create_in(&base, cluster).map_err(|source| crate::Error::RuntimeDir { base, source })
    }

    pub(crate) fn create_in(base: &Path, cluster: &str) -> io::Result<Self> {
        let name: String = cluster
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(24)
            .collect();
        let mut suffix = [0u8; 6];
        rand::rngs::OsRng.try_fill_bytes(&mut suffix).map_err(io::Error::other)?;
        let path = base.join(format!("tandem-{name}-{}-{}", std::process::id(), hex(&suffix)));
        // mkdir fails if the path exists (even as a symlink): nobody can pre-plant it.
        DirBuilder::new().mode(0o700).create(&path)?;
        let dir = RuntimeDir { path };
        // The umask may have removed bits, never added any; make it exactly 0700.
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the runtime directory");
        }
    }
}

pub(crate) fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && let Ok(meta) = std::fs::metadata(&dir)
        && meta.is_dir()
        && meta.uid() == nix::unistd::getuid().as_raw()
    {
        return dir;
    }
    std::env::temp_dir()
}

/// A random 256-bit token, as 64 hex digits.
pub(crate) fn new_token() -> Result<String, crate::Error> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| crate::Error::Token(io::Error::other(e)))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_private_unique_and_removed_on_drop() {
        let base = std::env::temp_dir();
        let a = RuntimeDir::create_in(&base, "my app/../x").unwrap();
        let b = RuntimeDir::create_in(&base, "my app/../x").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(a.path().parent(), Some(base.as_path()));
        let meta = std::fs::metadata(a.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn tokens_are_256_bit_hex_and_differ() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
