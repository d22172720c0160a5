//! Private temporary directories and free loopback ports.

use std::net::TcpListener;

/// A private (0700) temporary directory, removed when dropped: the place for
/// test sockets, caches and runtime directories.
pub fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("tandem-test").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// A free loopback port: bound to port 0, then released (nothing listens on it
/// once this returns), for a server that needs an explicit port.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free loopback ports: bound together (so they differ), then released.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local_addr").port()).collect()
}
