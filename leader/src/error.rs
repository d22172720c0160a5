//! Errors of starting and serving a leader.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the leader could not start serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path or address.
        path: String,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// The socket's directory may be entered by other users.
    #[error(
        "refusing to serve in {path}: its mode is {mode:04o}, which lets other users in; run `chmod 700 {path}` or choose another directory",
        path = path.display()
    )]
    InsecureDirectory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The socket's directory belongs to another user (whatever its mode:
    /// only its owner may change that).
    #[error(
        "refusing to serve in {path}: it belongs to uid {owner}, not to this user (uid {uid}); choose a directory of this user's, or have uid {owner} or root run `chown {uid} {path}`",
        path = path.display()
    )]
    ForeignDirectory {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// The socket's directory is a file (or a link to one), not a directory.
    #[error("refusing to serve in {path}: it is not a directory; choose another directory", path = path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A TCP address that is not loopback.
    #[error("refusing to serve on {0}: only loopback addresses are allowed")]
    NotLoopback(SocketAddr),
    /// The last-known-good cache directory may be read or written by others.
    #[error(
        "refusing the cache directory {path}: its mode is {mode:04o}, which lets other users read or change the cached values; run `chmod 700 {path}`",
        path = path.display()
    )]
    InsecureCacheDirectory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The cache directory belongs to another user (whatever its mode: only
    /// its owner may change that).
    #[error(
        "refusing the cache directory {path}: it belongs to uid {owner}, not to this user (uid {uid}); choose a directory of this user's, or have uid {owner} or root run `chown {uid} {path}`",
        path = path.display()
    )]
    ForeignCacheDirectory {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// The cache directory's path is a file (or a link to one).
    #[error(
        "refusing the cache directory {path}: it is not a directory; remove the file or choose another directory",
        path = path.display()
    )]
    CacheNotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The cache directory could not be created or read.
    #[error("cannot use the cache directory {}", path.display())]
    CacheDirectory {
        /// The directory.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// TCP has no peer credentials, so a token is mandatory.
    #[error("serving over TCP needs a token (peers cannot be identified by uid)")]
    TokenRequired,
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// A directory this process does not own: a fresh one given to `nobody`
    /// when running as root, `/` (root's) otherwise.
    fn foreign_dir(tmp: &Path) -> PathBuf {
        if nix::unistd::geteuid().is_root() {
            let dir = tmp.join("foreign");
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            dir
        } else {
            PathBuf::from("/")
        }
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn each_refusal_of_the_cache_directory_names_its_own_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();

        // Mode 0700, wrong owner: chmod would not help.
        let foreign = foreign_dir(tmp.path());
        let error = crate::Cache::open(&foreign).unwrap_err();
        let message = error.to_string();
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&foreign).unwrap());
        assert!(
            matches!(&error, Error::ForeignCacheDirectory { owner: o, uid: u, .. } if *o == owner && *u == uid),
            "{message}"
        );
        assert!(message.contains(&format!("belongs to uid {owner}")), "{message}");
        assert!(message.contains(&format!("chown {uid} {}", foreign.display())), "{message}");
        assert!(!message.contains("chmod"), "{message}");
        if foreign != Path::new("/") {
            assert_eq!(mode_of(&foreign), 0o700, "refused for its owner alone");
        }

        // Ours, mode 0750: chmod.
        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o750)).unwrap();
        let error = crate::Cache::open(&loose).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::InsecureCacheDirectory { mode: 0o750, .. }), "{message}");
        assert!(message.contains(&format!("run `chmod 700 {}`", loose.display())), "{message}");
        assert!(message.contains("mode is 0750") && !message.contains("chown"), "{message}");

        // A file.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let error = crate::Cache::open(&file).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::CacheNotADirectory { .. }), "{message}");
        assert!(
            message.contains("not a directory") && !message.contains("chmod") && !message.contains("chown"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn each_refusal_of_the_socket_directory_names_its_own_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let leader = crate::Leader::builder().start();

        let foreign = foreign_dir(tmp.path());
        let error = leader.bind_unix(foreign.join("l.sock")).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::ForeignDirectory { .. }), "{message}");
        assert!(
            message.contains(&format!("chown {uid} {}", foreign.display())) && !message.contains("chmod"),
            "{message}"
        );

        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = leader.bind_unix(loose.join("l.sock")).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::InsecureDirectory { mode: 0o755, .. }), "{message}");
        assert!(
            message.contains(&format!("run `chmod 700 {}`", loose.display())) && !message.contains("chown"),
            "{message}"
        );

        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let error = leader.bind_unix(file.join("l.sock")).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::NotADirectory { .. }), "{message}");
        assert!(!message.contains("chmod") && !message.contains("chown"), "{message}");
        leader.shutdown().await;
    }
}
