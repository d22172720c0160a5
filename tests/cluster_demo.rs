//! The cluster with real processes: the `config_center` example binary (master,
//! agent, workers) against a real registry server, over both transports.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{Proc, alive, assert_in_order, example, field, poll_until};
use nix::sys::signal::Signal;
use tandem::registry::{RegistryClient, Server, ServerHandle};

const TIMEOUT: Duration = Duration::from_secs(90);
const LINE: Duration = Duration::from_secs(15);
const WORKERS: usize = 3;

struct Demo {
    master: Proc,
    agent: i32,
    /// worker id -> pid
    workers: BTreeMap<u32, i32>,
    admin: RegistryClient,
    _server: ServerHandle,
}

async fn start(transport: &str) -> Demo {
    let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
    let addr = server.local_addr().to_string();
    let workers = WORKERS.to_string();
    let args = [
        "--workers",
        &workers,
        "--registry",
        &addr,
        "--subscribe",
        "k",
        "--transport",
        transport,
        "--write-every",
        "0",
    ];
    let mut master = Proc::spawn(&example("config_center"), &args);
    let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
    let agent: i32 = field(&ready, "agent").unwrap().parse().unwrap();
    let pids: Vec<i32> = field(&ready, "workers").unwrap().split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), WORKERS);
    let line = master.expect_line(LINE, |l| l.starts_with("upstream connections:")).await;
    assert_eq!(line, format!("upstream connections: 1 (workers: {WORKERS})"));
    // Connected only now, so the demo's count above saw the agent's connection alone.
    let admin = RegistryClient::connect(addr.as_str()).await.unwrap();
    // The demo's own short-lived stats connection may still be closing.
    poll_until(LINE, "one upstream connection and one watch", || async {
        admin.stats().await.map(|s| (s.connections, s.watches) == (1, 1)).unwrap_or(false)
    })
    .await;
    let mut demo = Demo { master, agent, workers: BTreeMap::new(), admin, _server: server };
    // Learn each worker's id from the values it prints.
    demo.put_and_expect("hello", &pids.iter().copied().collect()).await;
    for line in &demo.master.seen {
        if let (Some(id), Some(pid)) = (field(line, "worker"), field(line, "pid")) {
            demo.workers.insert(id.parse().unwrap(), pid.parse().unwrap());
        }
    }
    assert_eq!(demo.workers.len(), WORKERS);
    demo
}

impl Demo {
    /// Puts `value` and waits until every pid in `pids` printed it; returns the epochs seen.
    async fn put_and_expect(&mut self, value: &str, pids: &HashSet<i32>) -> HashSet<String> {
        self.admin.put("k", value.to_string()).await.unwrap();
        let mut waiting = pids.clone();
        let mut epochs = HashSet::new();
        while !waiting.is_empty() {
            let line = self.master.expect_line(LINE, |l| field(l, "value") == Some(value)).await;
            waiting.remove(&field(&line, "pid").unwrap().parse::<i32>().unwrap());
            epochs.insert(field(&line, "epoch").unwrap().to_string());
        }
        epochs
    }

    fn worker_pids(&self) -> HashSet<i32> {
        self.workers.values().copied().collect()
    }

    /// Every worker's values are in (epoch, seq) order, none repeated.
    fn assert_in_order(&self) {
        assert_in_order(&self.master.seen, "pid");
    }
}

fn kill(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
}

async fn supervision(transport: &str) {
    let mut demo = start(transport).await;

    // kill -9 a worker: restarted in its slot, resubscribed, receives the next put.
    let (&id, &old) = demo.workers.iter().next().unwrap();
    kill(old);
    let line = demo.master.expect_line(LINE, |l| l.starts_with("worker restarted:")).await;
    assert_eq!(field(&line, "worker"), Some(id.to_string().as_str()));
    let new: i32 = field(&line, "pid").unwrap().parse().unwrap();
    assert_ne!(new, old);
    demo.workers.insert(id, new);
    let pids = demo.worker_pids();
    demo.put_and_expect("after-worker-restart", &pids).await;

    // kill -9 the agent: a new agent with a higher epoch; every worker has the next put within 2 s.
    kill(demo.agent);
    let line = demo.master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
    assert_eq!(field(&line, "epoch"), Some("2"));
    demo.agent = field(&line, "pid").unwrap().parse().unwrap();
    let started = std::time::Instant::now();
    let epochs = demo.put_and_expect("after-agent-restart", &pids).await;
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(epochs, HashSet::from(["2".to_string()]));
    demo.assert_in_order();
    assert!(demo.workers.values().all(|pid| alive(*pid)), "workers are not restarted when the agent is");

    // SIGTERM: exit code 0 within the grace period, no child left.
    demo.master.signal(Signal::SIGTERM);
    let status = demo.master.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    let children: Vec<i32> = demo.workers.values().copied().chain([demo.agent]).collect();
    assert!(children.iter().all(|pid| !alive(*pid)), "children left: {children:?}");
}

#[tokio::test]
async fn direct_transport_survives_worker_and_agent_deaths_and_stops_cleanly() {
    tokio::time::timeout(TIMEOUT, supervision("direct")).await.expect("test timed out")
}

#[tokio::test]
async fn messenger_transport_passes_the_same_tests() {
    tokio::time::timeout(TIMEOUT, supervision("messenger")).await.expect("test timed out")
}

#[tokio::test]
async fn killing_the_master_leaves_no_child_behind() {
    tokio::time::timeout(TIMEOUT, async {
        let demo = start("auto").await;
        let children: Vec<i32> = demo.workers.values().copied().chain([demo.agent]).collect();
        demo.master.signal(Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while children.iter().any(|pid| alive(*pid)) {
            assert!(tokio::time::Instant::now() < deadline, "children alive 1 s after the master died");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("test timed out")
}

/// The Leader's followers now, by pid: their transport (`tandem leader NAME --json`).
async fn transports(xdg: &std::path::Path, name: &str) -> BTreeMap<i64, String> {
    let out = common::cli::tandem(xdg, &["leader", name, "--json"]).await;
    assert!(out.status.success(), "tandem leader: {}", common::cli::stderr(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("leader --json");
    let list = stats["follower_list"].as_array().expect("follower_list").iter();
    list.map(|f| (f["pid"].as_i64().expect("pid"), f["transport"].as_str().expect("transport").to_owned())).collect()
}

/// Waits for a line matching `pred`, unless one came already.
async fn line_seen(proc: &mut Proc, pred: impl Fn(&str) -> bool) {
    if !proc.seen.iter().any(|l| pred(l)) {
        proc.expect_line(LINE, pred).await;
    }
}

/// Waits until each of `pids` printed `value` (in a line seen already or to come).
async fn value_reaches(proc: &mut Proc, value: &str, pids: &[i32]) {
    for pid in pids {
        let pid = pid.to_string();
        line_seen(proc, |l| field(l, "value") == Some(value) && field(l, "pid") == Some(pid.as_str())).await;
    }
}

/// Polls the Leader until the follower of `pid` uses `transport`.
async fn until_transport(xdg: &std::path::Path, name: &str, pid: i32, transport: &str) {
    let what = format!("worker pid {pid} on {transport}");
    poll_until(LINE, &what, || async {
        transports(xdg, name).await.get(&i64::from(pid)) == Some(&transport.to_owned())
    })
    .await;
}

#[tokio::test]
async fn auto_transport_falls_back_to_the_messenger_and_returns_to_direct() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = common::private_dir();
        let name = "auto-it";
        let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
        let addr = server.local_addr().to_string();
        let args = [
            "--workers",
            "2",
            "--registry",
            &addr,
            "--subscribe",
            "k",
            "--transport",
            "auto",
            "--write-every",
            "0",
            "--name",
            name,
        ];
        let env = [("XDG_RUNTIME_DIR", xdg.path().as_os_str())];
        let mut master = Proc::spawn_with(&example("config_center"), &args, &env, true);
        let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let workers: Vec<i32> = field(&ready, "workers").unwrap().split(',').map(|p| p.parse().unwrap()).collect();
        let admin = RegistryClient::connect(addr.as_str()).await.unwrap();
        // Both workers reach the Leader's socket directly.
        for &pid in &workers {
            until_transport(xdg.path(), name, pid, "unix").await;
        }

        // The socket becomes unreachable (moved away: the Leader still listens
        // on it); a worker that connects now cannot use it.
        let runtime = std::fs::read_dir(xdg.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("leader.sock").exists())
            .expect("the runtime directory with the Leader's socket");
        let (socket, away) = (runtime.join("leader.sock"), runtime.join("leader.sock.away"));
        std::fs::rename(&socket, &away).unwrap();
        kill(workers[0]);
        let line = master.expect_line(LINE, |l| l.starts_with("worker restarted:")).await;
        let moved: i32 = field(&line, "pid").unwrap().parse().unwrap();
        line_seen(&mut master, |l| l.contains("leader socket unreachable; using the messenger relay")).await;
        until_transport(xdg.path(), name, moved, "messenger").await;
        assert_eq!(transports(xdg.path(), name).await.get(&i64::from(workers[1])).map(String::as_str), Some("unix"));
        // Values reach it through the relay.
        admin.put("k", "via-relay").await.unwrap();
        value_reaches(&mut master, "via-relay", &[moved, workers[1]]).await;

        // The socket is back: the worker leaves the relay for it (probed every second).
        std::fs::rename(&away, &socket).unwrap();
        line_seen(&mut master, |l| l.contains("leader socket reachable again; leaving the relay")).await;
        until_transport(xdg.path(), name, moved, "unix").await;
        let now = transports(xdg.path(), name).await;
        assert!(now.values().all(|t| t == "unix"), "no follower left on the relay: {now:?}");
        admin.put("k", "direct-again").await.unwrap();
        value_reaches(&mut master, "direct-again", &[moved, workers[1]]).await;
        // Across both moves: every worker's values in (epoch, seq) order, none twice.
        assert_in_order(&master.seen, "pid");
        drop(server);
    })
    .await
    .expect("test timed out")
}

/// Every path under `dir`, relative to it.
fn tree(dir: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut paths = std::collections::BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).unwrap_or_else(|e| panic!("read {}: {e}", at.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                todo.push(path.clone());
            }
            paths.insert(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    paths
}

#[tokio::test]
async fn a_clean_stop_leaves_nothing_in_the_runtime_and_temp_directories() {
    tokio::time::timeout(TIMEOUT, async {
        // The cluster's runtime directory goes under XDG_RUNTIME_DIR, and
        // anything it puts in the temp dir under TMPDIR: both fresh, so
        // nothing else writes there meanwhile.
        let (xdg, tmp) = (common::private_dir(), common::private_dir());
        let before = (tree(xdg.path()), tree(tmp.path()));
        let name = "leftovers-it";
        let mut master = Proc::spawn_with_env(
            &example("config_center"),
            &["--workers", "2", "--name", name, "--write-every", "50"],
            &[("XDG_RUNTIME_DIR", xdg.path()), ("TMPDIR", tmp.path())],
        );
        let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let agent: i32 = field(&ready, "agent").unwrap().parse().unwrap();
        // Running: its name directory (lock, control socket, leader socket) is there.
        let running = tree(xdg.path());
        assert!(running.contains(&std::path::Path::new("tandem").join(name)), "{running:?}");
        // Values flow to the workers (the embedded registry writes every 50 ms).
        master.expect_line(LINE, |l| field(l, "source") == Some("live")).await;

        master.signal(Signal::SIGTERM);
        let status = master.wait(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0));
        assert!(!alive(agent), "the agent outlived its master");
        // The clusters' parent directory (`tandem`, shared by every cluster
        // of this user) may stay; nothing of this cluster does.
        let mut after = (tree(xdg.path()), tree(tmp.path()));
        after.0.remove(std::path::Path::new("tandem"));
        assert_eq!(after, before, "left behind by a clean stop (runtime dir, temp dir)");
    })
    .await
    .expect("test timed out")
}

/// `config_center --log-dir DIR | head -2`: the demo's master function panics
/// printing to a closed stdout. The cluster stops with a clear error and exit code 1,
/// leaving no child behind (a panic used to end only the function's task, so a
/// cluster it was to stop ran on until killed).
#[tokio::test]
async fn a_master_function_that_panics_stops_the_cluster_with_an_error() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = common::private_dir();
        // The children's output goes to their log files, so only the master's
        // own stdout is the closed pipe: a worker printing to it would panic
        // too, and crash-loop the cluster short of ready, on its own timing.
        let logs = common::private_dir();
        let log_dir = logs.path().join("logs");
        let mut command = tokio::process::Command::new(example("config_center"));
        command
            .args(["--workers", "2", "--duration", "30", "--log-dir"])
            .arg(&log_dir)
            .env("XDG_RUNTIME_DIR", xdg.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn config_center");
        // Nobody reads the demo's output: its first line fails with EPIPE.
        drop(child.stdout.take());
        let stderr = child.stderr.take().expect("stderr");
        let out = tokio::spawn(async move {
            let mut text = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::BufReader::new(stderr), &mut text).await.ok();
            text
        });
        let status = tokio::time::timeout(LINE, child.wait()).await.expect("the cluster did not stop").unwrap();
        let text = out.await.unwrap();
        assert_eq!(status.code(), Some(1), "{text}");
        assert!(text.contains("the master function panicked"), "{text}");
        // Every child it had started is gone.
        let ready = text.lines().find(|l| l.contains("cluster ready: ")).map(str::to_owned);
        if let Some(line) = ready {
            let line = &line[line.find("cluster ready: ").unwrap()..];
            let mut pids: Vec<i32> = vec![field(line, "agent").unwrap().parse().unwrap()];
            pids.extend(field(line, "workers").unwrap().split(',').map(|p| p.parse::<i32>().unwrap()));
            poll_until(LINE, "every child gone", || {
                let pids = pids.clone();
                async move { pids.iter().all(|pid| !alive(*pid)) }
            })
            .await;
        }
    })
    .await
    .expect("test timed out")
}
