//! One Leader carrying many subscribed keys through ONE registry connection, and
//! what that costs in memory: subscribes N distinct keys (default 100 000) from a
//! follower process through one Leader, puts to a sample of them, checks every
//! sampled value arrives, and prints the resident memory (VmRSS, from /proc) of
//! the Leader's process, the registry's and the follower's.
//!
//! ```text
//! cargo build --release -p tandem-registry --example many_keys
//! target/release/examples/many_keys --keys 100000 --sample 1000
//! ```
//!
//! It starts the real `tandem-registry` binary (`--registry-bin`, by default
//! next to the example's folder: `target/<profile>/tandem-registry`), runs the
//! Leader in this process, and itself again as the follower (`--follow SOCKET`).
//! Output: `subscribed=<N> in_ms=<ms>`, then one `rss` line per process, then
//! `received=<S> of sample=<S>`; the exit code is non-zero if a sampled value
//! does not arrive within 60 s.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use tandem::registry_upstream::{ConfigApi, RegistryUpstream};
use tandem::{Connection, Leader, UnixConnector};

#[derive(Parser, Debug)]
#[command(about = "Many subscribed keys through one Leader: check delivery, measure memory")]
struct Args {
    /// Distinct keys to subscribe.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Keys (spread over the whole range) to put a value to and wait for.
    #[arg(long, default_value_t = 1_000)]
    sample: usize,
    /// Subscribes in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// The follower's per-subscription buffer (`follower::Config::subscription_buffer`;
    /// the library default is 256, and it is most of the follower's memory per key).
    #[arg(long, default_value_t = 256)]
    follower_buffer: usize,
    /// The `tandem-registry` binary.
    #[arg(long)]
    registry_bin: Option<PathBuf>,
    /// Internal: run as the follower of the Leader at this socket.
    #[arg(long, hide = true)]
    follow: Option<PathBuf>,
}

fn key(i: usize) -> String {
    format!("many/{i:07}")
}

fn sample(args: &Args) -> Vec<usize> {
    let n = args.sample.clamp(1, args.keys.max(1));
    (0..n).map(|j| j * args.keys / n).collect()
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    match args.follow.clone() {
        Some(socket) => runtime.block_on(follow(&args, &socket)),
        None => runtime.block_on(lead(&args)),
    }
}

/// The follower: subscribes every key, reports, then waits for the sampled values.
async fn follow(args: &Args, socket: &Path) -> anyhow::Result<()> {
    let mut config = tandem::follower::Config::default();
    config.subscription_buffer = args.follower_buffer;
    let connection =
        Connection::builder().config(config).channel::<ConfigApi>().connect(UnixConnector::new(socket)).spawn();
    let client = connection.client::<ConfigApi>();
    client.ready().await.context("no leader")?;
    let started = Instant::now();
    let subs: Vec<_> = futures::stream::iter(0..args.keys)
        .map(|i| {
            let client = client.clone();
            async move { client.subscribe(key(i)).await.map(|s| (i, s)) }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut streams = futures::stream::SelectAll::new();
    for sub in subs {
        let (i, sub) = sub.context("subscribe failed")?;
        streams.push(sub.map(move |update| (i, update)));
    }
    println!("subscribed={} in_ms={}", args.keys, started.elapsed().as_millis());
    let mut wanted: HashSet<usize> = sample(args).into_iter().collect();
    let total = wanted.len();
    while !wanted.is_empty() {
        let Some((i, update)) = streams.next().await else { bail!("subscriptions ended") };
        if update.value.value.as_deref() == Some("sampled") {
            wanted.remove(&i);
        }
    }
    println!("received={total}");
    std::io::stdout().flush()?;
    // Stay subscribed until the leader process is done measuring.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    connection.close().await;
    Ok(())
}

/// The Leader's process: a registry, the Leader, a follower child; measures.
async fn lead(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let registry_bin = match &args.registry_bin {
        Some(path) => path.clone(),
        None => exe.parent().and_then(Path::parent).context("no target dir")?.join("tandem-registry"),
    };
    let mut registry = Command::new(&registry_bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("cannot start {} (build it: cargo build -p tandem-registry)", registry_bin.display())
        })?;
    let _registry_guard = KillOnDrop(registry.id());
    let mut lines = BufReader::new(registry.stdout.take().context("registry stdout")?).lines();
    let first = lines.next().context("the registry printed nothing")??;
    let addr = first.strip_prefix("listening on ").context("unexpected registry output")?.trim().to_string();

    let upstream = RegistryUpstream::connect(addr.clone()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let leader = Leader::builder().channel_from::<ConfigApi, _>(async move { Ok(upstream) }).start();
    let dir = tempfile::Builder::new().prefix("tandem-many-keys").tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let socket = leader.bind_unix(dir.path().join("leader.sock"))?;

    let mut child = Command::new(&exe)
        .args(["--keys", &args.keys.to_string(), "--sample", &args.sample.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--follower-buffer", &args.follower_buffer.to_string()])
        .arg("--follow")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let _child_guard = KillOnDrop(child.id());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().context("follower stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let subscribed = tokio::time::timeout(Duration::from_secs(600), rx.recv()).await?.context("follower exited")?;
    println!("{subscribed}");

    let admin = tandem::registry::RegistryClient::connect(addr.as_str()).await?;
    let stats = admin.stats().await?;
    let leader_stats = leader.stats();
    let keys: usize = leader_stats.channels.iter().map(|c| c.subscriptions).sum();
    println!("registry connections={} watches={} leader keys={keys}", stats.connections, stats.watches);
    println!("rss leader_process_kib={}", rss_kib(std::process::id())?);
    println!("rss registry_kib={}", rss_kib(registry.id())?);
    println!("rss follower_kib={}", rss_kib(child.id())?);

    let started = Instant::now();
    // 256 puts in flight on one registry connection.
    let puts = futures::stream::iter(sample(args)).map(|i| {
        let admin = &admin;
        async move { admin.put(&key(i), "sampled").await }
    });
    let mut puts = puts.buffer_unordered(256);
    while let Some(put) = puts.next().await {
        put?;
    }
    drop(puts);
    let received = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
    let received = match received {
        Ok(Some(line)) => line,
        _ => bail!("the sampled values did not all arrive within 60 s"),
    };
    println!("{received} of sample={} in_ms={}", sample(args).len(), started.elapsed().as_millis());
    println!(
        "rss after puts: leader_process_kib={} registry_kib={}",
        rss_kib(std::process::id())?,
        rss_kib(registry.id())?
    );
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin);
    }
    let _ = child.wait();
    leader.shutdown().await;
    Ok(())
}

/// Kills a child process by pid when dropped (SIGKILL; reaped by its `Child` or at exit).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
