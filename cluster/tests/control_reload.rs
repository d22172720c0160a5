//! The control socket's reload against the real fixture cluster: a successor
//! that fails to start ends the reload with the reason and rolls it back, so
//! every old worker keeps running.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_cluster::control::{ControlClient, ControlError, ProcessInfo, ReloadError, Request};
use tandem_cluster::{ExitReason, StartFailure};
use tandem_testkit::{Lines, ProcessGuard, within};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn fixture_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    profile_dir.join("examples").join("cluster_fixture")
}

async fn status(path: &std::path::Path, name: &str) -> Vec<ProcessInfo> {
    let mut client = ControlClient::connect_to(path, name).await.expect("connect");
    client.call_as(Request::Status).await.expect("status")
}

fn worker(rows: &[ProcessInfo], id: u32) -> &ProcessInfo {
    rows.iter().find(|r| r.role == "worker" && r.slot == Some(id)).expect("worker row")
}

#[tokio::test]
async fn a_failed_successor_fails_the_reload_and_spares_the_rest() {
    within(TEST_TIMEOUT, failed_reload()).await;
}

async fn failed_reload() {
    let xdg = std::env::temp_dir().join(format!("tandem-reload-it-{}", std::process::id()));
    std::fs::create_dir_all(&xdg).unwrap();
    let fail = xdg.join("fail");
    let name = "reload-it";
    let mut child = Command::new(fixture_path())
        .args(["--workers", "2", "--name", name, "--backoff-ms", "50", "--grace-ms", "2000"])
        .args(["--crash-loop-limit", "100", "--failed-retry-ms", "500"])
        .arg("--fail-start-file")
        .arg(&fail)
        .env("XDG_RUNTIME_DIR", &xdg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the fixture");
    let mut lines = Lines::new("the fixture");
    lines.read_blocking(child.stdout.take().unwrap());
    // The fixture's master, SIGKILLed and reaped (by pid) when dropped.
    let _master = ProcessGuard::new(child);
    lines.expect_line(Duration::from_secs(30), |l| l.starts_with("cluster ready")).await;
    let socket = xdg.join("tandem").join(name).join("control.sock");
    let before = status(&socket, name).await;
    assert!(before.iter().all(|r| r.state == "online"), "{before:?}");

    // From now on every new worker exits before it is ready.
    std::fs::write(&fail, b"").unwrap();
    let mut client = ControlClient::connect_to(&socket, name).await.unwrap();
    let failed = match client.call(Request::Reload).await {
        Err(ControlError::Reload(e)) => e,
        other => panic!("the reload should fail, got {other:?}"),
    };
    // Typed: the slot, its new process, why; nothing replaced before it.
    match &failed {
        ReloadError::Failed { worker: 1, new_pid: Some(new_pid), cause, replaced } => {
            assert_eq!(*cause, StartFailure::Exited(ExitReason::Code(3)), "{failed:?}");
            assert!(replaced.is_empty(), "{failed:?}");
            assert!(before.iter().all(|r| r.pid != Some(*new_pid)), "{failed:?}");
        }
        other => panic!("expected Failed for worker 1, got {other:?}"),
    }
    let error = failed.to_string();
    assert!(error.contains("worker 1"), "{error}");
    assert!(error.contains("before it was ready"), "{error}");
    assert!(error.contains("rolled back"), "{error}");

    // Rolled back: both old workers still serve, with their pids.
    let after = status(&socket, name).await;
    for id in [1, 2] {
        assert_eq!(worker(&after, id).pid, worker(&before, id).pid, "{after:?}");
        assert_eq!(worker(&after, id).state, "online", "{after:?}");
    }

    // Once starts succeed again, a reload replaces both.
    std::fs::remove_file(&fail).unwrap();
    let report = client.call(Request::Reload).await.expect("second reload");
    assert_eq!(report["replaced"].as_array().map(Vec::len), Some(2), "{report}");
    let _ = std::fs::remove_dir_all(&xdg);
}
