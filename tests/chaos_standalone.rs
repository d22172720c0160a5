//! Chaos for standalone mode (issue 9 §6): the current leader is killed with
//! SIGKILL 20 times while a writer keeps putting. Real binaries: the bundled
//! `tandem-registry` server and the `standalone` example.
//!
//! After each round every live process ends on that round's final value; no
//! process ever prints the same (epoch, seq) twice or an older one after a
//! newer one; at the end the registry holds exactly one connection from the host.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Proc, assert_in_order, example, field, poll_until, private_dir, registry_binary};
use nix::sys::signal::Signal;
use tandem::registry::RegistryClient;

const TIMEOUT: Duration = Duration::from_secs(60);
const LINE: Duration = Duration::from_secs(10);
const PROCESSES: usize = 3;
const ROUNDS: u64 = 20;

/// The (epoch, pid) of the leader the processes last announced, if exactly one
/// live process's last role line says leader at the highest epoch seen.
fn current_leader(procs: &mut [Proc]) -> Option<(u64, usize)> {
    let mut best: Option<(u64, usize)> = None;
    for (i, proc) in procs.iter_mut().enumerate() {
        proc.drain();
        let last_role = proc.seen.iter().rev().find(|l| field(l, "role").is_some() && field(l, "key").is_none());
        if let Some(line) = last_role
            && field(line, "role") == Some("leader")
        {
            let epoch: u64 = field(line, "epoch")?.parse().ok()?;
            if best.is_none_or(|(e, _)| epoch > e) {
                best = Some((epoch, i));
            }
        }
    }
    best
}

#[tokio::test]
async fn the_standalone_leader_killed_20_times_under_writes() {
    tokio::time::timeout(TIMEOUT, async {
        let mut registry = Proc::spawn(&registry_binary(), &["serve", "--listen", "127.0.0.1:0"]);
        let line = registry.expect_line(LINE, |l| l.starts_with("listening on ")).await;
        let addr = line.trim_start_matches("listening on ").trim().to_string();
        let writer = Arc::new(RegistryClient::connect(addr.as_str()).await.unwrap());

        // The writer keeps putting; the test takes the gate to write a round's final value.
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let written = Arc::new(AtomicU64::new(0));
        let writing = tokio::spawn({
            let (writer, gate, written) = (writer.clone(), gate.clone(), written.clone());
            async move {
                for n in 1u64.. {
                    {
                        let _turn = gate.lock().await;
                        writer.put("k", format!("w{n}")).await.expect("the registry stays up in this test");
                        written.store(n, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });

        let dir = private_dir();
        let run = dir.path().join("run");
        let run = run.to_str().unwrap();
        let bin = example("standalone");
        let args = ["--name", "chaos", "--dir", run, "--registry", &addr, "--subscribe", "k", "--write-every", "0"];
        let mut procs: Vec<Proc> = (0..PROCESSES).map(|_| Proc::spawn(&bin, &args)).collect();

        let mut epoch = 0;
        for round in 1..=ROUNDS {
            // Wait for the leader of this round (a higher epoch than the last one killed).
            let mut leader = None;
            poll_until(LINE, "a new leader", || {
                leader = current_leader(&mut procs).filter(|(e, _)| *e > epoch);
                std::future::ready(leader.is_some())
            })
            .await;
            let (new_epoch, at) = leader.unwrap();
            epoch = new_epoch;

            // This round's final value reaches every live process, leader included.
            let last = format!("round-{round}");
            {
                let _turn = gate.lock().await;
                writer.put("k", last.clone()).await.unwrap();
                for proc in &mut procs {
                    proc.expect_line(LINE, |l| field(l, "value") == Some(last.as_str())).await;
                }
            }
            for proc in &procs {
                assert_in_order(&proc.seen, "pid");
            }

            // kill -9 the leader; a fresh process keeps the count.
            let killed = procs.remove(at);
            killed.signal(Signal::SIGKILL);
            drop(killed);
            procs.push(Proc::spawn(&bin, &args));
        }

        // The survivors elect once more and end on the final value.
        let mut leader = None;
        poll_until(LINE, "the last leader", || {
            leader = current_leader(&mut procs).filter(|(e, _)| *e > epoch);
            std::future::ready(leader.is_some())
        })
        .await;
        // One new leader per kill, each with the next epoch.
        assert_eq!(leader.map(|(e, _)| e), Some(ROUNDS + 1));
        writing.abort();
        let _ = writing.await;
        writer.put("k", "final").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, |l| field(l, "value") == Some("final")).await;
            assert_in_order(&proc.seen, "pid");
        }
        let writes = written.load(Ordering::Relaxed);
        assert!(writes > ROUNDS, "the writer kept writing during the rounds");
        eprintln!("{ROUNDS} leaders killed, {writes} writes, every process on the final value");
        // Asked over the writer's connection, which is not counted: the leader's alone.
        poll_until(LINE, "one upstream connection from the host", || async {
            writer.stats().await.map(|s| s.connections == 1 && s.watches == 1).unwrap_or(false)
        })
        .await;
    })
    .await
    .expect("test timed out")
}
