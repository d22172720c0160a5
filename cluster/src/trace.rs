//! A tracing subscriber for binaries built on the cluster (the library itself
//! never installs one).

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info`). Call it at the top of `main`, before
/// [`Cluster::builder`](crate::Cluster::builder): it then runs in every process,
/// and each line carries the process's span (`role`, `worker.id`, `pid`).
///
/// - `TANDEM_LOG=json`: one JSON object per line (fields, span and level as
///   keys), for log shippers.
/// - Otherwise one human-readable line per event, with ANSI colours only when
///   stderr is a terminal (`NO_COLOR` set turns them off too).
///
/// Does nothing if a global subscriber is already set.
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Whether `TANDEM_LOG=json` asks for JSON lines (then the master logs its
/// status table as a JSON event instead of printing a text table).
pub(crate) fn json_logs() -> bool {
    std::env::var("TANDEM_LOG").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

/// [`init_tracing`] with another filter when `RUST_LOG` is unset (`warn`, `tandem=debug`, ...).
pub fn init_tracing_with_default(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = json_logs();
    // Err: a subscriber is already installed; keep it.
    if json {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
        let _ =
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter).try_init();
    }
}
