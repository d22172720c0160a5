//! Reloading the agent of a running cluster from outside: the real
//! `config_center` example against a real registry, the real `tandem` binary.
//! `tandem reload NAME --agent` fails the Leader over to a new agent (new pid,
//! higher epoch) while the workers keep their pids and get the next value;
//! `tandem reload NAME` replaces the workers and leaves the agent alone; a
//! reload onto a broken executable exits 1 with the reason.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::cli::{forking, status_json, status_until, tandem, worker_pids};
use common::{Proc, alive, example, field, private_dir};
use serde_json::Value;
use tandem::registry::{RegistryClient, Server, ServerHandle};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);
const WORKERS: usize = 2;

/// Held while this file's tests spawn a process or write an executable, so no
/// child forked here holds a copy being written when it is run (ETXTBSY).
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn agent_row(rows: &[Value]) -> &Value {
    rows.iter().find(|r| r["role"] == "agent").expect("agent row")
}

/// Dropped in field order: the cluster is stopped before its runtime dir goes.
struct Demo {
    master: Proc,
    name: &'static str,
    agent: u32,
    workers: HashSet<u32>,
    admin: RegistryClient,
    _registry: ServerHandle,
    xdg: tempfile::TempDir,
}

/// `config_center` (at `exe`) with `WORKERS` workers against a registry of
/// its own, subscribed to `k`, no writer: values come from `Demo::put_and_expect`.
async fn start(name: &'static str, exe: &Path) -> Demo {
    let registry = Server::bind("127.0.0.1:0", Default::default()).await.expect("bind the registry").spawn();
    let addr = registry.local_addr().to_string();
    let xdg = private_dir();
    let workers = WORKERS.to_string();
    let args = ["--workers", &workers, "--registry", &addr, "--subscribe", "k", "--write-every", "0", "--name", name];
    let mut master = {
        let _fork = forking();
        Proc::spawn_with_env(exe, &args, &[("XDG_RUNTIME_DIR", xdg.path())])
    };
    let ready = master.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
    let agent: u32 = field(&ready, "agent").unwrap().parse().unwrap();
    let workers: HashSet<u32> = field(&ready, "workers").unwrap().split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(workers.len(), WORKERS, "{ready}");
    master.expect_line(STEP, |l| l.starts_with("upstream connections:")).await;
    let admin = RegistryClient::connect(addr.as_str()).await.expect("connect to the registry");
    let mut demo = Demo { master, name, agent, workers, admin, _registry: registry, xdg };
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
    /// the asking one is not counted) with one watch.
    async fn one_upstream_connection(&self) {
        common::one_upstream_connection(&self.admin, STEP).await
    }

    async fn status(&self) -> Vec<Value> {
        status_json(self.xdg.path(), self.name).await
    }

    async fn tandem(&self, args: &[&str]) -> Output {
        tandem(self.xdg.path(), args).await
    }
}

#[tokio::test]
async fn reload_agent_fails_the_leader_over_and_the_workers_stay() {
    tokio::time::timeout(TIMEOUT, async {
        let mut demo = start("agent-reload-it", &example("config_center")).await;
        let before = demo.status().await;
        assert_eq!(agent_row(&before)["epoch"], 1, "{before:#?}");
        let workers = worker_pids(&before);

        let out = demo.tandem(&["reload", demo.name, "--agent"]).await;
        assert!(out.status.success(), "reload --agent failed: {}{}", text(&out.stdout), text(&out.stderr));
        let line = text(&out.stdout);
        let line = line.trim();
        assert!(line.starts_with("agent reloaded: "), "{line}");
        assert_eq!(field(line, "old"), Some(demo.agent.to_string().as_str()), "{line}");
        assert_eq!((field(line, "epoch"), field(line, "old_epoch")), (Some("2"), Some("1")), "{line}");
        let new: u32 = field(line, "new").unwrap().parse().unwrap();
        assert_ne!(new, demo.agent, "{line}");
        // The master's own line, as after an agent crash.
        demo.master.expect_line(STEP, |l| l == format!("agent restarted: pid={new} epoch=2")).await;
        assert!(!alive(demo.agent as i32), "the old agent {} is still alive", demo.agent);

        // The new agent, epoch 2, online; the same workers, not restarted.
        let after = demo.status().await;
        let agent = agent_row(&after);
        assert_eq!((agent["pid"].as_u64(), agent["epoch"].as_u64()), (Some(u64::from(new)), Some(2)), "{agent}");
        assert_eq!((agent["state"].as_str(), agent["restarts"].as_u64()), (Some("online"), Some(1)), "{agent}");
        assert_eq!(worker_pids(&after), workers, "the workers were restarted");
        for w in after.iter().filter(|r| r["role"] == "worker") {
            assert_eq!((w["state"].as_str(), w["restarts"].as_u64()), (Some("online"), Some(0)), "{w}");
        }

        // Still one upstream connection (the new Leader's); a value put now
        // reaches every worker, from the Leader of epoch 2.
        demo.one_upstream_connection().await;
        let pids = demo.workers.clone();
        assert_eq!(demo.put_and_expect("after-agent-reload", &pids).await, HashSet::from([2]));
        let out = demo.tandem(&["status", demo.name]).await;
        assert!(text(&out.stdout).contains("leader: epoch 2, 2 followers,"), "{}", text(&out.stdout));
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn a_workers_reload_leaves_the_agent_alone() {
    tokio::time::timeout(TIMEOUT, async {
        let mut demo = start("workers-reload-it", &example("config_center")).await;
        let before = demo.status().await;
        let out = demo.tandem(&["reload", demo.name]).await;
        assert!(out.status.success(), "reload failed: {}{}", text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stdout).contains(&format!("reloaded {WORKERS} workers")), "{}", text(&out.stdout));

        let after = demo.status().await;
        let (a, b) = (agent_row(&before), agent_row(&after));
        assert_eq!(b["pid"].as_u64(), Some(u64::from(demo.agent)), "the agent was replaced: {b}");
        assert_eq!((b["epoch"].as_u64(), b["restarts"].as_u64()), (Some(1), Some(0)), "{b}");
        assert_eq!(a["pid"], b["pid"]);
        let new_workers = worker_pids(&after);
        for (old, new) in worker_pids(&before).iter().zip(&new_workers) {
            assert_ne!(old, new, "a worker was not replaced: {after:#?}");
        }
        // The same Leader (epoch 1, its one upstream connection) serves the new workers.
        demo.one_upstream_connection().await;
        let pids: HashSet<u32> = new_workers.iter().map(|&p| p as u32).collect();
        assert_eq!(demo.put_and_expect("after-workers-reload", &pids).await, HashSet::from([1]));
    })
    .await
    .expect("test timed out")
}

/// Puts a file at `path` the way a deploy does: written aside, renamed over.
fn deploy(path: &Path, write: impl FnOnce(&Path)) {
    let next = path.with_extension("next");
    let _ = std::fs::remove_file(&next);
    {
        let _fork = forking();
        write(&next);
    }
    std::fs::rename(&next, path).expect("rename over the executable");
}

#[tokio::test]
async fn a_failed_agent_reload_exits_1_with_the_reason() {
    tokio::time::timeout(TIMEOUT, async {
        // Run a copy, so the test can deploy onto it.
        let bin = private_dir();
        let good = bin.path().join("config_center.good");
        let exe: PathBuf = bin.path().join("config_center");
        deploy(&good, |next| {
            std::fs::copy(example("config_center"), next).expect("copy the example");
        });
        deploy(&exe, |next| std::fs::hard_link(&good, next).unwrap());
        let mut demo = start("agent-reload-fail-it", &exe).await;
        let workers = worker_pids(&demo.status().await);

        // The executable is gone: refused before the agent is touched.
        std::fs::remove_file(&exe).unwrap();
        let out = demo.tandem(&["reload", demo.name, "--agent"]).await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        let why = text(&out.stderr);
        assert!(why.contains("is missing or not executable; the agent was not stopped"), "{why}");
        let rows = demo.status().await;
        assert_eq!(agent_row(&rows)["pid"].as_u64(), Some(u64::from(demo.agent)), "{rows:#?}");

        // Another IPC version on disk (it exits 111 before joining): the old
        // agent is stopped, the new one refuses, exit 1 with the reason.
        deploy(&exe, |next| {
            std::fs::write(next, "#!/bin/sh\nexit 111\n").unwrap();
            std::fs::set_permissions(next, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        });
        let out = demo.tandem(&["reload", demo.name, "--agent"]).await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        let why = text(&out.stderr);
        assert!(why.starts_with("tandem: new agent "), "{why}");
        assert!(why.contains("exited with code 111 before it was ready"), "{why}");
        assert!(why.contains("the executable on disk speaks another IPC version"), "{why}");
        assert!(why.contains(&format!("the old agent {} is stopped", demo.agent)), "{why}");

        // Fixed on disk: the supervisor's next restart brings an agent back
        // (epoch 2 was the one that refused), the workers never restarted.
        deploy(&exe, |next| std::fs::hard_link(&good, next).unwrap());
        let rows = status_until(demo.xdg.path(), demo.name, STEP, "the agent back", |rows| {
            let a = agent_row(rows);
            a["state"] == "online" && a["epoch"].as_u64().is_some_and(|e| e > 2)
        })
        .await;
        assert_eq!(worker_pids(&rows), workers, "{rows:#?}");
        let epoch = agent_row(&rows)["epoch"].as_u64().unwrap();
        let pids = demo.workers.clone();
        assert_eq!(demo.put_and_expect("after-the-fix", &pids).await, HashSet::from([epoch]));
    })
    .await
    .expect("test timed out")
}
