//! `tandem logs` on the real `config_center` example started with
//! `--log-dir`: the last N lines of a worker, of the agent, of every process
//! (prefixed), `--follow` printing new lines as they come, and its errors (an
//! unknown cluster, a cluster without a log directory, an unknown worker).
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir), so the
//! cluster names are its own.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::{forking, stderr, stdout, tandem};
use common::{Proc, example, field, private_dir};
use tandem_testkit::{Lines, ProcessGuard, eventually};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

/// `config_center --name NAME --workers 2 [--log-dir DIR]`, the agent's Leader
/// logging at DEBUG (so that the agent has lines of its own).
async fn start(xdg: &Path, name: &str, log_dir: Option<&Path>) -> Proc {
    let mut args = vec!["--name", name, "--workers", "2"];
    if let Some(dir) = log_dir {
        args.extend(["--log-dir", dir.to_str().unwrap()]);
    }
    let env = [("XDG_RUNTIME_DIR", xdg.as_os_str()), ("RUST_LOG", "info,tandem_leader=debug".as_ref())];
    let mut demo = {
        let _fork = forking();
        Proc::spawn_with(&example("config_center"), &args, &env, false)
    };
    demo.expect_line(STEP, |l| l.starts_with("cluster ready: ")).await;
    demo
}

/// The `seq` of a value line a worker printed (`worker=1 ... seq=7 source=live`).
fn seq(line: &str) -> Option<u64> {
    field(line, "seq")?.parse().ok()
}

#[tokio::test]
async fn tandem_logs_prints_the_last_lines_of_a_worker_the_agent_or_every_process() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let logs = xdg.path().join("logs");
        let name = "logs-it";
        let _demo = start(xdg.path(), name, Some(&logs)).await;
        let file = logs.join(name).join("worker-2.log");
        eventually(STEP, "five values in worker 2's file", || {
            let n = std::fs::read_to_string(&file).unwrap_or_default().lines().filter(|l| seq(l).is_some()).count();
            std::future::ready(n >= 5)
        })
        .await;

        let out = tandem(xdg.path(), &["logs", name, "--worker", "2", "--lines", "3"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines.iter().all(|l| l.starts_with("worker=2 ")), "{lines:#?}");
        let seqs: Vec<u64> = lines.iter().filter_map(|l| seq(l)).collect();
        assert_eq!(seqs.len(), 3, "{lines:#?}");
        assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "the last three, in order: {seqs:?}");
        // Those are the file's last lines (when it printed them).
        let text = std::fs::read_to_string(&file).unwrap();
        let in_file: Vec<&str> = text.lines().collect();
        let at = in_file.iter().position(|l| *l == lines[0]).expect("a line of the file");
        assert_eq!(in_file[at..at + 3], lines.iter().map(String::as_str).collect::<Vec<_>>()[..]);

        let out = tandem(xdg.path(), &["logs", name, "--agent", "--lines", "2"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let agent: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        assert_eq!(agent.len(), 2, "{agent:#?}");
        assert!(agent.iter().all(|l| l.contains("role=\"agent\"") || l.contains("tandem_leader")), "{agent:#?}");

        // Every process: N lines each, each prefixed with its process, agent first.
        let out = tandem(xdg.path(), &["logs", name, "--lines", "2"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let all: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        let prefixes: Vec<&str> = all.iter().map(|l| l.split(" | ").next().unwrap()).collect();
        assert_eq!(prefixes, ["agent", "agent", "worker-1", "worker-1", "worker-2", "worker-2"], "{all:#?}");
        assert!(all[2].starts_with("worker-1 | worker=1 ") && all[4].starts_with("worker-2 | worker=2 "), "{all:#?}");
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn tandem_logs_follow_prints_new_lines_as_they_come() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let logs = xdg.path().join("logs");
        let name = "follow-it";
        let _demo = start(xdg.path(), name, Some(&logs)).await;
        let file = logs.join(name).join("worker-1.log");
        eventually(STEP, "a value in worker 1's file", || {
            std::future::ready(std::fs::read_to_string(&file).unwrap_or_default().lines().any(|l| seq(l).is_some()))
        })
        .await;
        let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
        command
            .args(["logs", name, "--worker", "1", "--lines", "1", "--follow"])
            .env("XDG_RUNTIME_DIR", xdg.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = {
            let _fork = forking();
            command.spawn().expect("spawn tandem logs --follow")
        };
        // Killed (by pid) when the test ends, pass or fail.
        let mut follower = ProcessGuard::new(child);
        let mut lines = Lines::new("tandem logs --follow");
        lines.read_blocking(follower.child().stdout.take().expect("stdout"));
        let first = lines.expect_line(STEP, |l| seq(l).is_some()).await;
        let first_seq = seq(&first).unwrap();
        // The registry's writer sets a new value every second: printed as it comes.
        let next = lines.expect_line(STEP, |l| seq(l).is_some_and(|s| s > first_seq)).await;
        assert!(next.starts_with("worker=1 "), "{next}");
        let later = lines.expect_line(STEP, |l| seq(l).is_some_and(|s| s > first_seq + 1)).await;
        assert_eq!(seq(&later), Some(first_seq + 2), "no line skipped or repeated: {:#?}", lines.seen);
        assert!(follower.child().try_wait().expect("wait").is_none(), "still following");
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn tandem_logs_says_what_is_wrong() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let out = tandem(xdg.path(), &["logs", "nosuch"]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("no running cluster named \"nosuch\""), "{}", stderr(&out));

        let name = "no-logs-it";
        let _plain = start(xdg.path(), name, None).await;
        let out = tandem(xdg.path(), &["logs", name]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(&format!("cluster {name} keeps no log files")), "{}", stderr(&out));

        let logs = xdg.path().join("logs");
        let name = "bad-worker-it";
        let _demo = start(xdg.path(), name, Some(&logs)).await;
        let out = tandem(xdg.path(), &["logs", name, "--worker", "9"]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(&format!("cluster {name} has no worker 9")), "{}", stderr(&out));
        let out = tandem(xdg.path(), &["logs", name, "--worker", "1", "--agent"]).await;
        assert_eq!(out.status.code(), Some(2), "one process or the other: {}", stderr(&out));
    })
    .await
    .expect("test timed out")
}
