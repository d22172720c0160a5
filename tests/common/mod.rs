//! Helpers for multi-process tests: spawn the real example binaries, read their
//! lines with deadlines, and always kill what was spawned.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_testkit::Lines;

pub mod cli;
use tokio::process::{Child, Command};

// The generic helpers live in tandem-testkit (`poll_until` is its `eventually`).
#[allow(unused_imports)] // each test binary uses some of them
pub use tandem_testkit::{alive, eventually as poll_until, field, free_port, private_dir};

/// The path of an example binary built by `cargo test` (examples are built
/// next to the test binaries' `deps/` folder).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds the examples)",
        path.display()
    );
    path
}

/// The bundled registry server binary (`tandem-registry`), built by
/// `cargo build -p tandem-registry` or `cargo test --workspace`.
pub fn registry_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = profile_dir.join("tandem-registry");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p tandem-registry` (or run `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A spawned process, stopped and reaped when dropped: SIGTERM (so a master
/// removes its runtime directory), then SIGKILL by pid after 5 s.
///
/// Derefs to its output [`Lines`] (stdout, the cluster events, and the other
/// log lines if asked for: see [`spawn_with`](Self::spawn_with)):
/// `proc.expect_line(..)`, `proc.seen`, `proc.drain()`.
pub struct Proc {
    pub pid: i32,
    child: Child,
    lines: Lines,
}

impl Proc {
    pub fn spawn(program: &Path, args: &[&str]) -> Proc {
        Proc::spawn_with(program, args, &[], false)
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_with_env(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Proc {
        let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        Proc::spawn_with(program, args, &env, false)
    }

    /// Spawns with extra environment variables. stdout and stderr share one
    /// pipe, so the lines keep the order they were written in: stdout's lines
    /// as they are; each cluster event's log line (target
    /// `tandem_cluster::events`) as the event's own text (`cluster ready:
    /// ...`); the other log lines echoed to the test's stderr and, with
    /// `stderr`, kept too, prefixed with `stderr: `.
    pub fn spawn_with(program: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)], stderr: bool) -> Proc {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut command = Command::new(program);
        command.args(args).kill_on_drop(true);
        command.stdout(writer.try_clone().expect("pipe")).stderr(writer);
        // The lines are read in the plain format, the events at INFO at least.
        command.env_remove("TANDEM_LOG");
        if let Ok(filter) = std::env::var("RUST_LOG") {
            command.env("RUST_LOG", format!("{filter},tandem_cluster::events=info"));
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        // The write ends are the child's only: the output ends when it (and its children) exit.
        drop(command);
        let pid = child.id().expect("pid") as i32;
        let mut lines = Lines::new(format!("pid {pid}"));
        let output = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()).expect("pipe receiver");
        let (mut kept, kept_rx) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            let mut output = tokio::io::BufReader::new(output).lines();
            while let Ok(Some(line)) = output.next_line().await {
                if let Some(line) = output_line(pid, stderr, line) {
                    // Err: nobody reads the lines any more; the output is still read to its end.
                    let _ = kept.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        lines.read(kept_rx);
        Proc { pid, child, lines }
    }

    /// Waits for the process to exit (at most `within`) and collects every line it wrote.
    pub async fn finish(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = self.wait(within).await;
        self.lines.rest(Duration::from_secs(5)).await;
        status
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal);
    }

    /// Waits for the process to exit (at most `within`); returns its status.
    pub async fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait()).await.expect("process did not exit").expect("wait")
    }
}

impl std::ops::Deref for Proc {
    type Target = Lines;
    fn deref(&self) -> &Lines {
        &self.lines
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Lines {
        &mut self.lines
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // already exited and reaped: the pid may belong to someone else now
        }
        tandem_testkit::stop(self.pid, Duration::from_secs(5));
    }
}

/// The marker of a cluster event's log line in the plain format:
/// `<time> <LEVEL> <span>: tandem_cluster::events: <the event>`.
const EVENT_TARGET: &str = " tandem_cluster::events: ";

/// What [`Proc`] keeps of one line of its output (see [`Proc::spawn_with`]).
fn output_line(pid: i32, stderr: bool, line: String) -> Option<String> {
    if let Some(at) = line.find(EVENT_TARGET) {
        eprintln!("[{pid}] {line}");
        return Some(line[at + EVENT_TARGET.len()..].to_owned());
    }
    if is_log_line(&line) {
        eprintln!("[{pid}] {line}");
        return stderr.then(|| format!("stderr: {line}"));
    }
    Some(line)
}

/// A `tracing` line in the plain format: it starts with an RFC 3339 time (`2026-12-07T16:10:48.175491Z`).
fn is_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-' && b[10] == b'T'
}

/// The real `tandem-registry` binary (built by `cargo test --workspace`; built
/// here with cargo when a narrower `cargo test -p tandem` left it out).
pub fn registry_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = profile_dir.join("tandem-registry");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "tandem-registry", "--bin", "tandem-registry"])
            .status()
            .expect("run cargo build -p tandem-registry");
        assert!(status.success() && path.exists(), "cannot build {}", path.display());
    }
    path
}

/// Starts `tandem-registry serve --listen <listen> <extra>` and returns it with its address.
pub async fn serve_registry(listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["serve", "--listen", listen];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn(&registry_bin(), &args);
    let line = proc.expect_line(Duration::from_secs(10), |l| l.starts_with("listening on ")).await;
    let addr = line.trim_start_matches("listening on ").trim().to_string();
    (proc, addr)
}

/// The core promise, checked on output lines: for each value of the field
/// `stream` (`pid`, `worker`), the lines carrying an `epoch` and a `seq` (the
/// value lines) go strictly up in (epoch, seq): no value delivered twice, none
/// older after a newer one.
pub fn assert_in_order(lines: &[String], stream: &str) {
    let mut last: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
    for line in lines {
        let (Some(who), Some(epoch), Some(seq)) = (field(line, stream), field(line, "epoch"), field(line, "seq"))
        else {
            continue;
        };
        let position = (epoch.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap());
        if let Some(previous) = last.insert(who, position) {
            assert!(position > previous, "{stream} {who}: {position:?} after {previous:?} in {lines:#?}");
        }
    }
}

/// Puts `value` into key `k` through `admin` and waits (each line within
/// `step`) until every pid in `pids` printed it on `master`'s output
/// (`config_center`'s `pid=.. key=k value=.. epoch=..` lines); returns the
/// Leader epochs the values came with.
pub async fn put_and_expect(
    master: &mut Proc,
    admin: &tandem::registry::RegistryClient,
    value: &str,
    pids: &std::collections::HashSet<u32>,
    step: Duration,
) -> std::collections::HashSet<u64> {
    admin.put("k", value.to_string()).await.expect("put");
    let mut waiting = pids.clone();
    let mut epochs = std::collections::HashSet::new();
    while !waiting.is_empty() {
        let line = master.expect_line(step, |l| field(l, "value") == Some(value)).await;
        waiting.remove(&field(&line, "pid").unwrap().parse::<u32>().unwrap());
        epochs.insert(field(&line, "epoch").unwrap().parse().unwrap());
    }
    epochs
}

/// Waits (up to `step`) until the registry behind `admin` sees one client
/// connection (the Leader's; the asking one is not counted) with one watch.
pub async fn one_upstream_connection(admin: &tandem::registry::RegistryClient, step: Duration) {
    poll_until(step, "one upstream connection and one watch", || async {
        let stats = admin.stats().await.expect("registry stats");
        (stats.connections, stats.watches) == (1, 1)
    })
    .await;
}
