//! Chaos for the cluster (issue 9 §6): the agent is killed with SIGKILL 10
//! times and the registry is killed and restarted (empty, on the same port)
//! twice, while a writer keeps putting. Real binaries: the `config_center`
//! example (master, agent, workers) and the bundled `tandem-registry` server.
//!
//! After each round every worker ends on that round's final value; no worker
//! ever prints the same (epoch, seq) twice or an older one after a newer one;
//! at the end the registry holds exactly one connection from the host.
//!
//! The registry rounds need the adapter to notice a restarted (empty) registry
//! and re-read its keys (issue 9 §1); until then a restart strands the workers
//! on the old value and this test fails at the first registry round.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Proc, example, field, poll_until, registry_binary};
use nix::sys::signal::Signal;
use tandem::registry::Client;
use tokio::sync::Mutex;

const TIMEOUT: Duration = Duration::from_secs(60);
const LINE: Duration = Duration::from_secs(10);
const WORKERS: usize = 2;
const AGENT_KILLS: u64 = 10;
/// The rounds after which the registry is restarted too.
const REGISTRY_RESTARTS: [u64; 2] = [4, 8];

/// Starts the registry on `listen` and returns it with its address.
async fn start_registry(listen: &str) -> (Proc, String) {
    let mut registry = Proc::spawn(&registry_binary(), &["serve", "--listen", listen]);
    let line = registry.expect_line(LINE, |l| l.starts_with("listening on ")).await;
    let addr = line.trim_start_matches("listening on ").trim().to_string();
    (registry, addr)
}

/// A connection to the registry that comes back after the registry does.
async fn connect(addr: &str) -> Client {
    let deadline = tokio::time::Instant::now() + LINE;
    loop {
        match Client::connect(addr).await {
            Ok(client) => return client,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "cannot reach the registry at {addr}: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Puts through `writer`, reconnecting it once if the registry was restarted.
async fn put(writer: &Mutex<Client>, addr: &str, value: String) {
    put_with(&mut *writer.lock().await, addr, value).await
}

async fn put_with(client: &mut Client, addr: &str, value: String) {
    if client.put("k", value.clone()).await.is_err() {
        *client = connect(addr).await;
        client.put("k", value).await.expect("put after reconnecting");
    }
}

/// Checks each worker's value lines: no (epoch, seq) twice, never an older one after a newer.
fn assert_in_order(lines: &[String]) {
    let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for line in lines {
        let (Some(worker), Some(_), Some(epoch), Some(seq)) =
            (field(line, "worker"), field(line, "key"), field(line, "epoch"), field(line, "seq"))
        else {
            continue;
        };
        let position = (epoch.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap());
        if let Some(previous) = last.insert(worker, position) {
            assert!(position > previous, "worker {worker}: {position:?} after {previous:?} in {lines:#?}");
        }
    }
}

/// Waits until every worker printed `value`.
async fn expect_everywhere(master: &mut Proc, workers: &BTreeSet<String>, value: &str) {
    let mut seen = BTreeSet::new();
    while seen != *workers {
        let line = master.expect_line(LINE, |l| field(l, "value") == Some(value) && field(l, "worker").is_some()).await;
        seen.insert(field(&line, "worker").unwrap().to_string());
    }
}

#[tokio::test]
async fn the_agent_killed_10_times_and_the_registry_restarted_twice_under_writes() {
    tokio::time::timeout(TIMEOUT, async {
        let (mut registry, addr) = start_registry("127.0.0.1:0").await;
        let writer = Arc::new(Mutex::new(connect(&addr).await));
        let written = Arc::new(AtomicU64::new(0));
        // The writer keeps putting; the test holds the writer's lock to write a round's final value.
        let writing = tokio::spawn({
            let (writer, written, addr) = (writer.clone(), written.clone(), addr.clone());
            async move {
                for n in 1u64.. {
                    put(&writer, &addr, format!("w{n}")).await;
                    written.store(n, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });

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
            // Each kill would otherwise lengthen the restart backoff (and 10 hit the crash-loop limit).
            "--stable-after",
            "0",
        ];
        let mut master = Proc::spawn(&example("config_center"), &args);
        let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let mut agent: i32 = field(&ready, "agent").unwrap().parse().unwrap();
        assert_eq!(field(&ready, "workers").unwrap().split(',').count(), WORKERS);

        // Learn the worker ids from the values they print.
        let first = "round-0".to_string();
        {
            let client = writer.lock().await;
            client.put("k", first.clone()).await.unwrap();
        }
        let mut ids = BTreeSet::new();
        while ids.len() < WORKERS {
            let line = master.expect_line(LINE, |l| field(l, "value") == Some(first.as_str())).await;
            ids.insert(field(&line, "worker").unwrap().to_string());
        }

        let mut epoch: u64 = 1;
        for round in 1..=AGENT_KILLS {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), Signal::SIGKILL).unwrap();
            let line = master
                .expect_line(LINE, |l| l.starts_with("agent restarted:") && field(l, "pid") != Some(&agent.to_string()))
                .await;
            agent = field(&line, "pid").unwrap().parse().unwrap();
            let new_epoch: u64 = field(&line, "epoch").unwrap().parse().unwrap();
            assert!(new_epoch > epoch, "epoch {new_epoch} after {epoch}");
            epoch = new_epoch;

            // This round's final value reaches every worker.
            let last = format!("round-{round}");
            {
                // The writer waits until every worker has it.
                let mut client = writer.lock().await;
                put_with(&mut client, &addr, last.clone()).await;
                expect_everywhere(&mut master, &ids, &last).await;
            }
            assert_in_order(&master.seen);

            if REGISTRY_RESTARTS.contains(&round) {
                // Every watch is established at a high revision now: kill -9 the
                // registry and start it again, empty, on the same port.
                let mut client = writer.lock().await;
                registry.signal(Signal::SIGKILL);
                registry.wait(LINE).await;
                drop(registry);
                registry = start_registry(&addr).await.0;
                let last = format!("restart-{round}");
                put_with(&mut client, &addr, last.clone()).await;
                expect_everywhere(&mut master, &ids, &last).await;
                assert_in_order(&master.seen);
            }
        }

        writing.abort();
        let _ = writing.await;
        put(&writer, &addr, "final".into()).await;
        expect_everywhere(&mut master, &ids, "final").await;
        assert_in_order(&master.seen);
        let writes = written.load(Ordering::Relaxed);
        assert!(writes > AGENT_KILLS, "the writer kept writing during the rounds");
        eprintln!(
            "{AGENT_KILLS} agents killed, {} registry restarts, {writes} writes, every worker on the final value",
            REGISTRY_RESTARTS.len()
        );
        // Asked over the writer's connection, which is not counted: the agent's alone.
        let writer = writer.lock().await;
        poll_until(LINE, "one upstream connection from the host", || async {
            writer.stats().await.map(|s| s.connections == 1).unwrap_or(false)
        })
        .await;
    })
    .await
    .expect("test timed out")
}
