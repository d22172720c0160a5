//! Operating while running: `tandem scale` and `tandem restart` against the
//! real `http_config` and `config_center` examples and the real `tandem`
//! binary, under HTTP load on keep-alive connections, and every bad input.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir).

mod common;
#[path = "common/http_load.rs"]
mod http_load;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cli::{status_json, status_until, stderr, stdout, tandem};
use common::{Proc, alive, example, poll_until, private_dir};
use http_load::Load;
use serde_json::Value;
use tandem::cluster::control::{ControlClient, ControlError, Request};
use tandem::cluster::{ReloadError, ReplaceReason, ScaleTo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(30);
/// The load loop: keep-alive clients, each opening a new connection after 50
/// requests (so that new workers get connections too).
const LOAD: http_load::Config =
    http_load::Config { clients: 8, max_requests: 500_000, path: "/config/app.greeting", per_connection: Some(50) };

// ---- helpers ---------------------------------------------------------------------

/// The workers in `status --json`: (id, pid), by id.
fn workers(rows: &[Value]) -> Vec<(u64, Option<u64>)> {
    rows.iter().filter(|r| r["role"] == "worker").map(|r| (r["slot"].as_u64().unwrap(), r["pid"].as_u64())).collect()
}

fn row<'a>(rows: &'a [Value], role: &str, slot: Option<u64>) -> &'a Value {
    rows.iter()
        .find(|r| r["role"] == role && r["slot"].as_u64() == slot)
        .unwrap_or_else(|| panic!("no {role} {slot:?} in {rows:#?}"))
}

/// `tandem ARGS`, which must succeed; its stdout.
async fn ok(xdg: &Path, args: &[&str]) -> String {
    let out = tandem(xdg, args).await;
    assert!(out.status.success(), "tandem {args:?}: {}\n{}", stderr(&out), stdout(&out));
    stdout(&out)
}

/// `tandem ARGS`, which must fail with `code`; its stderr.
async fn refused(xdg: &Path, args: &[&str], code: i32) -> String {
    let out = tandem(xdg, args).await;
    assert_eq!(out.status.code(), Some(code), "tandem {args:?}: {}\n{}", stdout(&out), stderr(&out));
    stderr(&out)
}

/// GET /metrics; the value of `name` with `labels`.
async fn metric(addr: &str, name: &str, labels: &str) -> Option<f64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let wanted = |l: &&str| l.starts_with(&format!("{name}{{")) && labels.split(',').all(|kv| l.contains(kv));
    response.lines().find(wanted).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Starts `example` with `--name NAME` in `xdg`: the master, its HTTP
/// address (if it prints one) and its metrics address.
async fn start(example_name: &str, xdg: &Path, name: &str, extra: &[&str]) -> (Proc, Option<String>, String) {
    let mut args = vec!["--name", name, "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut master = Proc::spawn_with_env(&example(example_name), &args, &[("XDG_RUNTIME_DIR", xdg)]);
    let mut http = None;
    let metrics = loop {
        let line = master.expect_line(STEP, |l| l.starts_with("listening on ") || l.starts_with("metrics on ")).await;
        if let Some(addr) = line.strip_prefix("listening on ") {
            http = Some(addr.to_owned());
        } else {
            break line.trim_start_matches("metrics on ").to_owned();
        }
    };
    master.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
    (master, http, metrics)
}

// ---- scale -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_2_to_4_to_1_under_keep_alive_load_fails_no_request_shared() {
    tokio::time::timeout(TIMEOUT, scale_under_load("shared")).await.expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_2_to_4_to_1_under_keep_alive_load_fails_no_request_round_robin() {
    tokio::time::timeout(TIMEOUT, scale_under_load("round-robin")).await.expect("test timed out")
}

async fn scale_under_load(mode: &str) {
    let xdg = private_dir();
    let name = "scale-it";
    let (mut master, http, metrics) = start("http_config", xdg.path(), name, &["--workers", "2", "--mode", mode]).await;
    let http = http.expect("an HTTP address");
    let before = status_json(xdg.path(), name).await;
    let first: Vec<(u64, Option<u64>)> = workers(&before);
    assert_eq!(first.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(metric(&metrics, "tandem_workers_desired", "").await, Some(2.0));

    let load = Load::start(&http, LOAD);
    load.more(200).await;

    // Up: 2 -> 4. The answer comes once both new workers are ready.
    let out = ok(xdg.path(), &["scale", name, "4"]).await;
    assert!(out.contains("scaled from 2 to 4 workers"), "{out}");
    let rows = status_json(xdg.path(), name).await;
    let now = workers(&rows);
    assert_eq!(now.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{rows:#?}");
    assert!(rows.iter().filter(|r| r["role"] == "worker").all(|r| r["state"] == "online"), "{rows:#?}");
    assert_eq!(&now[..2], &first[..], "workers 1 and 2 untouched");
    let added: Vec<u64> = now[2..].iter().map(|w| w.1.unwrap()).collect();
    for (id, pid) in [(3, added[0]), (4, added[1])] {
        assert!(out.contains(&format!("worker {id}: started, pid {pid}, ready")), "{out}");
    }
    let event = master.expect_line(STEP, |l| l.starts_with("scaled: from=2 to=4 ")).await;
    let pids: Vec<String> = now.iter().map(|w| w.1.unwrap().to_string()).collect();
    assert!(event.ends_with(&format!(" workers={}", pids.join(","))), "{event}");
    // The new workers serve.
    load.seen.mark().await;
    poll_until(STEP, "a new worker answering", || async {
        let after = load.seen.pids_after_mark.lock().await;
        added.iter().any(|p| after.contains(&(*p as u32)))
    })
    .await;

    // Down: 4 -> 1 (-3): workers 4, 3, 2 drain and exit with code 0.
    let out = ok(xdg.path(), &["scale", name, "-3"]).await;
    assert!(out.contains("scaled from 4 to 1 workers"), "{out}");
    let removed = [(4, now[3].1.unwrap()), (3, now[2].1.unwrap()), (2, now[1].1.unwrap())];
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(": stopped,")).collect();
    assert_eq!(
        lines,
        removed
            .iter()
            .map(|(id, pid)| format!("worker {id}: stopped, pid {pid}, exited with code 0"))
            .collect::<Vec<_>>(),
        "the highest ids first, each drained (code 0):\n{out}"
    );
    for (_, pid) in removed {
        assert!(!alive(pid as i32), "removed worker {pid} still alive");
    }
    let rows = status_json(xdg.path(), name).await;
    assert_eq!(workers(&rows), [first[0]], "{rows:#?}");
    load.seen.mark().await;
    load.more(200).await;
    let seen = load.finish().await;
    let failed = seen.failed.load(Ordering::Relaxed);
    eprintln!("scale 2 -> 4 -> 1 ({mode}): {} requests answered, {failed} failed", seen.ok.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "failed requests: {:?}", seen.errors.lock().await);
    let answering = seen.pids_after_mark.lock().await.clone();
    assert_eq!(answering, HashSet::from([first[0].1.unwrap() as u32]), "only worker 1 answers after the scale down");

    // The metrics: the count asked for, one scale each way.
    assert_eq!(metric(&metrics, "tandem_workers_desired", "").await, Some(1.0));
    assert_eq!(metric(&metrics, "tandem_scale_total", "direction=\"up\"").await, Some(1.0));
    assert_eq!(metric(&metrics, "tandem_scale_total", "direction=\"down\"").await, Some(1.0));

    // And back up by +1: the new worker takes id 2 again.
    let out = ok(xdg.path(), &["scale", name, "+1"]).await;
    assert!(out.contains("scaled from 1 to 2 workers"), "{out}");
    let rows = status_json(xdg.path(), name).await;
    assert_eq!(workers(&rows).iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(row(&rows, "worker", Some(2))["last_exit"], Value::Null, "a new slot: no exit of the removed one");

    master.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(master.wait(STEP).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_not_ready_in_time_is_removed_and_the_scale_fails() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "scale-hang";
        let hang = xdg.path().join("hang");
        let hang_arg = hang.to_str().unwrap();
        let (mut master, _, _) = start(
            "http_config",
            xdg.path(),
            name,
            &["--workers", "1", "--mode", "shared", "--ready-timeout", "2", "--hang-if-exists", hang_arg],
        )
        .await;
        std::fs::write(&hang, b"").unwrap();
        let why = refused(xdg.path(), &["scale", name, "2"], 1).await;
        assert!(
            why.contains("worker 2: new process ")
                && why.contains("was not ready within 2s (removed; the cluster runs 1 worker(s))"),
            "{why}"
        );
        let rows = status_json(xdg.path(), name).await;
        assert_eq!(workers(&rows).len(), 1, "{rows:#?}");
        let event = master.expect_line(STEP, |l| l.starts_with("scale failed: ")).await;
        assert!(event.contains("was not ready within 2s (removed; the cluster runs 1 worker(s))"), "{event}");
        // Once new workers can start, the same scale works.
        std::fs::remove_file(&hang).unwrap();
        let out = ok(xdg.path(), &["scale", name, "2"]).await;
        assert!(out.contains("scaled from 1 to 2 workers"), "{out}");
        master.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(master.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}

// ---- restart ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_one_worker_then_the_agent_gracefully() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "restart-it";
        let (mut master, _, metrics) = start("config_center", xdg.path(), name, &["--workers", "2"]).await;
        let rows = status_json(xdg.path(), name).await;
        let old = row(&rows, "worker", Some(1))["pid"].as_u64().unwrap();
        let other = row(&rows, "worker", Some(2))["pid"].as_u64().unwrap();
        let agent = row(&rows, "agent", None)["pid"].as_u64().unwrap();

        // Worker 1: its successor ready first, then it drains (code 0).
        let out = ok(xdg.path(), &["restart", name, "--worker", "1"]).await;
        let rows = status_json(xdg.path(), name).await;
        let w1 = row(&rows, "worker", Some(1));
        let new = w1["pid"].as_u64().unwrap();
        assert_ne!(new, old);
        assert_eq!(out.trim(), format!("worker 1: pid {old} -> {new} (ready; the old one drained)"));
        assert_eq!((w1["restarts"].as_u64(), w1["state"].as_str()), (Some(1), Some("online")), "{w1}");
        assert_eq!(w1["last_exit"], "code 0", "the old one drained: {w1}");
        assert!(!alive(old as i32), "the old worker {old} is gone");
        assert_eq!(row(&rows, "worker", Some(2))["pid"].as_u64(), Some(other), "worker 2 untouched");
        assert_eq!(row(&rows, "worker", Some(2))["restarts"], 0);
        // The table shows the same.
        let table = ok(xdg.path(), &["status", name]).await;
        let line = table.lines().find(|l| l.starts_with("worker") && l.split_whitespace().nth(1) == Some("1")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((cols[2], cols[4]), (new.to_string().as_str(), "1"), "{table}");
        assert!(line.ends_with("code 0"), "{table}");

        // The agent: a new pid and epoch; the workers stay and follow its Leader.
        let out = ok(xdg.path(), &["restart", name, "--agent"]).await;
        assert!(out.starts_with(&format!("agent restarted: old={agent} new=")), "{out}");
        assert!(out.contains(" epoch=2 old_epoch=1 "), "{out}");
        let rows = status_until(xdg.path(), name, STEP, "both workers following the new Leader", |rows| {
            let a = row(rows, "agent", None);
            a["epoch"] == 2 && a["leader"]["followers"] == 2
        })
        .await;
        let a = row(&rows, "agent", None);
        assert_ne!(a["pid"].as_u64(), Some(agent));
        assert_eq!(a["restarts"], 1);
        assert_eq!(workers(&rows), [(1, Some(new)), (2, Some(other))], "the workers were not restarted");

        assert_eq!(metric(&metrics, "tandem_restarts_requested_total", "role=\"worker\"").await, Some(1.0));
        assert_eq!(metric(&metrics, "tandem_restarts_requested_total", "role=\"agent\"").await, Some(1.0));
        master.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(master.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}

// ---- bad input -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_counts_unknown_workers_and_a_scale_during_a_reload_are_refused_typed() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "scale-bad";
        // Workers take 1.5 s to be ready: a reload runs long enough to be caught.
        let (mut master, _, _) =
            start("http_config", xdg.path(), name, &["--workers", "2", "--mode", "shared", "--ready-delay-ms", "1500"])
                .await;
        let before = workers(&status_json(xdg.path(), name).await);

        let why = refused(xdg.path(), &["scale", name, "0"], 1).await;
        assert!(why.contains("scaling 2 worker(s) to 0 would leave 0; a cluster keeps at least 1 worker"), "{why}");
        let why = refused(xdg.path(), &["scale", name, "-2"], 1).await;
        assert!(why.contains("scaling 2 worker(s) by -2 would leave 0"), "{why}");
        let why = refused(xdg.path(), &["scale", name, "-7"], 1).await;
        assert!(why.contains("would leave -5"), "{why}");
        let why = refused(xdg.path(), &["scale", name, "1025"], 1).await;
        assert!(why.contains("would make 1025, over the limit of 1024 workers"), "{why}");
        let why = refused(xdg.path(), &["scale", name, "+1023"], 1).await;
        assert!(why.contains("over the limit of 1024 workers"), "{why}");
        for bad in ["x", "2.5", "+-1", ""] {
            let why = refused(xdg.path(), &["scale", name, bad], 2).await;
            assert!(why.contains("expected N (to N workers), +K (K more) or -K (K fewer)"), "{bad:?}: {why}");
        }
        let why = refused(xdg.path(), &["restart", name, "--worker", "9"], 1).await;
        assert!(why.contains("no worker 9: the cluster runs 2 worker(s), ids 1 to 2"), "{why}");
        let why = refused(xdg.path(), &["restart", name, "--worker", "0"], 1).await;
        assert!(why.contains("no worker 0"), "{why}");
        refused(xdg.path(), &["restart", name], 2).await;
        refused(xdg.path(), &["restart", name, "--worker", "1", "--agent"], 2).await;

        // Typed on the socket.
        let socket = xdg.path().join("tandem").join(name).join("control.sock");
        let mut client = ControlClient::connect_to(&socket, name).await.unwrap();
        match client.call(Request::Scale { workers: ScaleTo::Remove(5) }).await {
            Err(ControlError::Reload(ReloadError::TooFewWorkers {
                current: 2,
                asked: ScaleTo::Remove(5),
                result: -3,
            })) => {}
            other => panic!("{other:?}"),
        }
        match client.call(Request::Restart { worker: 3 }).await {
            Err(ControlError::Reload(ReloadError::UnknownWorker { worker: 3, workers: 2 })) => {}
            other => panic!("{other:?}"),
        }

        // A scale (and a restart) during a reload: refused, typed, not queued.
        let reload = tokio::spawn({
            let xdg = xdg.path().to_owned();
            async move { tandem(&xdg, &["reload", name]).await }
        });
        master.expect_line(STEP, |l| l.starts_with("reload started:")).await;
        match client.call(Request::Scale { workers: ScaleTo::To(3) }).await {
            Err(ControlError::Reload(e @ ReloadError::InProgress { running: ReplaceReason::Reload })) => {
                assert!(e.is_retryable())
            }
            other => panic!("{other:?}"),
        }
        let why = refused(xdg.path(), &["scale", name, "3"], 1).await;
        assert!(why.contains("a reload is already running; this request was not started"), "{why}");
        let why = refused(xdg.path(), &["restart", name, "--worker", "1"], 1).await;
        assert!(why.contains("a reload is already running"), "{why}");
        let reloaded = reload.await.unwrap();
        assert!(reloaded.status.success(), "{}", stderr(&reloaded));

        // A reload during a scale: refused too.
        let scale = tokio::spawn({
            let xdg = xdg.path().to_owned();
            async move { tandem(&xdg, &["scale", name, "3"]).await }
        });
        status_until(xdg.path(), name, STEP, "worker 3 starting", |rows| workers(rows).len() == 3).await;
        let why = refused(xdg.path(), &["reload", name], 1).await;
        assert!(why.contains("a scale is already running"), "{why}");
        let why = refused(xdg.path(), &["scale", name, "1"], 1).await;
        assert!(why.contains("a scale is already running"), "{why}");
        let scaled = scale.await.unwrap();
        assert!(scaled.status.success(), "{}", stderr(&scaled));

        // Nothing the refusals asked for happened: the reload replaced both, the scale added one.
        let after = workers(&status_json(xdg.path(), name).await);
        assert_eq!(after.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(after[..2].iter().zip(&before).all(|(a, b)| a.1 != b.1), "reloaded: {before:?} -> {after:?}");
        master.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(master.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reuseport_listener_fixes_the_worker_count() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "scale-reuseport";
        let (mut master, _, _) =
            start("http_config", xdg.path(), name, &["--workers", "2", "--mode", "reuseport"]).await;
        for count in ["3", "-1"] {
            let why = refused(xdg.path(), &["scale", name, count], 1).await;
            assert!(
                why.contains(
                    "listener \"http\" uses reuseport (one socket per worker, bound at start for 2 workers): the \
                     worker count is fixed; listen with mode shared or round-robin to scale"
                ),
                "{why}"
            );
        }
        // The same count is no change: answered at once.
        let out = ok(xdg.path(), &["scale", name, "2"]).await;
        assert!(out.contains("scaled from 2 to 2 workers"), "{out}");
        // A restart needs no new socket: the successor takes the slot's.
        ok(xdg.path(), &["restart", name, "--worker", "2"]).await;
        assert_eq!(workers(&status_json(xdg.path(), name).await).len(), 2);
        master.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(master.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}
