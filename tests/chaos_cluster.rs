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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Proc, alive, assert_in_order, example, field, poll_until, registry_binary};
use nix::sys::signal::Signal;
use tandem::registry::RegistryClient;
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
async fn connect(addr: &str) -> RegistryClient {
    let deadline = tokio::time::Instant::now() + LINE;
    loop {
        match RegistryClient::connect(addr).await {
            Ok(client) => return client,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "cannot reach the registry at {addr}: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Puts through `writer`, reconnecting it once if the registry was restarted.
async fn put(writer: &Mutex<RegistryClient>, addr: &str, value: String) {
    put_with(&mut *writer.lock().await, addr, value).await
}

async fn put_with(client: &mut RegistryClient, addr: &str, value: String) {
    if client.put("k", value.clone()).await.is_err() {
        *client = connect(addr).await;
        client.put("k", value).await.expect("put after reconnecting");
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
            assert_in_order(&master.seen, "worker");

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
                assert_in_order(&master.seen, "worker");
            }
        }

        writing.abort();
        let _ = writing.await;
        put(&writer, &addr, "final".into()).await;
        expect_everywhere(&mut master, &ids, "final").await;
        assert_in_order(&master.seen, "worker");
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

/// A SIGSTOPped process, SIGKILLed and resumed when dropped unless the test saw it gone.
struct Stopped {
    pid: i32,
    gone: bool,
}

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Stopped { pid, gone: false }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.gone {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
        }
    }
}

/// Issue 23 §4: a hung Leader (its agent SIGSTOPped, as a runtime blocked by
/// user code looks to the master) is found by the master's pings within
/// `agent_hang_timeout` (3 s) plus one `ping_interval` (1 s), SIGKILLed and
/// replaced by a new agent at a higher epoch; the workers get values at that
/// epoch, never an older one after it, and the stopped process is gone. When
/// the cluster stops, its name's directory goes too.
#[tokio::test]
async fn a_sigstopped_agent_is_found_hung_killed_and_replaced_at_a_new_epoch() {
    tokio::time::timeout(TIMEOUT, async {
        let name = format!("hang-{}", std::process::id());
        let args = ["--workers", "2", "--write-every", "100", "--name", &name];
        let mut master = Proc::spawn(&example("config_center"), &args);
        let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let agent: i32 = field(&ready, "agent").unwrap().parse().unwrap();
        let dir = tandem::cluster::control::clusters_dir().join(&name);
        assert!(dir.join("lock").exists(), "{} holds the name's lock", dir.display());
        // Both workers get values from the first Leader.
        let mut ids = BTreeSet::new();
        while ids.len() < WORKERS {
            let line =
                master.expect_line(LINE, |l| field(l, "epoch") == Some("1") && field(l, "value").is_some()).await;
            ids.insert(field(&line, "worker").unwrap().to_string());
        }

        let mut stopped = Stopped::stop(agent);
        let at = std::time::Instant::now();
        let hung = master.expect_line(LINE, |l| l.starts_with("hung: agent")).await;
        let found = at.elapsed();
        assert!(hung.contains(&format!("(pid {agent})")), "{hung}");
        let silent_ms: u64 = field(&hung, "silent_ms").unwrap().trim_end_matches(';').parse().unwrap();
        // Judged at a ping tick: silent for the 3 s timeout, less than one more interval.
        assert!((3000..4500).contains(&silent_ms), "{hung}");
        // Its last answer came at most one interval before the stop.
        assert!(found >= Duration::from_secs(2) && found < Duration::from_millis(4500), "found after {found:?}");
        let line = master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
        let replaced = at.elapsed();
        assert_eq!(field(&line, "epoch"), Some("2"), "{line}");
        assert_ne!(field(&line, "pid"), Some(agent.to_string().as_str()));
        // The restart delay (100 ms) and a start-up on a busy machine.
        assert!(replaced < Duration::from_secs(8), "replaced after {replaced:?}");
        // SIGKILLed while stopped, and reaped by the master: it never serves again.
        poll_until(LINE, "the stopped agent to be gone", || async move { !alive(agent) }).await;
        stopped.gone = true;

        let mut new_epoch = BTreeSet::new();
        while new_epoch.len() < WORKERS {
            let line =
                master.expect_line(LINE, |l| field(l, "epoch") == Some("2") && field(l, "value").is_some()).await;
            new_epoch.insert(field(&line, "worker").unwrap().to_string());
        }
        assert_eq!(new_epoch, ids);
        assert_in_order(&master.seen, "worker");
        eprintln!("SIGSTOPped agent found hung after {found:?} (silent {silent_ms} ms), replaced after {replaced:?}");

        master.signal(Signal::SIGTERM);
        assert!(master.finish(LINE).await.success());
        assert_in_order(&master.seen, "worker");
        assert!(!dir.exists(), "the name's directory {} is removed when the cluster stops", dir.display());
    })
    .await
    .expect("test timed out")
}

/// The master's descriptor limit in the next test: low, so that a few hundred
/// connections fill its table.
const MASTER_NOFILE: usize = 256;

/// The master's open descriptors.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Issue 23 §3: with the master's descriptor table full (its soft and hard
/// `RLIMIT_NOFILE` at 256, and idle connections held on its `/metrics`
/// listener, whose connection cap is raised past the limit for this test: by
/// default it refuses them long before), a `kill -9`ed worker is respawned within its normal restart
/// delay, with the descriptors the master keeps in reserve, and its slot never
/// goes `failed`; `tandem status` still gets its answer.
#[tokio::test]
async fn a_worker_killed_while_the_masters_descriptors_are_exhausted_is_respawned() {
    tokio::time::timeout(TIMEOUT, async {
        let exe = example("config_center");
        let script = format!("ulimit -n {MASTER_NOFILE} && exec \"$0\" \"$@\"");
        let name = format!("fds-{}", std::process::id());
        let cap = (MASTER_NOFILE * 4).to_string();
        let args = [
            "-c",
            &script,
            exe.to_str().unwrap(),
            "--workers",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--metrics-max-connections",
            &cap,
            "--name",
            &name,
        ];
        let mut master = Proc::spawn_with(std::path::Path::new("/bin/sh"), &args, &[], true);
        let line = master.expect_line(LINE, |l| l.starts_with("metrics on ")).await;
        let metrics: std::net::SocketAddr = line.trim_start_matches("metrics on ").trim().parse().unwrap();
        let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let victim: i32 = field(&ready, "workers").unwrap().split(',').next().unwrap().parse().unwrap();
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", master.pid)).unwrap();
        let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
        assert_eq!(nofile.split_whitespace().nth(3), Some(MASTER_NOFILE.to_string().as_str()), "{nofile}");

        // Idle connections until the master's table is full (the rest wait in the backlog).
        let mut flood = Vec::new();
        for _ in 0..MASTER_NOFILE + 64 {
            flood.push(tokio::net::TcpStream::connect(metrics).await.unwrap());
        }
        let pid = master.pid;
        poll_until(LINE, "the master's descriptor table to be full", || async move { open_fds(pid) >= MASTER_NOFILE })
            .await;

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let at = std::time::Instant::now();
        let line = master.expect_line(LINE, |l| l.starts_with("worker restarted:")).await;
        let took = at.elapsed();
        let new: i32 = field(&line, "pid").unwrap().parse().unwrap();
        assert_ne!(new, victim);
        // The first restart delay is 100 ms; the rest is the start-up of a worker.
        assert!(took < Duration::from_secs(5), "respawned after {took:?}");
        // The table was still full: the spawn took the reserve.
        assert!(open_fds(pid) >= MASTER_NOFILE - 1, "{} descriptors", open_fds(pid));
        assert!(master.seen.iter().any(|l| l.contains("descriptor table full: spawned with the reserve")));
        // The new worker serves: it gets values through the Leader.
        let new_pid = new.to_string();
        master.expect_line(LINE, |l| field(l, "pid") == Some(new_pid.as_str()) && field(l, "value").is_some()).await;
        for line in &master.seen {
            // (A failed spawn is the `start failed: ... could not be spawned` event.)
            assert!(
                !line.contains("slot failed") && !line.contains("could not spawn") && !line.contains("start failed"),
                "{line}"
            );
        }
        // The control socket answers too, with a descriptor of the reserve.
        assert!(open_fds(pid) >= MASTER_NOFILE - 1, "{} descriptors", open_fds(pid));
        let mut control = tandem::cluster::control::ControlClient::connect(&name).await.unwrap();
        let status = control.call(tandem::cluster::control::Request::Status).await.unwrap().to_string();
        assert!(status.contains(&format!("\"pid\":{new}")), "{status}");
        eprintln!("worker {victim} killed with the master's table full; {new} ready after {took:?}");

        drop(flood);
        master.signal(Signal::SIGTERM);
        assert!(master.finish(LINE).await.success());
    })
    .await
    .expect("test timed out")
}

/// How many times the next test kills the agent.
const STANDBY_KILLS: u64 = 20;

/// Waits for the standby that mirrors the Leader of `epoch` (looked for in
/// the lines after `from` first) and returns its pid.
async fn standby_mirroring(master: &mut Proc, from: usize, epoch: u64) -> i32 {
    let mirrors = epoch.to_string();
    let is = |l: &str| l.starts_with("standby ready:") && field(l, "mirrors") == Some(mirrors.as_str());
    master.drain();
    let line = match master.seen[from..].iter().find(|l| is(l)) {
        Some(line) => line.clone(),
        None => master.expect_line(LINE, is).await,
    };
    field(&line, "pid").unwrap().parse().unwrap()
}

/// Issue 26: with a hot standby (`--standby`), the agent is killed with
/// SIGKILL 20 times while a writer keeps putting. Each time the standby (the
/// pid the master reported ready, mirroring the current epoch) becomes the
/// agent at the next epoch, with no cold restart, and a new standby follows;
/// every worker ends on each round's final value; no worker ever prints the
/// same (epoch, seq) twice or an older one after a newer one; the registry
/// counts one connection from the host after each takeover.
#[tokio::test]
async fn twenty_agent_kills_with_a_standby_under_writes() {
    tokio::time::timeout(TIMEOUT, async {
        let (_registry, addr) = start_registry("127.0.0.1:0").await;
        let writer = Arc::new(Mutex::new(connect(&addr).await));
        let written = Arc::new(AtomicU64::new(0));
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
        let args = ["--workers", &workers, "--registry", &addr, "--subscribe", "k", "--write-every", "0", "--standby"];
        let mut master = Proc::spawn(&example("config_center"), &args);
        let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let mut agent: i32 = field(&ready, "agent").unwrap().parse().unwrap();
        let mut ids = BTreeSet::new();
        {
            let client = writer.lock().await;
            client.put("k", "round-0".to_string()).await.unwrap();
            while ids.len() < WORKERS {
                let line = master.expect_line(LINE, |l| field(l, "value") == Some("round-0")).await;
                ids.insert(field(&line, "worker").unwrap().to_string());
            }
        }

        let (mut epoch, mut from) = (1u64, 0usize);
        let started = std::time::Instant::now();
        for round in 1..=STANDBY_KILLS {
            let standby = standby_mirroring(&mut master, from, epoch).await;
            assert_ne!(standby, agent);
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), Signal::SIGKILL).unwrap();
            let line = master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
            from = master.seen.len();
            // The standby is the agent now, at the next epoch: no cold restart.
            assert_eq!(field(&line, "pid"), Some(standby.to_string().as_str()), "{line}");
            assert_eq!(field(&line, "epoch"), Some((epoch + 1).to_string().as_str()), "{line}");
            let promoted = format!("standby promoted: pid={standby} epoch={} replaces={agent}", epoch + 1);
            assert!(master.seen.contains(&promoted), "no `{promoted}` line");
            poll_until(LINE, "the killed agent to be gone", || async move { !alive(agent) }).await;
            (agent, epoch) = (standby, epoch + 1);

            let last = format!("round-{round}");
            let mut client = writer.lock().await;
            put_with(&mut client, &addr, last.clone()).await;
            expect_everywhere(&mut master, &ids, &last).await;
            assert_in_order(&master.seen, "worker");
            // One upstream connection from the host: the new agent's (the writer's is not counted).
            poll_until(LINE, "one upstream connection after the takeover", || async {
                client.stats().await.map(|s| s.connections == 1).unwrap_or(false)
            })
            .await;
        }
        let took = started.elapsed();
        writing.abort();
        let _ = writing.await;
        put(&writer, &addr, "final".into()).await;
        expect_everywhere(&mut master, &ids, "final").await;
        assert_in_order(&master.seen, "worker");
        for line in &master.seen {
            assert!(!line.starts_with("restart scheduled: agent"), "a cold restart of the agent: {line}");
        }
        // A new standby after the last takeover too.
        standby_mirroring(&mut master, from, epoch).await;
        let writes = written.load(Ordering::Relaxed);
        assert!(writes > STANDBY_KILLS, "the writer kept writing during the rounds");
        eprintln!(
            "{STANDBY_KILLS} agents killed with a standby in {took:?}, {writes} writes, every worker on the final value"
        );
    })
    .await
    .expect("test timed out")
}
