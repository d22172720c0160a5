//! A time limit for a test body.

use std::future::Future;
use std::time::Duration;

/// Runs `test` with a time limit; panics with "test timed out after ..." past it.
pub async fn within<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, test).await {
        Ok(value) => value,
        Err(_) => panic!("test timed out after {limit:?}"),
    }
}

/// [`within`], with the logs `RUST_LOG` asks for on the test's output (see
/// [`log_to_test_output`]).
pub async fn within_logged<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    log_to_test_output();
    within(limit, test).await
}

/// Installs, once per test binary, a subscriber that writes the logs `RUST_LOG`
/// asks for (errors only without it) to the test's captured output. Does nothing
/// if the binary already installed one (a test capturing logs keeps its own).
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
