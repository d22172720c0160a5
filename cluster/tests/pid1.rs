//! The master as a container's init: the real `cluster_fixture` run as PID 1
//! of a new PID namespace (`unshare --pid --fork`), whose worker leaves 100
//! orphans behind. None may stay a zombie, and SIGTERM still stops the
//! cluster in order with exit code 0.
//!
//! Needs `unshare` (util-linux) and either root or unprivileged user
//! namespaces; without them the test says it is skipped and why.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_testkit::{Lines, ProcessGuard, eventually, private_dir, within};

const LIMIT: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(20);
const ORPHANS: u32 = 100;

fn fixture_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = profile_dir.join("examples").join("cluster_fixture");
    assert!(path.exists(), "{} is missing: run `cargo test -p tandem-cluster`", path.display());
    path
}

/// The `unshare` arguments that give a new PID namespace here, if any do.
/// `--kill-child`: when `unshare` dies (the guard kills it by pid), its child,
/// the namespace's init, is SIGKILLed, and with it every process of the
/// namespace: a failing test leaves no cluster behind.
fn unshare_args() -> Option<Vec<&'static str>> {
    let mut args = vec!["--pid", "--fork", "--mount-proc", "--kill-child"];
    if !nix::unistd::geteuid().is_root() {
        args.splice(0..0, ["--user", "--map-root-user"]);
    }
    let works = Command::new("unshare")
        .args(&args)
        .arg("true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    works.then_some(args)
}

/// Fields of `/proc/<pid>/status`: (state letter, parent pid).
fn state_and_parent(pid: i32) -> Option<(char, i32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let state = field("State:")?.chars().next()?;
    let ppid = field("PPid:")?.parse().ok()?;
    Some((state, ppid))
}

/// The `sleep` children of `parent`, running or zombies (pids as this
/// namespace sees them), with their state.
fn sleeps_of(parent: i32) -> Vec<(i32, char)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep"))
        .filter_map(|pid| state_and_parent(pid).filter(|&(_, ppid)| ppid == parent).map(|(state, _)| (pid, state)))
        .collect()
}

#[tokio::test]
async fn as_pid_1_the_master_reaps_every_orphan_and_stops_in_order_on_sigterm() {
    let Some(unshare) = unshare_args() else {
        eprintln!("SKIPPED: `unshare --pid --fork` does not work here (needs util-linux, and root or user namespaces)");
        return;
    };
    within(LIMIT, async {
        let xdg = private_dir();
        let mut command = Command::new("unshare");
        command
            .args(&unshare)
            .arg(fixture_path())
            .args(["--workers", "2", "--orphans", &ORPHANS.to_string(), "--name", "pid1-it"])
            .env("XDG_RUNTIME_DIR", xdg.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn unshare");
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let mut guard = ProcessGuard::new(child);
        let mut lines = Lines::new("pid1");
        lines.read_blocking(stdout);
        lines.read_blocking(stderr);

        lines.expect_line(STEP, |l| l.contains("running as PID 1")).await;
        lines.expect_line(STEP, |l| l.contains(&format!("worker 1 orphans made={ORPHANS}"))).await;
        // The master, as this namespace sees it: unshare's only child.
        let unshare_pid = guard.id();
        let children = std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
            .expect("unshare's children");
        let master: i32 = children.split_whitespace().next().expect("the master").parse().unwrap();

        // The orphans were re-parented to the master; each exits 50 ms after it
        // was made, and its zombie must then be reaped: none may stay.
        eventually(STEP, "every orphan exited and reaped", || async { sleeps_of(master).is_empty() }).await;

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), nix::sys::signal::Signal::SIGTERM).unwrap();
        lines.expect_line(STEP, |l| l.contains("shutdown started")).await;
        let status = tokio::task::spawn_blocking(move || {
            let status = guard.child().wait();
            (guard, status)
        })
        .await
        .unwrap()
        .1
        .expect("wait for unshare");
        assert!(status.success(), "the master's exit: {status:?}");
    })
    .await
}
