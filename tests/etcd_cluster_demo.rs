//! The cluster demo against a real etcd: `config_center --etcd` (master, agent,
//! workers as real processes), values put with the real `etcdctl`, connections
//! counted from /proc, and worker registrations that follow the Leader.
#![cfg(feature = "etcd")]

mod common;
#[path = "../etcd/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::{Proc, example, field};
use futures::StreamExt;
use nix::sys::signal::Signal;
use support::{Etcd, eventually, within};
use tandem::etcd_upstream::etcd::{self, Keys};
use tandem::registry::Instance;

const LIMIT: Duration = Duration::from_secs(60);
const LINE: Duration = Duration::from_secs(15);

/// Runs the real `etcdctl` (from Debian's etcd-client) against `endpoint`; returns its output.
fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let output = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint])
        .args(args)
        .output()
        .expect("etcdctl: apt-get install etcd-client");
    assert!(output.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

struct Demo {
    master: Proc,
    agent: i32,
    workers: Vec<i32>,
}

async fn start(endpoint: &str, workers: usize, extra: &[&str]) -> Demo {
    let n = workers.to_string();
    let mut args = vec!["--etcd", endpoint, "--workers", &n, "--subscribe", "K"];
    args.extend_from_slice(extra);
    let mut master = Proc::spawn(&example("config_center"), &args);
    let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
    let agent = field(&ready, "agent").unwrap().parse().unwrap();
    let workers: Vec<i32> = field(&ready, "workers").unwrap().split(',').map(|p| p.parse().unwrap()).collect();
    Demo { master, agent, workers }
}

impl Demo {
    fn pids(&self) -> Vec<u32> {
        [self.master.pid, self.agent].iter().chain(&self.workers).map(|&p| p as u32).collect()
    }

    /// Waits until every worker printed `value` for K.
    async fn expect_everywhere(&mut self, value: &str) {
        let mut waiting: HashSet<i32> = self.workers.iter().copied().collect();
        while !waiting.is_empty() {
            let line = self
                .master
                .expect_line(LINE, |l| field(l, "key") == Some("K") && field(l, "value") == Some(value))
                .await;
            waiting.remove(&field(&line, "pid").unwrap().parse::<i32>().unwrap());
        }
    }

    async fn stop(mut self) {
        self.master.signal(Signal::SIGTERM);
        assert_eq!(self.master.wait(Duration::from_secs(10)).await.code(), Some(0));
    }
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server etcd-client"]
async fn etcdctl_puts_reach_all_four_workers_over_one_etcd_connection() {
    within(LIMIT, async {
        let etcd = Etcd::single().await;
        let endpoint = etcd.endpoint(0);
        let mut demo = start(&endpoint, 4, &[]).await;
        let line = demo.master.expect_line(LINE, |l| l.starts_with("upstream connections:")).await;
        assert_eq!(line, "upstream connections: 1 (workers: 4)");
        // Counted again here, over the whole process tree, master included.
        let addrs = etcd::endpoint_addrs(&[&endpoint]).unwrap();
        assert_eq!(etcd::established_connections(&demo.pids(), &addrs).unwrap(), 1);

        for value in ["hello", "world", "42"] {
            assert_eq!(etcdctl(&endpoint, &["put", "K", value]).trim(), "OK");
            demo.expect_everywhere(value).await;
        }
        assert_eq!(etcd::established_connections(&demo.pids(), &addrs).unwrap(), 1);

        // kill -9 the agent and delete K meanwhile: under the next Leader every
        // worker ends with the deletion, then with the next value, over one connection.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.agent), Signal::SIGKILL).unwrap();
        assert_eq!(etcdctl(&endpoint, &["del", "K"]).trim(), "1");
        let line = demo.master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
        demo.agent = field(&line, "pid").unwrap().parse().unwrap();
        demo.expect_everywhere("<none>").await;
        assert_eq!(etcdctl(&endpoint, &["put", "K", "back"]).trim(), "OK");
        demo.expect_everywhere("back").await;
        assert_eq!(etcd::established_connections(&demo.pids(), &addrs).unwrap(), 1);
        demo.stop().await;
    })
    .await
}

/// The instance ids of service `svc` and the leases that hold them.
async fn registered(observer: &etcd::EtcdClient) -> (Vec<String>, BTreeSet<i64>) {
    let snapshot = observer.get_range(&Keys::prefix("/tandem/services/svc/")).await.unwrap();
    let ids = snapshot.kvs.iter().map(|kv| kv.key.rsplit('/').next().unwrap().to_string()).collect();
    (ids, snapshot.kvs.iter().map(|kv| kv.lease).collect())
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server etcd-client"]
async fn registrations_die_with_their_leader_and_the_next_leader_registers_them_again() {
    within(LIMIT, async {
        let etcd = Etcd::single().await;
        let endpoint = etcd.endpoint(0);
        let observer = etcd::EtcdClient::connect(etcd::Config::new([endpoint.clone()])).await.unwrap();
        let mut lists = observer.watch_service::<Instance>("svc");
        let mut demo = start(&endpoint, 2, &["--register", "svc"]).await;
        let both = vec!["worker-1".to_string(), "worker-2".to_string()];
        let ids = |list: &[Instance]| list.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        loop {
            let list = tokio::time::timeout(LINE, lists.next()).await.expect("not registered").unwrap();
            if ids(&list) == both {
                assert!(list.iter().all(|i| i.service == "svc" && i.metadata.contains_key("pid")), "{list:?}");
                break;
            }
        }
        let (_, first_leases) = registered(&observer).await;

        // kill -9 the Leader: the next one (epoch 2) registers both workers again
        // under its own lease, and the dead Leader's lease expires.
        // The workers may register under the new Leader before the master prints
        // `agent restarted:` (both follow the new agent's readiness): count the
        // epoch-2 registrations whenever they come.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.agent), Signal::SIGKILL).unwrap();
        let seen_before = demo.master.seen.len();
        let line = demo.master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
        assert_eq!(field(&line, "epoch"), Some("2"));
        demo.agent = field(&line, "pid").unwrap().parse().unwrap();
        let is_reregistration = |l: &str| l.starts_with("registered:") && field(l, "epoch") == Some("2");
        let early = demo.master.seen[seen_before..].iter().filter(|l| is_reregistration(l)).count();
        for _ in early..2 {
            demo.master.expect_line(LINE, |l| is_reregistration(l)).await;
        }
        let (ids_now, leases) = registered(&observer).await;
        assert_eq!(ids_now, both);
        assert!(leases.is_disjoint(&first_leases), "{leases:?} vs {first_leases:?}");
        for lease in &first_leases {
            let hex = format!("{lease:x}");
            eventually(Duration::from_secs(6), "the dead Leader's lease to expire", || {
                let out = etcdctl(&endpoint, &["lease", "timetolive", &hex]);
                async move { out.contains("already expired") }
            })
            .await;
        }

        // A Leader that stops answering keeps no lease alive: both instances vanish.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.agent), Signal::SIGSTOP).unwrap();
        let stopped = std::time::Instant::now();
        loop {
            let list = tokio::time::timeout(LINE, lists.next()).await.expect("the instances did not vanish").unwrap();
            if list.is_empty() {
                break;
            }
        }
        assert!(stopped.elapsed() >= Duration::from_millis(500), "vanished before any lease could expire");
        // Killed, it is replaced: the next Leader (epoch 3) brings them back.
        // The master may have killed it first, as hung (3 s without answering its pings).
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.agent), Signal::SIGKILL);
        let line = demo.master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
        assert_eq!(field(&line, "epoch"), Some("3"));
        demo.agent = field(&line, "pid").unwrap().parse().unwrap();
        loop {
            let list = tokio::time::timeout(LINE, lists.next()).await.expect("not registered again").unwrap();
            if ids(&list) == both {
                break;
            }
        }
        demo.stop().await;
    })
    .await
}
