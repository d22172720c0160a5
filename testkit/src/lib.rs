//! The helpers tandem's test suites share, one implementation each: a time
//! limit for a test body, polling a condition, stopping spawned processes,
//! reading a child's output lines with deadlines, private temporary
//! directories and free ports.
//!
//! A dev-dependency only (`publish = false`), and a leaf: it depends on no
//! tandem crate. The domain helpers (starting a registry, etcd or Redis, an
//! in-memory upstream) stay with the tests that use them.
//!
//! ```no_run
//! use std::time::Duration;
//! use tandem_testkit::{Lines, ProcessGuard, eventually, within};
//!
//! # async fn example() {
//! within(Duration::from_secs(20), async {
//!     let mut child = std::process::Command::new("my-server")
//!         .stdout(std::process::Stdio::piped())
//!         .spawn()
//!         .expect("spawn");
//!     let mut lines = Lines::new("my-server");
//!     lines.read_blocking(child.stdout.take().expect("stdout"));
//!     let _server = ProcessGuard::new(child); // SIGKILLed and reaped when dropped
//!     lines.expect_line(Duration::from_secs(10), |l| l.starts_with("ready")).await;
//!     eventually(Duration::from_secs(5), "the socket", || async { std::path::Path::new("/tmp/s").exists() }).await;
//! })
//! .await;
//! # }
//! ```

mod lines;
mod poll;
mod process;
mod temp;
mod timeout;

pub use lines::{Lines, field};
pub use poll::{POLL_INTERVAL, eventually};
pub use process::{ProcessGuard, alive, stop};
pub use temp::{free_port, free_ports, private_dir};
pub use timeout::{log_to_test_output, within, within_logged};
