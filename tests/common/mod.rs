//! Helpers for multi-process tests: spawn the real example binaries, read their
//! lines with deadlines, and always kill what was spawned.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

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
pub struct Proc {
    pub pid: i32,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far, in order.
    pub seen: Vec<String>,
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

    /// Spawns with extra environment variables; with `stderr`, stderr lines
    /// join the stdout lines, prefixed with `stderr: `.
    pub fn spawn_with(program: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)], stderr: bool) -> Proc {
        let mut command = Command::new(program);
        command.args(args).stdout(Stdio::piped()).kill_on_drop(true);
        command.stderr(if stderr { Stdio::piped() } else { Stdio::inherit() });
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let pid = child.id().expect("pid") as i32;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(err) = child.stderr.take() {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(err).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    eprintln!("[{pid}] {line}");
                    if tx.send(format!("stderr: {line}")).is_err() {
                        break;
                    }
                }
            });
        }
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { pid, child, lines, seen: Vec::new() }
    }

    /// Waits for the process to exit (at most `within`) and collects every line it wrote.
    pub async fn finish(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = self.wait(within).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            self.seen.push(line);
        }
        status
    }

    /// Waits (at most `within`) for a line matching `predicate`; returns it.
    pub async fn expect_line(&mut self, within: Duration, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if predicate(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!("pid {} exited; lines so far: {:#?}", self.pid, self.seen),
                Err(_) => {
                    panic!("pid {}: no matching line within {within:?}; lines so far: {:#?}", self.pid, self.seen)
                }
            }
        }
    }

    /// Moves every line already written into `seen`, without waiting.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
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

impl Drop for Proc {
    fn drop(&mut self) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // already exited and reaped: the pid may belong to someone else now
        }
        let pid = nix::unistd::Pid::from_raw(self.pid);
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
                // Exited and reaped (or not ours to reap any more).
                _ => return,
            }
        }
        self.signal(nix::sys::signal::Signal::SIGKILL);
        // Reap it so no zombie outlives the test.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
    }
}

/// Whether a process with this pid is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// A private (0700) temporary directory.
pub fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("tandem-it").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// Parses `k=v` fields of a line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

/// Polls `check` every 10 ms until it holds, for at most `within`.
pub async fn poll_until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// A free loopback port now (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
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
