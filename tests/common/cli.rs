//! The `tandem` CLI from tests: run it against a test's own runtime dir, read
//! `status --json`, poll it.

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;

/// How long one `tandem` run may take.
const RUN: Duration = Duration::from_secs(30);

static FORK: Mutex<()> = Mutex::new(());

/// Held while spawning (and by a test while it writes an executable it will
/// run): a child forked while another thread holds a file open for writing
/// would keep it open, and exec'ing that file then fails with "text file busy".
pub fn forking() -> MutexGuard<'static, ()> {
    FORK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `tandem ARGS` with this runtime dir (at most 30 s).
pub async fn tandem(xdg: &Path, args: &[&str]) -> Output {
    tandem_as(xdg, args, None).await
}

/// [`tandem`] as another user (`uid`, also as the group), when given.
pub async fn tandem_as(xdg: &Path, args: &[&str], uid: Option<u32>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
    command
        .args(args)
        .env("XDG_RUNTIME_DIR", xdg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(uid) = uid {
        command.gid(uid).uid(uid);
    }
    let child = {
        let _fork = forking();
        command.spawn().expect("run tandem")
    };
    tokio::time::timeout(RUN, child.wait_with_output()).await.expect("tandem timed out").expect("tandem's output")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tandem status NAME --json`, parsed.
pub async fn status_json(xdg: &Path, name: &str) -> Vec<Value> {
    let out = tandem(xdg, &["status", name, "--json"]).await;
    assert!(out.status.success(), "tandem status --json failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("status --json is a JSON array")
}

/// Polls `status --json` until `done` holds, for at most `within`.
pub async fn status_until(
    xdg: &Path,
    name: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let rows = status_json(xdg, name).await;
        if done(&rows) {
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached; last status: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workers' pids, by slot.
pub fn worker_pids(rows: &[Value]) -> Vec<u64> {
    rows.iter().filter(|r| r["role"] == "worker").map(|r| r["pid"].as_u64().expect("worker pid")).collect()
}
