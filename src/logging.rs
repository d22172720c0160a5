//! Logging for tandem's binaries and examples: one setup for all of them.

/// Installs the log subscriber every tandem binary and example uses: stderr,
/// `RUST_LOG` filter (default `info`), `TANDEM_LOG=json` for one JSON object
/// per line, no ANSI colour unless stderr is a terminal. See
/// [`tandem_cluster::init_tracing`].
pub fn init() {
    tandem_cluster::init_tracing();
}

/// [`init`] with another filter when `RUST_LOG` is unset (`warn`, `error`, ...).
pub fn init_with_default(default_filter: &str) {
    tandem_cluster::init_tracing_with_default(default_filter);
}
