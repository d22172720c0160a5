//! A tracing subscriber for binaries built on the cluster (the library itself
//! never installs one).

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info`). Call it at the top of `main`, before
/// [`Cluster::builder`](crate::Cluster::builder): it then runs in every process,
/// and each line carries the process's span (`role`, `worker.id`, `pid`).
/// Does nothing if a global subscriber is already set.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Err: a subscriber is already installed; keep it.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter).try_init();
}
