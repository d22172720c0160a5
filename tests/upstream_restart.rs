//! The upstream restarts with less state, or is not there at start: real
//! processes (the `tandem-registry` binary, the `standalone` and
//! `config_center` examples), and nothing stays stale.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Proc, assert_in_order, example, field, free_port, poll_until, private_dir, serve_registry};
use tandem::registry::RegistryClient;

const TIMEOUT: Duration = Duration::from_secs(90);
const LINE: Duration = Duration::from_secs(15);

fn is_value(value: &str) -> impl Fn(&str) -> bool + '_ {
    move |line| field(line, "value") == Some(value)
}

/// Connects, retrying while the registry is starting.
async fn admin(addr: &str) -> RegistryClient {
    let deadline = tokio::time::Instant::now() + LINE;
    loop {
        match RegistryClient::connect(addr).await {
            Ok(client) => return client,
            Err(error) if tokio::time::Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("registry at {addr}: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_restarted_empty_on_the_same_port_strands_no_follower() {
    tokio::time::timeout(TIMEOUT, async {
        let (registry, addr) = serve_registry("127.0.0.1:0", &[]).await;
        let first = admin(&addr).await;
        let dir = private_dir();
        let run_dir = dir.path().join("run");
        let run_dir = run_dir.to_str().unwrap();
        let bin = example("standalone");
        let args = ["--name", "rs", "--dir", run_dir, "--registry", &addr, "--subscribe", "K", "--write-every", "0"];
        let mut procs: Vec<Proc> = (0..3).map(|_| Proc::spawn(&bin, &args)).collect();
        for proc in &mut procs {
            proc.expect_line(LINE, |l| field(l, "key") == Some("K")).await;
        }
        for i in 1..=30 {
            first.put("K", format!("v{i}")).await.unwrap();
        }
        assert_eq!(first.revision().await.unwrap(), 31);
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("v30")).await;
        }
        let old_incarnation = first.server_info().incarnation.clone();

        // kill -9 the registry; a new, empty one on the same port.
        registry.signal(nix::sys::signal::Signal::SIGKILL);
        drop(registry);
        drop(first);
        let (_registry, again) = serve_registry(&addr, &[]).await;
        assert_eq!(again, addr);
        let second = admin(&addr).await;
        assert_ne!(second.server_info().incarnation, old_incarnation);
        // The Leader is back (one connection, one watch), and told its followers the key is gone here.
        poll_until(LINE, "the leader's registry connection and watch", || async {
            second.stats().await.map(|s| s.connections == 1 && s.watches == 1).unwrap_or(false)
        })
        .await;
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("<none>")).await;
        }

        second.put("K", "after-restart").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("after-restart")).await;
        }
        let mut late = Proc::spawn(&bin, &args);
        let line = late.expect_line(LINE, |l| field(l, "key") == Some("K")).await;
        assert_eq!(field(&line, "value"), Some("after-restart"), "a late follower starts from the new server's value");
        procs.push(late);

        // And it keeps flowing.
        second.put("K", "later").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("later")).await;
            assert_in_order(&proc.seen, "pid");
        }
    })
    .await
    .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_starts_with_its_registry_down_and_flows_once_it_is_up() {
    tokio::time::timeout(TIMEOUT, async {
        let addr = format!("127.0.0.1:{}", free_port());
        let bin = example("config_center");
        let mut cluster =
            Proc::spawn(&bin, &["--workers", "2", "--registry", &addr, "--subscribe", "K", "--duration", "0"]);
        let ready = cluster.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let workers = field(&ready, "workers").unwrap().split(',').count();
        assert_eq!(workers, 2, "{ready}");
        let line = cluster.expect_line(LINE, |l| l.starts_with("upstream connections:")).await;
        assert!(line.contains("unknown"), "{line}");

        let (_registry, served) = serve_registry(&addr, &[]).await;
        assert_eq!(served, addr);
        let admin = admin(&addr).await;
        poll_until(LINE, "the agent's registry connection", || async {
            admin.stats().await.map(|s| s.connections == 1).unwrap_or(false)
        })
        .await;
        admin.put("K", "up-at-last").await.unwrap();
        let mut saw = BTreeSet::new();
        while saw.len() < 2 {
            let line = cluster.expect_line(LINE, is_value("up-at-last")).await;
            saw.insert(field(&line, "worker").unwrap().to_string());
        }
        // Nothing was restarted on the way.
        assert!(!cluster.seen.iter().any(|l| l.contains("restarted")), "no process restarted: {:#?}", cluster.seen);
        cluster.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(cluster.wait(LINE).await.success());
    })
    .await
    .expect("test timed out")
}
