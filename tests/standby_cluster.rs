//! The cluster's hot standby (issue 26, `Config::standby`), with the real
//! `config_center` example (`--standby`) against a real registry and the real
//! `tandem` binary: a `kill -9`ed agent is replaced by its standby at the next
//! epoch (the same pid, now the agent), a new standby follows, and the host
//! keeps one upstream connection; an agent reload and a stop with a standby
//! leave one Leader; a killed standby is restarted, the agent untouched.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir).

mod common;

use std::collections::HashSet;
use std::process::Output;
use std::time::Duration;

use common::cli::{forking, status_json, status_until, tandem};
use common::{Proc, alive, example, field, poll_until, private_dir};
use nix::sys::signal::Signal;
use serde_json::Value;
use tandem::registry::{RegistryClient, Server, ServerHandle};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);
const WORKERS: usize = 2;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn row<'a>(rows: &'a [Value], role: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["role"] == role)
}

fn pid_of(rows: &[Value], role: &str) -> Option<u32> {
    row(rows, role).and_then(|r| r["pid"].as_u64()).map(|p| p as u32)
}

/// Whether `role`'s row is online with this pid (any, if `None`) at this epoch.
fn online(rows: &[Value], role: &str, pid: Option<u32>, epoch: u64) -> bool {
    row(rows, role).is_some_and(|r| {
        r["state"] == "online"
            && r["epoch"].as_u64() == Some(epoch)
            && pid.is_none_or(|p| r["pid"].as_u64() == Some(u64::from(p)))
    })
}

/// Dropped in field order: the cluster is stopped before its runtime dir goes.
struct Demo {
    master: Proc,
    name: &'static str,
    workers: HashSet<u32>,
    metrics: String,
    admin: RegistryClient,
    _registry: ServerHandle,
    xdg: tempfile::TempDir,
}

/// `config_center --standby` with `WORKERS` workers against a registry of its
/// own, subscribed to `k`, no writer; returns once the standby mirrors epoch 1.
/// With `logs`, the processes' log lines are kept too (`stderr: ...`).
async fn start(name: &'static str, logs: bool) -> Demo {
    let registry = Server::bind("127.0.0.1:0", Default::default()).await.expect("bind the registry").spawn();
    let addr = registry.local_addr().to_string();
    let xdg = private_dir();
    let workers = WORKERS.to_string();
    let args = [
        "--workers",
        &workers,
        "--registry",
        &addr,
        "--subscribe",
        "k",
        "--write-every",
        "0",
        "--name",
        name,
        "--standby",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut master = {
        let _fork = forking();
        let env = [("XDG_RUNTIME_DIR", xdg.path().as_os_str())];
        Proc::spawn_with(&example("config_center"), &args, &env, logs)
    };
    let line = master.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
    let metrics = line.trim_start_matches("metrics on ").trim().to_string();
    let ready = master.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
    let workers: HashSet<u32> = field(&ready, "workers").unwrap().split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(workers.len(), WORKERS, "{ready}");
    // The standby starts once the agent is ready: its line may come before the cluster's.
    let mirrors_1 = |l: &str| l.starts_with("standby ready:") && field(l, "mirrors") == Some("1");
    if !master.seen.iter().any(|l| mirrors_1(l)) {
        master.expect_line(STEP, mirrors_1).await;
    }
    let admin = RegistryClient::connect(addr.as_str()).await.expect("connect to the registry");
    let mut demo = Demo { master, name, workers, metrics, admin, _registry: registry, xdg };
    demo.one_upstream_connection().await;
    let pids = demo.workers.clone();
    assert_eq!(demo.put_and_expect("hello", &pids).await, HashSet::from([1]));
    demo
}

impl Demo {
    /// Puts `value` into `k` and waits until every pid in `pids` printed it;
    /// returns the Leader epochs the values came with.
    async fn put_and_expect(&mut self, value: &str, pids: &HashSet<u32>) -> HashSet<u64> {
        common::put_and_expect(&mut self.master, &self.admin, value, pids, STEP).await
    }

    /// Waits until the registry sees one client connection (the Leader's;
    /// the asking one is not counted) with one watch: the standby has none.
    async fn one_upstream_connection(&self) {
        common::one_upstream_connection(&self.admin, STEP).await
    }

    async fn status(&self) -> Vec<Value> {
        status_json(self.xdg.path(), self.name).await
    }

    async fn status_until(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        status_until(self.xdg.path(), self.name, STEP, what, done).await
    }

    async fn tandem(&self, args: &[&str]) -> Output {
        tandem(self.xdg.path(), args).await
    }

    /// One scrape of `/metrics`.
    async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&self.metrics).await.expect("connect to /metrics");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.metrics);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
}

#[tokio::test]
async fn a_killed_agent_is_replaced_by_its_standby_at_the_next_epoch() {
    tokio::time::timeout(TIMEOUT, async {
        let mut demo = start("standby-kill-it", true).await;
        let rows = demo.status().await;
        let (agent, standby) = (pid_of(&rows, "agent").unwrap(), pid_of(&rows, "standby").unwrap());
        assert!(online(&rows, "standby", Some(standby), 1), "the standby mirrors epoch 1: {rows:#?}");
        let out = demo.tandem(&["status", demo.name]).await;
        let table = text(&out.stdout);
        let line = table.lines().find(|l| l.starts_with("standby")).unwrap_or_else(|| panic!("{table}"));
        assert!(line.contains(&standby.to_string()) && line.contains("online e1"), "{table}");

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent as i32), Signal::SIGKILL).unwrap();
        let line = demo.master.expect_line(STEP, |l| l.starts_with("agent restarted:")).await;
        assert_eq!(line, format!("agent restarted: pid={standby} epoch=2"));
        let promoted = format!("standby promoted: pid={standby} epoch=2 replaces={agent}");
        assert!(demo.master.seen.contains(&promoted), "no `{promoted}` line");
        assert!(!demo.master.seen.iter().any(|l| l.starts_with("restart scheduled: agent")), "a cold restart");
        // Its log lines said standby; once promoted they say agent, at epoch 2.
        let standby_span = format!("role=\"standby\" pid={standby}");
        assert!(demo.master.seen.iter().any(|l| l.contains(&standby_span)), "no log line in `{standby_span}`");
        // Logged before its Leader binds, so before `agent restarted:`.
        let leads = demo.master.seen.iter().find(|l| l.contains("promoted: the standby leads"));
        let leads = leads.unwrap_or_else(|| panic!("no `promoted: the standby leads` line"));
        assert!(leads.contains(&format!("role=\"agent\" pid={standby} epoch=2")), "{leads}");
        assert!(!leads.contains("role=\"standby\""), "{leads}");
        poll_until(STEP, "the killed agent to be gone", || async { !alive(agent as i32) }).await;

        // The next value reaches every worker from the Leader of epoch 2.
        let pids = demo.workers.clone();
        assert_eq!(demo.put_and_expect("after-the-kill", &pids).await, HashSet::from([2]));
        // The standby is the agent; a new standby mirrors it; the same workers.
        let rows = demo
            .status_until("the standby as the agent and a new standby", |rows| {
                online(rows, "agent", Some(standby), 2) && online(rows, "standby", None, 2)
            })
            .await;
        let new_standby = pid_of(&rows, "standby").unwrap();
        assert!(new_standby != standby && new_standby != agent, "{rows:#?}");
        // One more process in each slot: the agent's (the standby), the standby's (a new one).
        assert_eq!(row(&rows, "agent").unwrap()["restarts"], 1, "{rows:#?}");
        assert_eq!(row(&rows, "standby").unwrap()["restarts"], 1, "{rows:#?}");
        let workers: HashSet<u32> =
            rows.iter().filter(|r| r["role"] == "worker").map(|r| r["pid"].as_u64().unwrap() as u32).collect();
        assert_eq!(workers, demo.workers);
        // One upstream connection from the host: the new agent's.
        demo.one_upstream_connection().await;

        let metrics = demo.metrics().await;
        assert!(metrics.contains("tandem_standby_promotions_total{cluster=\"standby-kill-it\"} 1"), "{metrics}");
        let up = "tandem_process_up{cluster=\"standby-kill-it\",role=\"standby\",slot=\"standby\"} 1";
        assert!(metrics.contains(up), "{metrics}");
        // The promoted process counts as the agent, and no more as the standby, in the metrics too.
        let agent_up = "tandem_process_up{cluster=\"standby-kill-it\",role=\"agent\",slot=\"agent\"} 1";
        assert!(metrics.contains(agent_up), "{metrics}");
        let standbys =
            metrics.lines().filter(|l| l.starts_with("tandem_process_up{") && l.contains("role=\"standby\""));
        assert_eq!(standbys.count(), 1, "one standby row, the new one: {metrics}");
        common::assert_in_order(&demo.master.seen, "pid");
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn an_agent_reload_and_a_stop_with_a_standby_leave_one_leader() {
    tokio::time::timeout(TIMEOUT, async {
        let mut demo = start("standby-reload-it", false).await;
        let rows = demo.status().await;
        let (agent, standby) = (pid_of(&rows, "agent").unwrap(), pid_of(&rows, "standby").unwrap());

        let out = demo.tandem(&["reload", demo.name, "--agent"]).await;
        assert!(out.status.success(), "reload --agent failed: {}{}", text(&out.stdout), text(&out.stderr));
        let line = text(&out.stdout);
        let new: u32 = field(line.trim(), "new").unwrap().parse().unwrap();
        // A new agent, not the standby: the standby was stopped first, never promoted.
        assert!(new != agent && new != standby, "{line}");
        assert!(!demo.master.seen.iter().any(|l| l.starts_with("standby promoted:")), "a standby was promoted");
        poll_until(STEP, "the old agent and standby to be gone", || async {
            !alive(agent as i32) && !alive(standby as i32)
        })
        .await;
        let rows = demo
            .status_until("the reloaded agent and a new standby", |rows| {
                online(rows, "agent", Some(new), 2) && online(rows, "standby", None, 2)
            })
            .await;
        let new_standby = pid_of(&rows, "standby").unwrap();
        assert!(new_standby != standby && new_standby != new, "{rows:#?}");
        demo.one_upstream_connection().await;
        let pids = demo.workers.clone();
        assert_eq!(demo.put_and_expect("after-the-reload", &pids).await, HashSet::from([2]));
        assert!(!demo.master.seen.iter().any(|l| l.starts_with("standby promoted:")), "a standby was promoted");

        // A stop: every process exits, the standby with the agent, none promoted.
        let out = demo.tandem(&["stop", demo.name]).await;
        assert!(out.status.success(), "stop failed: {}{}", text(&out.stdout), text(&out.stderr));
        let said = text(&out.stdout);
        assert!(said.contains(&format!("stopping {}: {} processes", demo.name, WORKERS + 3)), "{said}");
        assert!(demo.master.finish(STEP).await.success());
        for pid in [new, new_standby].into_iter().chain(demo.workers.iter().copied()) {
            assert!(!alive(pid as i32), "{pid} is still alive after the stop");
        }
        assert!(!demo.master.seen.iter().any(|l| l.starts_with("standby promoted:")), "a standby was promoted");
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn a_killed_standby_is_restarted_and_the_agent_is_untouched() {
    tokio::time::timeout(TIMEOUT, async {
        let mut demo = start("standby-dies-it", false).await;
        let rows = demo.status().await;
        let (agent, standby) = (pid_of(&rows, "agent").unwrap(), pid_of(&rows, "standby").unwrap());

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(standby as i32), Signal::SIGKILL).unwrap();
        let exited = format!("exited: standby (pid {standby})");
        demo.master.expect_line(STEP, |l| l.starts_with(&exited)).await;
        demo.master.expect_line(STEP, |l| l.starts_with("restart scheduled: standby")).await;
        let line = demo.master.expect_line(STEP, |l| l.starts_with("standby ready:")).await;
        let new_standby: u32 = field(&line, "pid").unwrap().parse().unwrap();
        assert_ne!(new_standby, standby);
        assert_eq!(field(&line, "mirrors"), Some("1"), "{line}");

        let rows = demo.status().await;
        assert!(online(&rows, "agent", Some(agent), 1), "the agent was touched: {rows:#?}");
        assert_eq!(row(&rows, "agent").unwrap()["restarts"], 0, "{rows:#?}");
        assert!(online(&rows, "standby", Some(new_standby), 1), "{rows:#?}");
        assert_eq!(row(&rows, "standby").unwrap()["restarts"], 1, "{rows:#?}");
        assert!(!demo.master.seen.iter().any(|l| l.starts_with("standby promoted:")));
        let pids = demo.workers.clone();
        assert_eq!(demo.put_and_expect("after-the-standby", &pids).await, HashSet::from([1]));
        demo.one_upstream_connection().await;
    })
    .await
    .expect("test timed out")
}
