//! The harness against the Rust follower (`tandem-follower`, through the
//! `tandem-conformance-rust-follower` driver): every case must pass. And
//! against a follower that does nothing: the harness reports failures.

use std::process::Stdio;
use std::time::Duration;

use tandem_conformance::CASES;
use tandem_testkit::within;
use tokio::process::Command;

const HARNESS: &str = env!("CARGO_BIN_EXE_tandem-conformance");
const RUST_FOLLOWER: &str = env!("CARGO_BIN_EXE_tandem-conformance-rust-follower");

/// Runs the harness to its end (killed with the test if it hangs); its exit code and stdout.
async fn harness(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(HARNESS)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run tandem-conformance");
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn the_rust_follower_passes_every_case() {
    within(Duration::from_secs(240), async {
        let (code, out) = harness(&["--", RUST_FOLLOWER]).await;
        println!("{out}");
        let passed: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("PASS ")).collect();
        let expected: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        assert_eq!(passed, expected, "every case passes, in order");
        assert_eq!(code, Some(0));
    })
    .await;
}

#[tokio::test]
async fn a_follower_that_does_nothing_fails_and_the_exit_code_says_so() {
    within(Duration::from_secs(60), async {
        let (code, out) = harness(&[
            "--case",
            "hello",
            "--case",
            "ping",
            "--step-ms",
            "300",
            "--",
            "sh",
            "-c",
            "exec cat >/dev/null",
        ])
        .await;
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("FAIL hello: "), "{out}");
        assert!(lines[1].starts_with("FAIL ping: "), "{out}");
        assert_eq!(lines[2], "0 passed, 2 failed");
        assert_eq!(code, Some(1));
    })
    .await;
}

#[tokio::test]
async fn list_names_every_case_and_a_wrong_name_is_a_usage_error() {
    within(Duration::from_secs(30), async {
        let (code, out) = harness(&["--list"]).await;
        assert_eq!(code, Some(0));
        let names: Vec<&str> = out.lines().filter_map(|l| l.split(" - ").next()).collect();
        assert_eq!(names, CASES.iter().map(|c| c.name).collect::<Vec<_>>());
        let (code, _) = harness(&["--case", "no_such_case", "--", "true"]).await;
        assert_eq!(code, Some(2));
        let (code, _) = harness(&[]).await;
        assert_eq!(code, Some(2));
    })
    .await;
}
