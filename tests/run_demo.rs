//! The `tandem run` demos of README.md, end to end: the Node.js app
//! (`clients/node/examples/greeting.js`) and the Python app
//! (`clients/python/examples/greeting.py`), each under the real `tandem run`
//! with 2 workers and the embedded registry. Every worker prints each value
//! of `app.greeting` it receives, the registry sees ONE connection (the
//! agent's Leader), and both workers serve the latest value on the one port.
//!
//! They need the clients' dependencies: `npm ci` in clients/node, and a
//! Python with `tandem_follower` (clients/python/.venv, as
//! clients/python/ci.sh makes it). Without them each test says so and
//! passes, unless `TANDEM_DEMO_REQUIRED=1`, which `.ci/run` sets after
//! installing them.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cli::{stderr, tandem};
use common::{Proc, field, private_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `Ok(command)` to run the demo, or why it cannot run here.
fn node_demo() -> Result<Vec<String>, String> {
    let ok = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        return Err("node is not installed".into());
    }
    if !repo().join("clients/node/node_modules/@msgpack/msgpack").exists() {
        return Err("clients/node has no node_modules: run `npm ci` there".into());
    }
    Ok(vec!["node".into(), repo().join("clients/node/examples/greeting.js").display().to_string()])
}

fn python_demo() -> Result<Vec<String>, String> {
    let venv = repo().join("clients/python/.venv/bin/python");
    let candidates = [venv, PathBuf::from("python3")];
    for python in candidates {
        let ok = std::process::Command::new(&python)
            .args(["-c", "import tandem_follower, msgpack"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            let script = repo().join("clients/python/examples/greeting.py");
            return Ok(vec![python.display().to_string(), script.display().to_string()]);
        }
    }
    Err("no Python with tandem_follower: run clients/python/ci.sh (it makes clients/python/.venv)".into())
}

/// Skips (or, with TANDEM_DEMO_REQUIRED=1, fails) when the demo cannot run here.
fn or_skip(demo: Result<Vec<String>, String>, name: &str) -> Option<Vec<String>> {
    match demo {
        Ok(command) => Some(command),
        Err(why) if std::env::var("TANDEM_DEMO_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("the {name} demo cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: the {name} demo: {why}");
            None
        }
    }
}

/// One HTTP request on a new connection: (x-worker-id, body).
async fn http(addr: &str, method: &str, body: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{method} / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let worker = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-worker-id:").map(|v| v.trim().to_owned()))
        .unwrap();
    (worker, body.trim().to_owned())
}

/// Waits until both workers (but those in `workers` already) print `value=<value>` for app.greeting.
async fn both_print(proc: &mut Proc, value: &str, mut workers: HashSet<String>) {
    while workers.len() < 2 {
        let line = proc
            .expect_line(STEP, |l| {
                l.starts_with("worker=") && field(l, "key") == Some("app.greeting") && field(l, "value") == Some(value)
            })
            .await;
        workers.insert(field(&line, "worker").unwrap().to_owned());
    }
}

/// `tandem run --name NAME --workers 2 --listen 127.0.0.1:0 UPSTREAM.. --subscribe
/// app.greeting -- COMMAND`, as the README's demo runs it; returns once both
/// workers are ready, with the address they serve.
async fn run_two(xdg: &Path, name: &str, upstream: &[&str], command: &[String]) -> (Proc, String) {
    let mut args = vec!["run", "--name", name, "--workers", "2", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(upstream);
    args.extend(["--subscribe", "app.greeting", "--"]);
    args.extend(command.iter().map(String::as_str));
    let mut proc = {
        let _fork = common::cli::forking();
        Proc::spawn_with(Path::new(env!("CARGO_BIN_EXE_tandem")), &args, &[("XDG_RUNTIME_DIR", xdg.as_os_str())], false)
    };
    let addr = proc.expect_line(STEP, |l| l.starts_with("listening on ")).await;
    let addr = addr.trim_start_matches("listening on ").split(' ').next().unwrap().to_owned();
    proc.expect_line(STEP, |l| l.starts_with("ready: 2 workers")).await;
    (proc, addr)
}

async fn demo(command: Vec<String>, name: &str) {
    let xdg = private_dir();
    let (mut proc, addr) = run_two(xdg.path(), name, &["--put", "app.greeting=hello"], &command).await;
    let registry =
        proc.seen.iter().find_map(|l| l.strip_prefix("registry on ")).expect("the registry's line").to_owned();
    // Printed before or after the cluster's ready line: look at every line so far too.
    let early: HashSet<String> = proc
        .seen
        .iter()
        .filter(|l| l.starts_with("worker=") && field(l, "value") == Some("hello"))
        .filter_map(|l| field(l, "worker").map(str::to_owned))
        .collect();
    if early.len() < 2 {
        both_print(&mut proc, "hello", early).await;
    }

    // ONE registry connection serves both workers: the agent's Leader's.
    let stats = tandem::registry::RegistryClient::connect(registry.as_str()).await.unwrap().stats().await.unwrap();
    assert_eq!(stats.connections, 1, "{stats:?}");

    // A write through one worker (its Follower, the Leader, the registry) reaches both.
    let (_, written) = http(&addr, "PUT", "hi-from-the-test").await;
    assert_eq!(written, "app.greeting=hi-from-the-test");
    both_print(&mut proc, "hi-from-the-test", HashSet::new()).await;
    let mut served = HashSet::new();
    for _ in 0..500 {
        let (worker, body) = http(&addr, "GET", "").await;
        assert_eq!(body, "hi-from-the-test");
        served.insert(worker);
        if served.len() == 2 {
            break;
        }
    }
    assert_eq!(served.len(), 2, "both workers serve the port: {served:?}");
    let out = tandem(xdg.path(), &["stop", name]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(proc.finish(STEP).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_demo_prints_and_serves_each_value_from_one_registry_connection() {
    let Some(command) = or_skip(node_demo(), "Node.js") else { return };
    tokio::time::timeout(TIMEOUT, demo(command, "demo-node")).await.expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_demo_prints_and_serves_each_value_from_one_registry_connection() {
    let Some(command) = or_skip(python_demo(), "Python") else { return };
    tokio::time::timeout(TIMEOUT, demo(command, "demo-python")).await.expect("test timed out");
}

#[cfg(feature = "redis")]
mod redis_support;

/// `tandem run --redis`: the Leader's Redis adapter, values set with the real
/// `redis-cli` reaching every worker's program.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn the_python_demo_follows_redis_through_the_one_leader() {
    let Some(command) = or_skip(python_demo(), "Python") else { return };
    tokio::time::timeout(TIMEOUT, async {
        let redis = redis_support::Redis::start().await;
        let xdg = private_dir();
        let url = redis.url();
        let (mut proc, addr) = run_two(xdg.path(), "demo-redis", &["--redis", &url], &command).await;
        redis.cli(&["set", "app.greeting", "from-redis"]);
        both_print(&mut proc, "from-redis", HashSet::new()).await;
        assert_eq!(http(&addr, "GET", "").await.1, "from-redis");
        // The agent's Leader's two connections (commands, pub/sub), whatever the workers.
        assert_eq!(redis.clients(), 2);
        let out = tandem(xdg.path(), &["stop", "demo-redis"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}

#[cfg(feature = "etcd")]
#[path = "../etcd/tests/support/mod.rs"]
mod etcd_support;

/// `tandem run --etcd`: the Leader's etcd adapter, a value put by another
/// etcd client reaching every worker's program.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn the_python_demo_follows_etcd_through_the_one_leader() {
    use tandem::etcd_upstream::etcd::{Config, EtcdClient};
    let Some(command) = or_skip(python_demo(), "Python") else { return };
    tokio::time::timeout(TIMEOUT, async {
        let etcd = etcd_support::Etcd::single().await;
        let endpoint = etcd.endpoint(0);
        let xdg = private_dir();
        let (mut proc, addr) = run_two(xdg.path(), "demo-etcd", &["--etcd", &endpoint], &command).await;
        let writer = EtcdClient::connect(Config::new([endpoint.clone()])).await.unwrap();
        writer.put("app.greeting", "from-etcd".to_owned()).await.unwrap();
        both_print(&mut proc, "from-etcd", HashSet::new()).await;
        assert_eq!(http(&addr, "GET", "").await.1, "from-etcd");
        let out = tandem(xdg.path(), &["stop", "demo-etcd"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}
