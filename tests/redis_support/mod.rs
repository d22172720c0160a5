//! A real redis-server for tests: on a free loopback port, without persistence,
//! killed by pid when dropped; and the real `redis-cli` against it.
//!
//! Tests that need it are `#[ignore = "needs redis-server: ..."]`, so a plain
//! `cargo test` without Redis reports them ignored; CI installs the apt package
//! `redis-server` (which brings `redis-cli`) and runs them with `--ignored`.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_testkit::ProcessGuard;

// Tests here log as `RUST_LOG` asks, on the test's output.
#[allow(unused_imports)] // each test binary uses some of them
pub use tandem_testkit::{eventually, free_port, within_logged as within};

/// A redis-server on loopback, killed (SIGKILL, by pid) when dropped.
pub struct Redis {
    pub port: u16,
    extra: Vec<String>,
    /// `redis-cli`'s own TLS and credential arguments, for a TLS server.
    cli_extra: Vec<String>,
    tls: bool,
    child: Option<ProcessGuard>,
}

impl Redis {
    /// A fresh server on a free port, answering PING.
    pub async fn start() -> Redis {
        Redis::with_args(&[]).await
    }

    /// A fresh server with extra `redis-server` arguments (`--notify-keyspace-events KA`, ...).
    pub async fn with_args(extra: &[&str]) -> Redis {
        Redis::start_with(extra, &[], false).await
    }

    /// A fresh server that speaks TLS only (its `--tls-*` settings in `extra`),
    /// asked by `redis-cli` with `cli_extra` (`--tls --cacert ... --user ... --pass ...`).
    pub async fn tls(extra: &[&str], cli_extra: &[&str]) -> Redis {
        Redis::start_with(extra, cli_extra, true).await
    }

    async fn start_with(extra: &[&str], cli_extra: &[&str], tls: bool) -> Redis {
        let owned = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for _ in 0..5 {
            let mut redis =
                Redis { port: free_port(), extra: owned(extra), cli_extra: owned(cli_extra), tls, child: None };
            // Another process may take the port between its release and redis-server's bind: retry.
            if redis.spawn().await {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// A server that will run on this port once [`Redis::restart`] is called.
    pub fn not_started(port: u16) -> Redis {
        Redis { port, extra: Vec::new(), cli_extra: Vec::new(), tls: false, child: None }
    }

    /// Whether the server came up (false: it exited, e.g. the port was taken).
    async fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        let port = self.port.to_string();
        let ports: &[&str] = if self.tls { &["--port", "0", "--tls-port", &port] } else { &["--port", &port] };
        command
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it
        // makes the kernel kill redis-server if this test process dies before the guard runs.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                Ok(())
            });
        }
        let mut child = ProcessGuard::new(command.spawn().expect("spawn redis-server: apt-get install redis-server"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.child().try_wait() {
                return false;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() && self.cli_ok(&["ping"]) {
                self.child = Some(child);
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                drop(child); // killed and reaped
                panic!("redis-server on port {} not answering within 10 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL the adapter and the demo take (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ProcessGuard::id)
    }

    /// `kill -9` the server (by pid) and reap it.
    pub fn kill(&mut self) {
        // The guard SIGKILLs it by pid (ours, not reaped yet, so not reused) and reaps it.
        drop(self.child.take());
    }

    /// Starts the server again on the same port (empty: nothing is persisted).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is running");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // The port was just ours; if something else grabbed it meanwhile, retry until the deadline.
        while !self.spawn().await {
            assert!(tokio::time::Instant::now() < deadline, "redis-server could not restart on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn cli_ok(&self, args: &[&str]) -> bool {
        let output =
            Command::new("redis-cli").args(&self.cli_extra).args(["-p", &self.port.to_string()]).args(args).output();
        output.is_ok_and(|o| o.status.success() && !o.stdout.starts_with(b"ERR") && !o.stdout.is_empty())
    }

    /// Runs the real `redis-cli` against the server; returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(&self.cli_extra)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli: apt-get install redis-server (or redis-tools)");
        assert!(output.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The clients connected to the server, but the `redis-cli` asking (from `CLIENT LIST`).
    pub fn clients(&self) -> usize {
        let list = self.cli(&["client", "list"]);
        list.lines().filter(|line| !line.contains("cmd=client|list")).count()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
