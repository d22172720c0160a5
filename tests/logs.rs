//! What an operator reads of a running cluster, checked on the real
//! `config_center` example and the real `tandem` binary: each lifecycle event
//! logged once (stderr) and never printed again (stdout is the demo's own
//! output); the stop table and `tandem status` in one format; every metric
//! sample labelled with the cluster's name.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir), so the
//! cluster names are its own.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::{forking, stderr, stdout, tandem};
use common::{example, field, private_dir};
use nix::sys::signal::Signal;
use tandem::cluster::control::ProcessInfo;
use tandem_testkit::{Lines, ProcessGuard, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);

/// The marker of a cluster event's log line: `<time> <LEVEL> <span>: tandem_cluster::events: <the event>`.
const EVENTS: &str = " tandem_cluster::events: ";

/// The demo, its stdout and its stderr read apart.
struct Demo {
    guard: ProcessGuard,
    out: Lines,
    err: Lines,
}

impl Demo {
    /// `config_center --name NAME ARGS`, logging in the plain format at INFO.
    fn start(xdg: &std::path::Path, name: &str, args: &[&str]) -> Demo {
        let mut command = Command::new(example("config_center"));
        command
            .args(["--name", name])
            .args(args)
            .env("XDG_RUNTIME_DIR", xdg)
            .env_remove("RUST_LOG")
            .env_remove("TANDEM_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = {
            let _fork = forking();
            command.spawn().expect("spawn config_center")
        };
        let mut guard = ProcessGuard::with_grace(child, Duration::from_secs(5));
        let pid = guard.id();
        let (mut out, mut err) = (Lines::new(format!("stdout of {pid}")), Lines::new(format!("stderr of {pid}")));
        out.read_blocking(guard.child().stdout.take().expect("stdout"));
        err.read_blocking(guard.child().stderr.take().expect("stderr"));
        Demo { guard, out, err }
    }

    /// Waits for the log line of an event starting with `prefix`; returns the event's text.
    async fn event(&mut self, prefix: &str) -> String {
        let line = self.err.expect_line(STEP, |l| event_text(l).is_some_and(|e| e.starts_with(prefix))).await;
        event_text(&line).unwrap_or_default().to_owned()
    }

    fn signal(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.guard.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the master");
    }

    /// Waits for the master to exit (it must succeed), then reads both streams to their end.
    async fn finish(&mut self) {
        let mut status = None;
        let guard = &mut self.guard;
        eventually(STEP, "the master to exit", || {
            status = guard.child().try_wait().expect("wait");
            std::future::ready(status.is_some())
        })
        .await;
        assert!(status.is_some_and(|s| s.success()), "master exit: {status:?}");
        self.out.rest(STEP).await;
        self.err.rest(STEP).await;
    }
}

/// The event a log line carries, if it is a cluster event's line.
fn event_text(line: &str) -> Option<&str> {
    line.find(EVENTS).map(|at| &line[at + EVENTS.len()..])
}

/// Whether `line` says `text` (not as the start of a longer number or word:
/// `pid=12` is not said by `pid=123`).
fn says(line: &str, text: &str) -> bool {
    line.match_indices(text).any(|(at, _)| !line[at + text.len()..].starts_with(|c: char| c.is_ascii_alphanumeric()))
}

#[tokio::test]
async fn each_cluster_event_is_logged_once_on_stderr_and_stdout_is_the_demos_output() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let mut demo = Demo::start(xdg.path(), "events-once", &["--workers", "2"]);
        let ready = demo.event("cluster ready: ").await;
        let agent: i32 = field(&ready, "agent").unwrap().parse().unwrap();
        let worker: i32 = field(&ready, "workers").unwrap().split(',').next().unwrap().parse().unwrap();
        demo.out.expect_line(STEP, |l| l.starts_with("upstream connections: ")).await;

        // A crash of each kind, a reload, a stop: each event is logged once.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGKILL).unwrap();
        demo.event("worker restarted: worker=1 ").await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), Signal::SIGKILL).unwrap();
        demo.event("agent restarted: ").await;
        demo.signal(Signal::SIGHUP);
        demo.event("reload done: ").await;
        demo.signal(Signal::SIGTERM);
        demo.finish().await;

        let (out, err) = (&demo.out.seen, &demo.err.seen);
        let events: Vec<&str> = err.iter().filter_map(|l| event_text(l)).collect();
        let all = || out.iter().chain(err.iter());
        for kind in [
            "cluster ready:",
            "exited: worker 1 ",
            "worker restarted:",
            "exited: agent ",
            "agent restarted:",
            "reload started:",
            "worker replaced:",
            "reload done:",
            "shutdown started:",
        ] {
            assert!(events.iter().any(|e| e.starts_with(kind)), "no `{kind}` event logged:\n{}", err.join("\n"));
        }
        let mut counted = 0;
        for event in &events {
            let lines: Vec<&String> = all().filter(|l| says(l, event)).collect();
            assert_eq!(lines.len(), 1, "`{event}` said {} times:\n{lines:#?}", lines.len());
            counted += 1;
        }
        assert!(counted >= 10, "{counted} events: {events:#?}");
        // The ready line's pids are said once in the whole output, by the event.
        assert_eq!(all().filter(|l| l.contains("cluster ready")).count(), 1, "{err:#?}");
        // stdout: the demo's own lines only, the upstream count once.
        for line in out {
            assert!(
                line.starts_with("worker=") || line.starts_with("upstream connections: "),
                "not the demo's output on stdout: {line}"
            );
        }
        assert_eq!(out.iter().filter(|l| l.starts_with("upstream connections: ")).count(), 1, "{out:#?}");
        assert!(out.iter().any(|l| l.starts_with("worker=") && field(l, "value").is_some()), "{out:#?}");
    })
    .await
    .expect("test timed out")
}

/// The table's lines in `text`: from its heading to the first line that is not a row.
fn table(text: &[String], from: usize) -> Vec<String> {
    let mut lines = vec![text[from].clone()];
    lines.extend(
        text[from + 1..]
            .iter()
            .take_while(|l| ["master ", "agent ", "worker "].iter().any(|r| l.starts_with(r)))
            .cloned(),
    );
    lines
}

#[tokio::test]
async fn tandem_status_and_the_stop_table_print_the_same_columns() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "table-it";
        let mut demo = Demo::start(xdg.path(), name, &["--workers", "2"]);
        demo.event("cluster ready: ").await;

        let out = tandem(xdg.path(), &["status", name]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let status: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        let status = table(&status, 0);
        assert_eq!(status.len(), 5, "{status:#?}");

        let out = tandem(xdg.path(), &["stop", name]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        demo.finish().await;
        let err = &demo.err.seen;
        let at = err.iter().position(|l| l.starts_with("ROLE ")).unwrap_or_else(|| panic!("no stop table:\n{err:#?}"));
        let stop = table(err, at);
        assert_eq!(stop.len(), 5, "{stop:#?}");

        // One heading, the documented one, for both.
        assert_eq!(status[0], stop[0]);
        assert_eq!(stop[0], ProcessInfo::TABLE_HEADER);
        let columns: Vec<&str> = stop[0].split_whitespace().collect();
        assert_eq!(columns, ["ROLE", "SLOT", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "RSS", "LAST", "EXIT"]);
        // The same rows, in the same order: running in one, ended in the other.
        for (running, ended) in status[1..].iter().zip(&stop[1..]) {
            let (running, ended): (Vec<&str>, Vec<&str>) =
                (running.split_whitespace().collect(), ended.split_whitespace().collect());
            assert_eq!(running[..2], ended[..2], "role and slot: {status:#?} {stop:#?}");
            if running[0] == "master" {
                assert_eq!((running[2], ended[3]), (ended[2], "stopping"), "{stop:#?}");
                continue;
            }
            assert_eq!(&running[3..], ["online", "0", running[5], running[6], running[7], "-"], "{status:#?}");
            assert_eq!(&ended[2..], ["-", "stopped", "0", "-", "-", "-", "code", "0"], "{stop:#?}");
        }
        // Every line of either fits 80 columns.
        assert!(status.iter().chain(&stop).all(|l| l.len() <= 80), "{status:#?} {stop:#?}");
    })
    .await
    .expect("test timed out")
}

/// GET /metrics over a plain HTTP/1.0 connection; returns the body.
async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test]
async fn every_metric_sample_carries_the_clusters_name() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "label-it";
        let mut demo = Demo::start(xdg.path(), name, &["--workers", "1", "--metrics", "127.0.0.1:0"]);
        let line = demo.out.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
        let addr = line.trim_start_matches("metrics on ").to_owned();
        demo.event("cluster ready: ").await;

        // Once the agent reports, every family is there (the Leader's too).
        let deadline = tokio::time::Instant::now() + STEP;
        let text = loop {
            let text = scrape(&addr).await;
            if text.contains("tandem_leader_call_duration_seconds_bucket") {
                break text;
            }
            assert!(tokio::time::Instant::now() < deadline, "no Leader metrics yet:\n{text}");
            tokio::time::sleep(tandem_testkit::POLL_INTERVAL).await;
        };
        let label = format!("cluster=\"{name}\"");
        let samples: Vec<&str> = text.lines().filter(|l| l.starts_with("tandem_")).collect();
        for sample in &samples {
            assert!(sample.contains(&label), "a sample without {label}: {sample}");
        }
        let families: std::collections::BTreeSet<&str> =
            samples.iter().map(|s| s.split(['{', ' ']).next().unwrap_or_default()).collect();
        for family in [
            "tandem_process_up",
            "tandem_restarts_total",
            "tandem_reloads_total",
            "tandem_leader_followers",
            "tandem_upstream_up",
            "tandem_leader_call_duration_seconds_bucket",
            "tandem_metrics_connections_accepted_total",
        ] {
            assert!(families.contains(family), "no {family} in:\n{text}");
        }
        // The label goes with the others, not instead of them.
        assert!(
            samples.iter().any(|s| s.starts_with("tandem_process_up{")
                && s.contains(&label)
                && s.contains("role=\"worker\"")
                && s.contains("slot=\"1\"")),
            "{text}"
        );
        demo.signal(Signal::SIGTERM);
        demo.finish().await;
    })
    .await
    .expect("test timed out")
}
