//! The `tandem-registry` binary, as separate processes talking to a served registry.

use std::io::{BufRead, BufReader, Lines, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tandem-registry");

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(10);

/// A spawned process, killed (by PID) and reaped when dropped.
struct Spawned {
    child: Child,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of a child's stdout, read on a thread so reads can time out.
struct LineReader {
    lines: mpsc::Receiver<String>,
}

impl LineReader {
    fn new(stdout: ChildStdout) -> Self {
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let lines: Lines<BufReader<ChildStdout>> = BufReader::new(stdout).lines();
            for line in lines.map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        LineReader { lines }
    }

    fn next(&self) -> String {
        self.lines.recv_timeout(STEP).expect("a line within the time limit")
    }
}

fn spawn(args: &[&str]) -> (Spawned, LineReader) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawns tandem-registry");
    let stdout = child.stdout.take().expect("piped stdout");
    (Spawned { child }, LineReader::new(stdout))
}

/// `serve --listen 127.0.0.1:0`; returns the process and the address from its first line.
fn serve() -> (Spawned, String) {
    let (server, lines) = spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let first = lines.next();
    let addr = first.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    (server, addr.to_owned())
}

/// Runs a command to completion (within [`STEP`]); returns its exit code and stdout.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawns tandem-registry");
    let mut spawned = Spawned { child };
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(status) = spawned.child.try_wait().expect("waits") {
            let mut out = String::new();
            if let Some(mut stdout) = spawned.child.stdout.take() {
                stdout.read_to_string(&mut out).expect("reads stdout");
            }
            return (status.code(), out);
        }
        assert!(Instant::now() < deadline, "{args:?} did not finish in time");
        thread::sleep(Duration::from_millis(10));
    }
}

fn stats(addr: &str) -> serde_json::Value {
    let (code, out) = run(&["stats", "--server", addr]);
    assert_eq!(code, Some(0));
    serde_json::from_str(out.trim()).expect("stats is one JSON object")
}

/// Polls `condition` for up to [`STEP`].
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(Instant::now() < deadline, "still not true: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn put_and_get_round_trip_between_processes() {
    let (_server, addr) = serve();
    assert_eq!(run(&["put", "--server", &addr, "app/db.url", "postgres://db/app"]), (Some(0), "2\n".into()));
    assert_eq!(run(&["get", "--server", &addr, "app/db.url"]), (Some(0), "postgres://db/app\n".into()));
    assert_eq!(run(&["get", "--server", &addr, "app/absent"]), (Some(1), String::new()));
    assert_eq!(run(&["delete", "--server", &addr, "app/db.url"]), (Some(0), "3\n".into()));
    assert_eq!(run(&["get", "--server", &addr, "app/db.url"]), (Some(1), String::new()));
}

#[test]
fn a_running_watch_prints_later_puts_and_deletes() {
    let (_server, addr) = serve();
    let (_watch, lines) = spawn(&["watch", "--server", &addr, "app/"]);
    // The watch is registered once the server counts it.
    eventually("the watch is registered", || stats(&addr)["watches"] == 1);
    assert_eq!(run(&["put", "--server", &addr, "app/a", "hello world"]).0, Some(0));
    assert_eq!(run(&["put", "--server", &addr, "other/b", "ignored"]).0, Some(0));
    assert_eq!(run(&["delete", "--server", &addr, "app/a"]).0, Some(0));
    assert_eq!(run(&["put", "--server", &addr, "app/c", "3"]).0, Some(0));
    assert_eq!(lines.next(), "2 put app/a hello world");
    assert_eq!(lines.next(), "4 delete app/a");
    assert_eq!(lines.next(), "5 put app/c 3");

    // A second watch from an old revision replays what it missed.
    let (_replay, replayed) = spawn(&["watch", "--server", &addr, "app/", "--from", "3"]);
    assert_eq!(replayed.next(), "4 delete app/a");
    assert_eq!(replayed.next(), "5 put app/c 3");
}

#[test]
fn stats_counts_the_open_connections_of_other_processes() {
    let (_server, addr) = serve();
    let first = stats(&addr);
    assert_eq!(first["connections"], 0, "the asking connection is not counted: {first}");
    assert_eq!(first["accepted_total"], 1);
    let fields: Vec<&String> = first.as_object().expect("an object").keys().collect();
    assert_eq!(fields, ["accepted_total", "connections", "instances", "keys", "watches"]);

    let (_watch, _) = spawn(&["watch", "--server", &addr, ""]);
    let (registered, _) = spawn(&["register", "--server", &addr, "billing", "b1", "10.0.0.1:80", "--ttl", "5"]);
    eventually("the watch and the instance are there", || {
        let s = stats(&addr);
        s["watches"] == 1 && s["instances"] == 1
    });
    let s = stats(&addr);
    assert_eq!(s["connections"], 2, "{s}");
    assert_eq!(run(&["discover", "--server", &addr, "billing"]), (Some(0), "b1 10.0.0.1:80\n".into()));

    // A killed registrant's connection closes, and its instance leaves with it.
    drop(registered);
    eventually("the registrant is gone", || {
        let s = stats(&addr);
        s["connections"] == 1 && s["instances"] == 0
    });
    assert_eq!(run(&["discover", "--server", &addr, "billing"]), (Some(0), String::new()));
}

#[test]
fn serve_exits_cleanly_on_sigterm() {
    let (mut server, addr) = serve();
    assert_eq!(run(&["put", "--server", &addr, "k", "v"]).0, Some(0));
    let pid = server.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().expect("runs kill");
    assert!(kill.success());
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("waits") {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}
