//! What a worker owns in the upstream, through the Leader on the bundled
//! registry, across an agent `kill -9` (real `config_center` processes, a real
//! registry server in this test process, which discovers and watches as
//! another process would):
//! - registrations (`--register`, `tandem::presence::stay_registered`): the
//!   dead Leader's connection takes its instances with it, and the new Leader
//!   (epoch 2) holds them again;
//! - other publishes (`--own`, `docs/using.md`'s "re-publish what a process owns when
//!   `Client::watch()` shows a new epoch"): re-published once under the new
//!   Leader, and never replayed by the follower.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::{Proc, example, field, poll_until};
use futures::StreamExt;
use nix::sys::signal::Signal;
use tandem::registry::{RegistryClient, Server, ServerHandle, ServiceEvent, WatchEvent, WatchSpec};

const TIMEOUT: Duration = Duration::from_secs(90);
const LINE: Duration = Duration::from_secs(20);
const WORKERS: usize = 2;

struct Cluster {
    master: Proc,
    agent: i32,
    _server: ServerHandle,
}

/// A registry server here, and `config_center` on it with `extra` flags.
async fn start(extra: &[&str]) -> (Cluster, RegistryClient) {
    let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
    let addr = server.local_addr().to_string();
    let workers = WORKERS.to_string();
    let mut args = vec!["--workers", &workers, "--registry", &addr, "--subscribe", "k", "--write-every", "0"];
    args.extend_from_slice(extra);
    let mut master = Proc::spawn(&example("config_center"), &args);
    let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
    let agent = field(&ready, "agent").unwrap().parse().unwrap();
    let observer = RegistryClient::connect(addr.as_str()).await.unwrap();
    (Cluster { master, agent, _server: server }, observer)
}

impl Cluster {
    /// Waits for a `<prefix> worker=<id> ... epoch=<epoch>` line from every
    /// worker; returns each worker's pid, by id.
    async fn each_worker(&mut self, prefix: &str, epoch: u64) -> BTreeMap<u32, u32> {
        let epoch = epoch.to_string();
        let matches = |l: &str| l.starts_with(prefix) && field(l, "epoch") == Some(epoch.as_str());
        let parse = |line: &str| -> (u32, u32) {
            (field(line, "worker").unwrap().parse().unwrap(), field(line, "pid").unwrap().parse().unwrap())
        };
        // Some may have come before a line awaited earlier (`cluster ready:`).
        let mut pids: BTreeMap<u32, u32> = self.master.seen.iter().filter(|l| matches(l)).map(|l| parse(l)).collect();
        while pids.len() < WORKERS {
            let (id, pid) = parse(&self.master.expect_line(LINE, matches).await);
            pids.insert(id, pid);
        }
        pids
    }

    /// `kill -9` the agent; waits for its successor at epoch 2.
    async fn kill_the_agent(&mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.agent), Signal::SIGKILL).unwrap();
        let line = self.master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
        assert_eq!(field(&line, "epoch"), Some("2"), "{line}");
        self.agent = field(&line, "pid").unwrap().parse().unwrap();
    }
}

#[tokio::test]
async fn registrations_through_the_leader_are_discovered_and_re_owned_by_the_next_leader() {
    tokio::time::timeout(TIMEOUT, async {
        let (mut cluster, observer) = start(&["--register", "svc"]).await;
        let pids = cluster.each_worker("registered:", 1).await;

        // Another process (this test) discovers what the workers registered through the Leader.
        let expected: BTreeMap<String, String> =
            pids.iter().map(|(id, pid)| (format!("worker-{id}"), pid.to_string())).collect();
        let instances = |list: Vec<tandem::registry::Instance>| -> BTreeMap<String, String> {
            list.into_iter().map(|i| (i.id.clone(), i.metadata.get("pid").cloned().unwrap_or_default())).collect()
        };
        assert_eq!(instances(observer.discover("svc").await.unwrap()), expected);
        // ONE lease holder: the agent's connection (the observer does not count
        // itself; the demo's own short-lived stats connection may still be closing).
        poll_until(LINE, "one connection (the Leader's) holding every instance", || async {
            observer.stats().await.is_ok_and(|s| (s.connections, s.instances) == (1, WORKERS as u64))
        })
        .await;

        let mut watch = observer.watch_service("svc").await.unwrap();
        for _ in 0..WORKERS {
            assert!(matches!(watch.next().await.unwrap().unwrap(), ServiceEvent::Join(_)));
        }
        cluster.kill_the_agent().await;
        // The dead Leader's instances leave with its connection; the new Leader
        // registers them again (epoch 2), on its own lease.
        assert_eq!(cluster.each_worker("registered:", 2).await, pids, "the same workers re-register");
        let mut history: HashMap<String, Vec<&str>> = HashMap::new();
        while history.values().filter(|events| events.ends_with(&["leave", "join"])).count() < WORKERS {
            match watch.next().await.expect("the service watch").expect("a service event") {
                ServiceEvent::Join(instance) => history.entry(instance.id).or_default().push("join"),
                ServiceEvent::Leave { id, .. } => history.entry(id).or_default().push("leave"),
                other => panic!("unexpected {other:?}"),
            }
        }
        for (id, events) in &history {
            assert_eq!(events, &["leave", "join"], "{id}: {history:?}");
        }
        assert_eq!(instances(observer.discover("svc").await.unwrap()), expected);
        poll_until(LINE, "one connection (the new Leader's) holding every instance", || async {
            observer.stats().await.is_ok_and(|s| (s.connections, s.instances) == (1, WORKERS as u64))
        })
        .await;
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn owned_keys_are_published_again_by_the_next_leader_never_replayed() {
    tokio::time::timeout(TIMEOUT, async {
        let (mut cluster, observer) = start(&["--own", "owned"]).await;
        // From revision 1: every write to the prefix since the registry started.
        let mut watch = observer.watch(WatchSpec::prefix("owned/"), Some(1)).await.unwrap();

        let pids = cluster.each_worker("owned:", 1).await;
        cluster.kill_the_agent().await;
        assert_eq!(cluster.each_worker("owned:", 2).await, pids, "each worker re-published under the new Leader");

        // Everything written to the prefix, up to a marker written now.
        let marker = observer.put("owned/~marker", "end").await.unwrap();
        let mut writes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        loop {
            match watch.next().await.expect("the watch").expect("a watch event") {
                WatchEvent::Put { revision, .. } if revision == marker => break,
                WatchEvent::Put { key, value, .. } => {
                    writes.entry(key).or_default().push(String::from_utf8_lossy(&value).into_owned())
                }
                _ => {}
            }
        }
        let expected: BTreeMap<String, Vec<String>> = pids
            .iter()
            .map(|(id, pid)| {
                (format!("owned/worker-{id}"), vec![format!("pid={pid} epoch=1"), format!("pid={pid} epoch=2")])
            })
            .collect();
        // Once per Leader, in order: the epoch-1 publish was not replayed to the new Leader.
        assert_eq!(writes, expected);
        for (key, values) in &expected {
            let now = observer.get(key).await.unwrap().expect("the owned key");
            assert_eq!(String::from_utf8_lossy(&now.value), values[1], "{key}");
        }
    })
    .await
    .expect("test timed out")
}
