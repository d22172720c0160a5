//! The `tandem-registry` binary, as separate processes talking to a served registry.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::LIMIT;
use tandem_testkit::{Lines, ProcessGuard, eventually, within};

const BIN: &str = env!("CARGO_BIN_EXE_tandem-registry");

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(10);

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env("RUST_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    command
}

/// Spawns a long-running command: the process (killed by PID and reaped when
/// dropped) and its stdout lines.
fn spawn(args: &[&str]) -> (ProcessGuard, Lines) {
    let mut child = ProcessGuard::new(command(args).spawn().expect("spawns tandem-registry"));
    let mut lines = Lines::new(format!("tandem-registry {args:?}"));
    lines.read_blocking(child.child().stdout.take().expect("piped stdout"));
    (child, lines)
}

/// The next line of a child's stdout, within [`STEP`].
async fn next_line(lines: &mut Lines) -> String {
    lines.expect_line(STEP, |_| true).await
}

/// `serve --listen 127.0.0.1:0`; returns the process and the address from its first line.
async fn serve() -> (ProcessGuard, String) {
    let (server, mut lines) = spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let first = next_line(&mut lines).await;
    let addr = first.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    (server, addr.to_owned())
}

/// Waits (within [`STEP`]) for a guarded child to exit; returns its exit code.
async fn exit_code(child: &mut ProcessGuard, what: &str) -> Option<i32> {
    let mut status = None;
    eventually(STEP, what, || {
        status = child.child().try_wait().expect("waits");
        std::future::ready(status.is_some())
    })
    .await;
    status.and_then(|s| s.code())
}

/// Runs a command to completion (within [`STEP`]); returns its exit code and stdout.
async fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut child = ProcessGuard::new(command(args).spawn().expect("spawns tandem-registry"));
    let code = exit_code(&mut child, &format!("{args:?} to finish")).await;
    let mut out = String::new();
    if let Some(mut stdout) = child.child().stdout.take() {
        stdout.read_to_string(&mut out).expect("reads stdout");
    }
    (code, out)
}

async fn stats(addr: &str) -> serde_json::Value {
    let (code, out) = run(&["stats", "--server", addr]).await;
    assert_eq!(code, Some(0));
    serde_json::from_str(out.trim()).expect("stats is one JSON object")
}

#[tokio::test]
async fn put_and_get_round_trip_between_processes() {
    within(LIMIT, async {
        let (_server, addr) = serve().await;
        assert_eq!(run(&["put", "--server", &addr, "app/db.url", "postgres://db/app"]).await, (Some(0), "2\n".into()));
        assert_eq!(run(&["get", "--server", &addr, "app/db.url"]).await, (Some(0), "postgres://db/app\n".into()));
        assert_eq!(run(&["get", "--server", &addr, "app/absent"]).await, (Some(1), String::new()));
        assert_eq!(run(&["delete", "--server", &addr, "app/db.url"]).await, (Some(0), "3\n".into()));
        assert_eq!(run(&["get", "--server", &addr, "app/db.url"]).await, (Some(1), String::new()));
    })
    .await;
}

#[tokio::test]
async fn a_running_watch_prints_later_puts_and_deletes() {
    within(LIMIT, async {
        let (_server, addr) = serve().await;
        let (_watch, mut lines) = spawn(&["watch", "--server", &addr, "app/"]);
        // The watch is registered once the server counts it.
        eventually(STEP, "the watch is registered", || async { stats(&addr).await["watches"] == 1 }).await;
        assert_eq!(run(&["put", "--server", &addr, "app/a", "hello world"]).await.0, Some(0));
        assert_eq!(run(&["put", "--server", &addr, "other/b", "ignored"]).await.0, Some(0));
        assert_eq!(run(&["delete", "--server", &addr, "app/a"]).await.0, Some(0));
        assert_eq!(run(&["put", "--server", &addr, "app/c", "3"]).await.0, Some(0));
        assert_eq!(next_line(&mut lines).await, "2 put app/a hello world");
        assert_eq!(next_line(&mut lines).await, "4 delete app/a");
        assert_eq!(next_line(&mut lines).await, "5 put app/c 3");

        // A second watch from an old revision replays what it missed.
        let (_replay, mut replayed) = spawn(&["watch", "--server", &addr, "app/", "--from", "3"]);
        assert_eq!(next_line(&mut replayed).await, "4 delete app/a");
        assert_eq!(next_line(&mut replayed).await, "5 put app/c 3");
    })
    .await;
}

#[tokio::test]
async fn stats_counts_the_open_connections_of_other_processes() {
    within(LIMIT, async {
        let (_server, addr) = serve().await;
        let first = stats(&addr).await;
        assert_eq!(first["connections"], 0, "the asking connection is not counted: {first}");
        assert_eq!(first["accepted_total"], 1);
        let fields: Vec<&String> = first.as_object().expect("an object").keys().collect();
        assert_eq!(fields, ["accepted_total", "connections", "instances", "keys", "watches"]);

        let (_watch, _) = spawn(&["watch", "--server", &addr, ""]);
        let (registered, _) = spawn(&["register", "--server", &addr, "billing", "b1", "10.0.0.1:80", "--ttl", "5"]);
        eventually(STEP, "the watch and the instance are there", || async {
            let s = stats(&addr).await;
            s["watches"] == 1 && s["instances"] == 1
        })
        .await;
        let s = stats(&addr).await;
        assert_eq!(s["connections"], 2, "{s}");
        assert_eq!(run(&["discover", "--server", &addr, "billing"]).await, (Some(0), "b1 10.0.0.1:80\n".into()));

        // A killed registrant's connection closes, and its instance leaves with it.
        drop(registered);
        eventually(STEP, "the registrant is gone", || async {
            let s = stats(&addr).await;
            s["connections"] == 1 && s["instances"] == 0
        })
        .await;
        assert_eq!(run(&["discover", "--server", &addr, "billing"]).await, (Some(0), String::new()));
    })
    .await;
}

#[tokio::test]
async fn serve_exits_cleanly_on_sigterm() {
    within(LIMIT, async {
        let (mut server, addr) = serve().await;
        assert_eq!(run(&["put", "--server", &addr, "k", "v"]).await.0, Some(0));
        let pid = server.id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().expect("runs kill");
        assert!(kill.success());
        assert_eq!(exit_code(&mut server, "the server to exit after SIGTERM").await, Some(0));
    })
    .await;
}
