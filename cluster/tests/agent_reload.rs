//! The agent's reload (`reload_agent` on the control socket) against the real
//! fixture cluster, run from a copy of its executable so the test can deploy
//! onto it: the agent fails over to a new process with a higher epoch while
//! the workers keep their pids; a reload of either kind is refused while a
//! workers' reload runs; a new agent that refuses to join (another IPC
//! version) fails the reload with the reason, and the supervisor brings the
//! agent back once the executable is fixed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_cluster::control::{ControlClient, ControlError, ProcessInfo, ReloadError, Request};
use tandem_cluster::{ExitReason, ReplaceReason, StartFailure};
use tokio::sync::mpsc;

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest wait for one step (a line, a state).
const STEP: Duration = Duration::from_secs(20);
const NAME: &str = "agent-reload-it";

fn fixture_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    profile_dir.join("examples").join("cluster_fixture")
}

/// The fixture's master, SIGKILLed and reaped (by pid) when dropped; its
/// children die with it (`PR_SET_PDEATHSIG`).
struct Master(Child);

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fixture's stdout, line by line.
struct Lines {
    rx: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn read(stdout: std::process::ChildStdout) -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            // Read to the end, even once nobody listens: a closed pipe would
            // make the fixture's own printing fail.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    async fn expect(&mut self, what: &str, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if predicate(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!("the fixture exited before {what}; lines: {:#?}", self.seen),
                Err(_) => panic!("no line for {what} within {STEP:?}; lines: {:#?}", self.seen),
            }
        }
    }
}

async fn status(socket: &Path) -> Vec<ProcessInfo> {
    let mut client = ControlClient::connect_to(socket, NAME).await.expect("connect");
    client.call_as(Request::Status).await.expect("status")
}

/// Polls `status` until `done` holds (at most `STEP`).
async fn status_until(socket: &Path, what: &str, done: impl Fn(&[ProcessInfo]) -> bool) -> Vec<ProcessInfo> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let rows = status(socket).await;
        if done(&rows) {
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached; last status: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Lines {
    /// Waits until every line of `wanted` has come, in any order.
    async fn expect_all(&mut self, wanted: Vec<String>) {
        let mut waiting = wanted;
        while !waiting.is_empty() {
            let what = waiting.join(" and ");
            let line = self.expect(&what, |l| waiting.iter().any(|w| w == l)).await;
            waiting.retain(|w| *w != line);
        }
    }
}

/// The lines each worker prints when it learns of a new agent.
fn told(pid: u32, epoch: u64) -> Vec<String> {
    [1, 2].map(|id| format!("worker {id} agent pid={pid} epoch={epoch} up=true")).into()
}

fn agent(rows: &[ProcessInfo]) -> &ProcessInfo {
    rows.iter().find(|r| r.role == "agent").expect("agent row")
}

fn worker_pids(rows: &[ProcessInfo]) -> Vec<Option<u32>> {
    rows.iter().filter(|r| r.role == "worker").map(|r| r.pid).collect()
}

async fn reload_agent(socket: &Path) -> Result<serde_json::Value, ControlError> {
    ControlClient::connect_to(socket, NAME).await.expect("connect").call(Request::ReloadAgent).await
}

/// Puts `contents` at `path` the way a deploy does: a new file renamed over the old.
fn deploy(path: &Path, contents: impl FnOnce(&Path)) {
    let next = path.with_extension("next");
    let _ = std::fs::remove_file(&next);
    contents(&next);
    std::fs::rename(&next, path).expect("rename over the executable");
}

#[tokio::test]
async fn the_agent_fails_over_refuses_during_a_reload_and_reports_a_failed_start() {
    tokio::time::timeout(TEST_TIMEOUT, agent_reload()).await.expect("test timed out");
}

async fn agent_reload() {
    let dir = tempfile::Builder::new().prefix("tandem-agent-reload").tempdir().expect("temp dir");
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // The copy is written and closed before anything is spawned (no ETXTBSY):
    // this file holds this one test.
    let good = dir.path().join("fixture.good");
    std::fs::copy(fixture_path(), &good).expect("copy the fixture");
    let exe = dir.path().join("fixture");
    deploy(&exe, |next| std::fs::hard_link(&good, next).unwrap());

    // Stubborn workers drain for the whole grace (2 s): a workers' reload
    // lasts long enough to ask for another one meanwhile.
    let mut child = Command::new(&exe)
        .args(["--workers", "2", "--name", NAME, "--stubborn", "--grace-ms", "2000", "--backoff-ms", "50"])
        .args(["--crash-loop-limit", "100", "--failed-retry-ms", "500"])
        .env("XDG_RUNTIME_DIR", &xdg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the fixture");
    let mut lines = Lines::read(child.stdout.take().unwrap());
    let _master = Master(child);
    lines.expect("cluster ready", |l| l.starts_with("cluster ready:")).await;
    let socket = xdg.join("tandem").join(NAME).join("control.sock");
    let before = status(&socket).await;
    let (old_agent, workers) = (agent(&before).pid.unwrap(), worker_pids(&before));
    assert_eq!(agent(&before).epoch, Some(1), "{before:#?}");
    assert_eq!(workers.len(), 2);

    // 1. The agent fails over: new pid, epoch 2, both workers told, same workers.
    let report = reload_agent(&socket).await.expect("agent reload");
    let new_agent = report["new_pid"].as_u64().unwrap() as u32;
    assert_eq!(report["old_pid"].as_u64(), Some(u64::from(old_agent)), "{report}");
    assert_eq!((report["old_epoch"].as_u64(), report["epoch"].as_u64()), (Some(1), Some(2)), "{report}");
    assert_ne!(new_agent, old_agent);
    // The master's event and the workers' lines come from different processes:
    // in any order.
    let mut wanted = told(new_agent, 2);
    wanted.push(format!("agent reloaded: old={old_agent} new={new_agent} epoch=2"));
    lines.expect_all(wanted).await;
    let after = status(&socket).await;
    let a = agent(&after);
    assert_eq!((a.pid, a.epoch, a.state.as_str(), a.restarts), (Some(new_agent), Some(2), "online", 1), "{after:#?}");
    assert_eq!(worker_pids(&after), workers, "the workers are not restarted by an agent reload");
    assert!(after.iter().filter(|r| r.role == "worker").all(|r| r.state == "online" && r.restarts == 0));

    // 2. One reload at a time: while the workers' reload drains worker 1's
    // stubborn predecessor, the agent's is refused and the agent stays.
    let workers_reload = tokio::spawn({
        let socket = socket.clone();
        async move { ControlClient::connect_to(&socket, NAME).await.expect("connect").call(Request::Reload).await }
    });
    status_until(&socket, "worker 1's successor started", |rows| {
        rows.iter().any(|r| r.role == "worker" && r.slot == Some(1) && r.restarts == 1)
    })
    .await;
    match reload_agent(&socket).await {
        Err(ControlError::Reload(e)) => {
            assert_eq!(e, ReloadError::InProgress { running: ReplaceReason::Reload });
            assert_eq!(e.to_string(), "a reload is already running; this request was not started", "{e}")
        }
        other => panic!("an agent reload during a workers' reload should be refused, got {other:?}"),
    }
    let report = workers_reload.await.unwrap().expect("the workers' reload");
    assert_eq!(report["replaced"].as_array().map(Vec::len), Some(2), "{report}");
    let reloaded = status(&socket).await;
    assert_eq!((agent(&reloaded).pid, agent(&reloaded).epoch), (Some(new_agent), Some(2)), "{reloaded:#?}");
    let workers = worker_pids(&reloaded);

    // 3. A new executable of another IPC version: the new agent refuses to
    // join (exit 111), the reload fails with that reason; the workers stay.
    deploy(&exe, |next| {
        std::fs::write(next, "#!/bin/sh\nexit 111\n").unwrap();
        std::fs::set_permissions(next, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    });
    let failed = match reload_agent(&socket).await {
        Err(ControlError::Reload(e)) => e,
        other => panic!("the agent reload should fail, got {other:?}"),
    };
    match &failed {
        ReloadError::AgentFailed { old_pid, new_pid: Some(refused), cause } => {
            assert_eq!(*old_pid, new_agent, "{failed:?}");
            assert!(*refused != new_agent && *refused != old_agent, "{failed:?}");
            assert_eq!(*cause, StartFailure::IpcMismatch(ExitReason::Code(111)), "{failed:?}");
        }
        other => panic!("expected AgentFailed, got {other:?}"),
    }
    let reason = failed.to_string();
    assert!(reason.contains("exited with code 111 before it was ready"), "{reason}");
    assert!(reason.contains("the executable on disk speaks another IPC version"), "{reason}");
    assert!(reason.contains(&format!("the old agent {new_agent} is stopped")), "{reason}");
    lines.expect("the failure event", |l| l.starts_with("reload failed: new agent ")).await;
    // 4. Fixed on disk: the supervisor's next restart brings the agent back,
    // with a higher epoch, to the same workers.
    deploy(&exe, |next| std::fs::hard_link(&good, next).unwrap());
    let back = status_until(&socket, "the agent back", |rows| {
        agent(rows).state == "online" && agent(rows).epoch.is_some_and(|e| e > 3)
    })
    .await;
    let epoch = agent(&back).epoch.unwrap();
    let pid = agent(&back).pid.unwrap();
    assert!(pid != new_agent && pid != old_agent, "{back:#?}");
    assert_eq!(worker_pids(&back), workers, "the workers are not restarted by a failed agent reload");
    lines.expect_all(told(pid, epoch)).await;
    // And the next agent reload works again.
    let report = reload_agent(&socket).await.expect("agent reload after the fix");
    assert_eq!(report["epoch"].as_u64(), Some(epoch + 1), "{report}");
}
