//! Operating a running cluster from outside: the real `config_center` example
//! and the real `tandem` binary (`ls`, `status`, `leader`, `reload`, `stop`),
//! `/metrics` scraped and parsed, and the logs an operator reads.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir), so the
//! clusters it starts and the names `tandem ls` lists are its own.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::cli::{status_json, status_until, stderr, stdout, tandem};
use common::{Proc, alive, example, field, private_dir};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);

fn worker(rows: &[Value], id: u64) -> &Value {
    rows.iter().find(|r| r["role"] == "worker" && r["slot"] == id).expect("worker row")
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

fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("the metrics parse")
}

/// The value of `name` whose labels include all of `labels`.
fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Scrapes until `done` holds (at most `STEP`).
async fn metrics_until(
    addr: &str,
    what: &str,
    done: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let text = scrape(addr).await;
        let parsed = parse_metrics(&text);
        if done(&parsed) {
            return parsed;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not reached; last scrape:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pids(rows: &[Value]) -> Vec<u32> {
    rows.iter().filter_map(|r| r["pid"].as_u64()).map(|p| p as u32).collect()
}

#[tokio::test]
async fn ls_status_leader_metrics_reload_and_stop() {
    tokio::time::timeout(TIMEOUT, operate()).await.expect("test timed out")
}

async fn operate() {
    let xdg = private_dir();
    let name = "ops-it";
    let mut cluster = Proc::spawn_with_env(
        &example("config_center"),
        &["--workers", "2", "--name", name, "--metrics", "127.0.0.1:0"],
        &[("XDG_RUNTIME_DIR", xdg.path())],
    );
    let metrics_line = cluster.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
    let addr = metrics_line.trim_start_matches("metrics on ").to_owned();
    let ready = cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
    let master: u32 = field(&ready, "master").unwrap().parse().unwrap();
    let agent: u32 = field(&ready, "agent").unwrap().parse().unwrap();

    // ls: the one cluster, its master, both workers online.
    let out = tandem(xdg.path(), &["ls"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let ls = stdout(&out);
    let row = ls.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} not in:\n{ls}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[1], cols[3], cols[4]), (master.to_string().as_str(), "2/2", "online"), "{ls}");

    // status --json: master, agent, two workers, with the documented fields.
    let rows = status_json(xdg.path(), name).await;
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert_eq!((rows[0]["role"].as_str(), rows[0]["pid"].as_u64()), (Some("master"), Some(u64::from(master))));
    assert_eq!((rows[1]["role"].as_str(), rows[1]["pid"].as_u64()), (Some("agent"), Some(u64::from(agent))));
    for row in &rows {
        assert_eq!(row["state"], "online", "{row}");
        assert_eq!(row["restarts"], 0, "{row}");
        assert!(row["uptime_ms"].as_u64().is_some(), "{row}");
        assert!(row["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0), "{row}");
        assert!(row["rss_bytes"].as_u64().is_some_and(|b| b > 1_000_000), "{row}");
    }
    assert_eq!(rows[1]["leader"]["followers"], 2, "{:#}", rows[1]);

    // kill -9 a worker: its slot restarts, counted.
    let victim = worker(&rows, 1)["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    let rows = status_until(xdg.path(), name, STEP, "worker 1 restarted", |rows| {
        let w = worker(rows, 1);
        w["restarts"] == 1 && w["state"] == "online" && w["pid"].as_u64() != Some(victim as u64)
    })
    .await;
    assert_eq!(worker(&rows, 2)["restarts"], 0);

    // The table fits 80 columns and shows the same.
    let out = tandem(xdg.path(), &["status", name]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.lines().all(|l| l.len() <= 80), "wider than 80 columns:\n{table}");
    let w1 = table.lines().find(|l| l.starts_with("worker") && l.split_whitespace().nth(1) == Some("1")).unwrap();
    assert_eq!(w1.split_whitespace().nth(4), Some("1"), "restarts of worker 1:\n{table}");
    assert!(table.contains("leader: epoch 1,"), "{table}");

    // /metrics: restarts after the kill, followers = workers (once worker 1's
    // successor connected), memory per process, the upstream, the histogram.
    let m =
        metrics_until(&addr, "followers back to 2", |m| metric(m, "tandem_leader_followers", &[]) == Some(2.0)).await;
    assert_eq!(metric(&m, "tandem_restarts_total", &[("role", "worker"), ("slot", "1")]), Some(1.0));
    assert_eq!(metric(&m, "tandem_restarts_total", &[("role", "worker"), ("slot", "2")]), Some(0.0));
    assert_eq!(metric(&m, "tandem_restarts_total", &[("role", "agent")]), Some(0.0));
    for slot in ["master", "agent", "1", "2"] {
        let rss = metric(&m, "tandem_process_resident_memory_bytes", &[("slot", slot)]);
        assert!(rss.is_some_and(|b| b > 1e6), "rss of {slot}: {rss:?}");
        assert!(metric(&m, "tandem_process_cpu_seconds_total", &[("slot", slot)]).is_some(), "cpu of {slot}");
    }
    assert_eq!(metric(&m, "tandem_upstream_up", &[("channel", "config")]), Some(1.0));
    assert_eq!(metric(&m, "tandem_leader_subscriptions", &[]), Some(2.0));
    assert_eq!(metric(&m, "tandem_reloads_total", &[("result", "ok")]), Some(0.0));
    assert!(metric(&m, "tandem_leader_events_total", &[]).is_some_and(|n| n >= 1.0));
    assert!(metric(&m, "tandem_messenger_messages_total", &[("kind", "request")]).is_some_and(|n| n >= 1.0));
    let histogram = m.samples.iter().find(|s| s.metric == "tandem_leader_call_duration_seconds");
    assert!(
        matches!(histogram.map(|s| &s.value), Some(prometheus_parse::Value::Histogram(_))),
        "no call latency histogram: {histogram:?}"
    );

    // leader --json: the followers are the two workers, over the socket; both
    // keys have both workers.
    let rows = status_json(xdg.path(), name).await;
    let out = tandem(xdg.path(), &["leader", name, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let leader: Value = serde_json::from_slice(&out.stdout).expect("leader --json is JSON");
    let mut follower_pids: Vec<u64> =
        leader["follower_list"].as_array().unwrap().iter().map(|f| f["pid"].as_u64().unwrap()).collect();
    follower_pids.sort();
    let mut worker_pids: Vec<u64> =
        [worker(&rows, 1), worker(&rows, 2)].iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    worker_pids.sort();
    assert_eq!(follower_pids, worker_pids, "{leader:#}");
    assert!(leader["follower_list"].as_array().unwrap().iter().all(|f| f["transport"] == "unix"), "{leader:#}");
    let config = leader["channels"].as_array().unwrap().iter().find(|c| c["name"] == "config").unwrap();
    let keys: Vec<(&str, u64)> = config["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["key"].as_str().unwrap(), k["subscribers"].as_u64().unwrap()))
        .collect();
    assert_eq!(keys, vec![("app.flags", 2), ("app.greeting", 2)], "{leader:#}");

    // A second cluster with the same name refuses to start, and says why.
    let second = tokio::process::Command::new(example("config_center"))
        .args(["--workers", "1", "--name", name])
        .env("XDG_RUNTIME_DIR", xdg.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(STEP, second).await.expect("second cluster did not exit").unwrap();
    assert!(!second.status.success());
    let why = stderr(&second);
    assert!(why.contains(&format!("a cluster named \"{name}\" is already running (master pid {master})")), "{why}");

    // reload: both workers replaced one by one, exit 0.
    let out = tandem(xdg.path(), &["reload", name]).await;
    assert!(out.status.success(), "reload failed: {}{}", stdout(&out), stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("reloaded 2 workers"), "{report}");
    let after = status_json(xdg.path(), name).await;
    for id in [1, 2] {
        let (before, now) = (worker(&rows, id), worker(&after, id));
        assert_ne!(before["pid"], now["pid"], "worker {id} not replaced");
        assert_eq!(now["state"], "online");
        assert!(report.contains(&format!("worker {id}: pid {} -> {} (ready)", before["pid"], now["pid"])), "{report}");
    }
    let m =
        metrics_until(&addr, "reload counted", |m| metric(m, "tandem_reloads_total", &[("result", "ok")]) == Some(1.0))
            .await;
    assert_eq!(metric(&m, "tandem_reloads_total", &[("result", "failed")]), Some(0.0));

    // stop: exit 0 once every process is gone; the master exits 0.
    let all = pids(&after);
    assert_eq!(all.len(), 4);
    let out = tandem(xdg.path(), &["stop", name]).await;
    assert!(out.status.success(), "stop failed: {}", stderr(&out));
    assert!(stdout(&out).contains("stopped"), "{}", stdout(&out));
    let status = cluster.wait(STEP).await;
    assert!(status.success(), "master exit: {status:?}");
    for pid in all {
        assert!(!alive(pid as i32), "pid {pid} still alive after tandem stop");
    }
    // And it is gone from ls; asking for it names the ones left (none).
    let out = tandem(xdg.path(), &["status", name]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("no running cluster named \"{name}\"; no cluster is running")),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn an_unknown_name_lists_the_running_ones() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let mut cluster = Proc::spawn_with_env(
            &example("config_center"),
            &["--workers", "1", "--name", "known-one"],
            &[("XDG_RUNTIME_DIR", xdg.path())],
        );
        cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
        for args in [&["status", "nope"][..], &["leader", "nope"], &["reload", "nope"], &["stop", "nope"]] {
            let out = tandem(xdg.path(), args).await;
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            assert!(
                stderr(&out).contains("no running cluster named \"nope\"; running: known-one"),
                "{args:?}: {}",
                stderr(&out)
            );
        }
        let out = tandem(xdg.path(), &["status", "../etc"]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("no running cluster named \"../etc\""), "{}", stderr(&out));
    })
    .await
    .expect("test timed out")
}

/// Runs the demo for a moment with stderr piped (not a terminal); returns stderr.
async fn demo_stderr(json: bool) -> String {
    let xdg = private_dir();
    let mut command = tokio::process::Command::new(example("config_center"));
    command
        .args(["--workers", "2", "--duration", "2", "--name", "logs-it"])
        .env("XDG_RUNTIME_DIR", xdg.path())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if json {
        command.env("TANDEM_LOG", "json");
    } else {
        command.env_remove("TANDEM_LOG");
    }
    let out = tokio::time::timeout(STEP, command.output()).await.expect("demo did not stop").expect("run demo");
    assert!(out.status.success(), "demo exit {:?}: {}", out.status, stderr(&out));
    stderr(&out)
}

#[tokio::test]
async fn logs_are_one_line_per_event_plain_off_a_terminal_and_json_on_request() {
    tokio::time::timeout(TIMEOUT, async {
        let text = demo_stderr(false).await;
        assert!(!text.contains('\u{1b}'), "ANSI escapes with stderr not a terminal:\n{text}");
        // Each cluster event once (it used to be logged by the cluster and again by the demo).
        let shutdown: Vec<&str> = text.lines().filter(|l| l.contains("shutdown started")).collect();
        assert_eq!(shutdown.len(), 1, "{text}");
        // Start-up is quiet: at INFO, only the cluster-ready line before the stop.
        let before_stop: Vec<&str> = text.lines().take_while(|l| !l.contains("shutdown started")).collect();
        // (Where the soft descriptor limit is below the hard one, as for a
        // user whose session set it so, the master raising it says so once:
        // it depends on who runs the test, not on the cluster.)
        let info: Vec<&&str> = before_stop
            .iter()
            .filter(|l| l.contains(" INFO ") && !l.contains("raised the soft descriptor limit"))
            .collect();
        assert_eq!(info.len(), 1, "start-up INFO lines:\n{}", before_stop.join("\n"));
        assert!(info[0].contains("cluster ready"), "{}", info[0]);
        assert!(info[0].contains("role=\"master\""), "{}", info[0]);
        // Every line of the master and of its children names the cluster as `tandem ls` does.
        for line in text.lines().filter(|l| l.contains("tandem{")) {
            assert!(line.contains("cluster=logs-it"), "a line without its cluster's name: {line}");
        }

        let text = demo_stderr(true).await;
        let mut lines = 0;
        for line in text.lines() {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(value["level"].is_string() && value["fields"].is_object(), "{line}");
            lines += 1;
        }
        assert!(text.contains("cluster ready"), "{text}");
        assert!(lines >= 2, "{text}");
    })
    .await
    .expect("test timed out")
}

/// The HTTP example is operated the same way: a SIGHUP reload and a `tandem
/// reload` are both counted in `/metrics`, and `tandem stop` ends every process.
#[tokio::test]
async fn the_http_example_is_operated_like_any_cluster() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "web-it";
        let mut cluster = Proc::spawn_with_env(
            &example("http_config"),
            &["--workers", "2", "--name", name, "--metrics", "127.0.0.1:0"],
            &[("XDG_RUNTIME_DIR", xdg.path())],
        );
        cluster.expect_line(STEP, |l| l.starts_with("listening on ")).await;
        let metrics_line = cluster.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
        let addr = metrics_line.trim_start_matches("metrics on ").to_owned();
        let ready = cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
        let master: i32 = field(&ready, "master").unwrap().parse().unwrap();

        // SIGHUP: the master's own reload, counted like the CLI's.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), nix::sys::signal::Signal::SIGHUP).unwrap();
        cluster.expect_line(STEP, |l| l.starts_with("reload done:")).await;
        metrics_until(&addr, "SIGHUP reload counted", |m| {
            metric(m, "tandem_reloads_total", &[("result", "ok")]) == Some(1.0)
        })
        .await;

        let before = status_json(xdg.path(), name).await;
        let out = tandem(xdg.path(), &["reload", name]).await;
        assert!(out.status.success(), "reload failed: {}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("reloaded 2 workers"), "{}", stdout(&out));
        let after = status_json(xdg.path(), name).await;
        for id in [1, 2] {
            assert_ne!(worker(&before, id)["pid"], worker(&after, id)["pid"], "worker {id} not replaced");
        }
        metrics_until(&addr, "CLI reload counted", |m| {
            metric(m, "tandem_reloads_total", &[("result", "ok")]) == Some(2.0)
        })
        .await;

        let all = pids(&after);
        let out = tandem(xdg.path(), &["stop", name]).await;
        assert!(out.status.success(), "stop failed: {}", stderr(&out));
        assert!(cluster.wait(STEP).await.success());
        for pid in all {
            assert!(!alive(pid as i32), "pid {pid} still alive after tandem stop");
        }
    })
    .await
    .expect("test timed out")
}
