//! Helpers shared by the in-process tests.

#![allow(dead_code)]

use std::time::Duration;

use futures::{Stream, StreamExt};
use tandem_registry::{Config, Server, ServerHandle};

/// The most any test body may take (`tandem_testkit::within(LIMIT, ..)`).
pub const LIMIT: Duration = Duration::from_secs(20);

/// The most a polled condition may take to hold
/// (`tandem_testkit::eventually(SETTLE, ..)`).
pub const SETTLE: Duration = Duration::from_secs(10);

pub async fn start(config: Config) -> ServerHandle {
    Server::bind("127.0.0.1:0", config).await.expect("binds an ephemeral port").spawn()
}

/// The next item of a stream, failing if the stream ended.
pub async fn next<S: Stream + Unpin>(stream: &mut S) -> S::Item {
    stream.next().await.expect("the stream ended")
}
