//! The `tandem` CLI from tests: run it against a test's own runtime dir, read
//! `status --json`, poll it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
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
    tandem_as(Path::new(env!("CARGO_BIN_EXE_tandem")), xdg, args, None).await
}

/// [`tandem`] from `program` (a copy of the binary), as another user (`uid`,
/// also as the group) when given: see [`copy_for_user`].
pub async fn tandem_as(program: &Path, xdg: &Path, args: &[&str], uid: Option<u32>) -> Output {
    let mut command = tokio::process::Command::new(program);
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

/// A copy of the `tandem` binary that user `uid` can execute, in `dir` (made
/// 0755), or why there can be none: the test binary's own copy lives in the
/// checkout's target directory, which another user may not be allowed to
/// enter (a checkout in root's home, or in a `mktemp -d` directory, is 0700).
/// Every directory above `dir` must let `uid` through; `dir` is best a fresh
/// one in the system's temp directory.
pub fn copy_for_user(dir: &Path, uid: u32) -> Result<PathBuf, String> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    if let Some(closed) = closed_to(dir, uid) {
        return Err(format!("{} is closed to uid {uid}", closed.display()));
    }
    let program = dir.join("tandem");
    // Written while no child is being forked (see `forking`).
    let _fork = forking();
    std::fs::copy(env!("CARGO_BIN_EXE_tandem"), &program).map_err(|e| format!("copy tandem: {e}"))?;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    Ok(program)
}

/// The first directory above `path` (itself included) that user `uid` (not
/// root) cannot search, if any: one that is not its own and lacks the
/// others' `x` bit. (Group membership is not looked at: `uid` is in no group
/// that owns a directory on the way unless it is its own group.)
pub fn closed_to(path: &Path, uid: u32) -> Option<PathBuf> {
    let mut at = Some(path);
    while let Some(dir) = at {
        let meta = std::fs::metadata(dir).ok()?;
        let searchable = if meta.uid() == uid { meta.mode() & 0o100 != 0 } else { meta.mode() & 0o001 != 0 };
        if !searchable {
            return Some(dir.to_owned());
        }
        at = dir.parent();
    }
    None
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
