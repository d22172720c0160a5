//! Helpers shared by the in-process tests.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tandem_registry::{Config, Server, ServerHandle};

/// The most any test body may take.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Runs a test body, failing it if it does not finish within [`LIMIT`].
pub async fn within<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, body).await.expect("test timed out")
}

pub async fn start(config: Config) -> ServerHandle {
    Server::bind("127.0.0.1:0", config).await.expect("binds an ephemeral port").spawn()
}

/// Polls `condition` until it holds, failing after 10 s (real time).
pub async fn eventually<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    for _ in 0..1000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still not true after 10 s: {what}");
}

/// The next item of a stream, failing if the stream ended.
pub async fn next<S: Stream + Unpin>(stream: &mut S) -> S::Item {
    stream.next().await.expect("the stream ended")
}
