//! `agent_max_memory` applies to the hot standby (an agent-in-waiting has the
//! agent's limit): the real `cluster_fixture` example with a standby that
//! grows over the limit while the agent stays under it. The standby is
//! stopped (never promoted), restarted under its crash-loop policy, and the
//! agent is untouched.
//!
//! Run the whole package (`cargo test -p tandem-cluster`), which builds the
//! example.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_testkit::{Lines, ProcessGuard, field, private_dir};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(20);

fn fixture_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = profile_dir.join("examples").join("cluster_fixture");
    assert!(path.exists(), "{} is missing: run `cargo test -p tandem-cluster`", path.display());
    path
}

#[tokio::test]
async fn a_standby_over_the_agents_memory_limit_is_restarted_and_never_promoted() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let xdg = private_dir();
        // The agent (a few MiB) stays under 64 MiB; each standby touches 96 MiB once ready.
        let args = [
            "--workers",
            "1",
            "--standby",
            "--agent-max-memory-mib",
            "64",
            "--standby-bloat-mib",
            "96",
            "--grace-ms",
            "2000",
            "--name",
            "standby-memory-it",
        ];
        let mut command = Command::new(fixture_path());
        command.args(args).env("XDG_RUNTIME_DIR", xdg.path()).env("RUST_LOG", "warn");
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut master = ProcessGuard::with_grace(command.spawn().expect("spawn the fixture"), Duration::from_secs(5));
        let mut lines = Lines::new("the fixture");
        lines.read_blocking(master.child().stdout.take().expect("stdout"));

        let agent = lines.expect_line(STEP, |l| l.starts_with("agent up ")).await;
        let agent: u32 = field(&agent, "pid").unwrap().parse().unwrap();
        let ready = lines.expect_line(STEP, |l| l.starts_with("standby ready:")).await;
        let standby: u32 = field(&ready, "pid").unwrap().parse().unwrap();
        let over = lines.expect_line(STEP, |l| l.starts_with("memory limit: ")).await;
        assert!(over.starts_with(&format!("memory limit: standby pid={standby} ")), "{over}");
        assert!(over.contains("limit_mib=64.0"), "{over}");
        lines.expect_line(STEP, |l| l.starts_with(&format!("exited: standby (pid {standby})"))).await;
        lines.expect_line(STEP, |l| l.starts_with("restart scheduled: standby")).await;
        // A new standby, ready (and over the limit again in its turn).
        let again = lines.expect_line(STEP, |l| l.starts_with("standby ready:")).await;
        assert_ne!(field(&again, "pid").unwrap(), standby.to_string(), "{again}");
        // The agent never over its limit, never replaced; no standby promoted.
        let seen = lines.seen.join("\n");
        assert!(!seen.contains("memory limit: agent"), "{seen}");
        assert!(!seen.contains("standby promoted"), "{seen}");
        assert_eq!(lines.seen.iter().filter(|l| l.starts_with("agent up ")).count(), 1, "{seen}");
        assert!(tandem_testkit::alive(agent), "the agent {agent} was touched");
    })
    .await
    .expect("test timed out")
}
