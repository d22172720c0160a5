//! Standalone mode: several processes elect a leader among themselves (no
//! master) and share ONE connection to the bundled registry.
//!
//! Run it in several terminals with the same `--name` and `--dir`, or let it
//! spawn the processes:
//!
//! ```text
//! cargo run --example standalone -- --spawn 4 --subscribe app.greeting
//! ```
//!
//! Without `--registry ADDR` an embedded registry server is started (by the
//! `--spawn` parent, or else by the first process in `--dir`) and, with
//! `--write-every MS` (on by default with an embedded registry), a writer
//! changes the first subscribed key so values flow. Kill the leader
//! (`kill -9 <pid>` of the process that printed `role=leader`) and watch a
//! follower take over with a higher epoch: the followers log `WARN lost the
//! leader`, a fault.
//!
//! One follower is the hot standby (it logs `this process is the hot
//! standby` at INFO): it mirrors the leader without an upstream connection
//! and, when the leader dies, leads at once, serving the mirrored values (its
//! INFO line: `the standby took over ... keys=N`); another follower becomes
//! the standby (`docs/using.md`, Hot standby).
//!
//! A graceful hand-off instead: `kill -USR2 <pid>` of the leader makes it step
//! down (`Connection::step_down`) and stay on as a follower; `kill <pid>`
//! (SIGTERM) or Ctrl-C makes it close, which hands off too, and exit 0.
//! Either way the next process leads at the next epoch at once, and the
//! followers log the hand-off at INFO (`RUST_LOG=info` shows it: the default
//! filter here is `warn`), with no WARN:
//!
//! ```text
//! pid=4101 stepped_down=yes
//! INFO tandem_follower::core: the leader handed off; following the next leader epoch=1
//! INFO tandem_follower::driver: following the new leader after the hand-off epoch.previous=1 epoch=2 ...
//! pid=4102 role=leader epoch=2
//! ```
//!
//! What lives in the leader's memory goes with it (here the registry is
//! outside, so every value survives): see `docs/state.md`.
//!
//! With `--cache-dir DIR` the elected leader keeps the last value of every
//! subscribed key in DIR and serves it, marked `source=cache`, while the
//! registry is unreachable (also right after start). The leader starts even
//! when the registry is down and keeps reconnecting.
//!
//! Output, one line each:
//! - on every role change: `pid=<pid> role=<leader|follower> epoch=<epoch>`
//! - on every value: `pid=<pid> role=<role> key=<key> value=<value> epoch=<epoch> seq=<seq> source=<live|cache>`
//!   (`value=<none>` while the key is absent or after a delete)
//! - on SIGUSR2: `pid=<pid> stepped_down=yes`, or `stepped_down=no` (with the
//!   reason at WARN) when the process does not lead
//!
//! Mistakes end the process at once with exit code 1 and one error line on
//! stderr: an empty or over-long `--subscribe` key, `--spawn 0`, a `--name`
//! that cannot name a file, a socket path over the Unix limit, a `--dir` that
//! other users may enter. A process whose token the leader refuses says so at
//! ERROR and waits (calls fail with the rejection) until that leader exits.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use tandem::registry_upstream::{ConfigApi, ConfigRequest, RegistryUpstream};
use tandem::{Api, Client, Connection, Error, Standalone, State};

#[derive(Parser, Debug, Clone)]
#[command(about = "Processes that elect a leader and share one registry connection")]
struct Args {
    /// The name processes elect under.
    #[arg(long, default_value = "standalone-demo")]
    name: String,
    /// The private directory holding the lock, epoch and socket (created 0700).
    /// The default is $XDG_RUNTIME_DIR/tandem, or /tmp/tandem-<uid>.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The registry's address; without it an embedded one is started.
    #[arg(long)]
    registry: Option<String>,
    /// A key to subscribe to (repeatable). The default is `app.greeting`.
    #[arg(long = "subscribe")]
    keys: Vec<String>,
    /// Spawn this many processes and forward their output.
    #[arg(long)]
    spawn: Option<usize>,
    /// Write the first key every MS milliseconds (0 = never). The default is
    /// 1000 with an embedded registry, 0 otherwise.
    #[arg(long)]
    write_every: Option<u64>,
    /// The token the leader requires and followers present.
    #[arg(long)]
    token: Option<String>,
    /// Keep the last-known-good value of every subscribed key in DIR (created
    /// 0700; files 0600) and serve it while the registry is unreachable.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("tandem"),
        None => std::env::temp_dir().join(format!("tandem-{}", nix::unistd::geteuid())),
    }
}

fn main() -> anyhow::Result<()> {
    tandem::logging::init_with_default("warn");
    let mut args = Args::parse();
    if args.keys.is_empty() {
        args.keys.push("app.greeting".into());
    }
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    check_args(&args, &dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    match args.spawn {
        Some(n) => runtime.block_on(spawn_processes(args, dir, n)),
        None => runtime.block_on(run_process(args, dir)),
    }
}

/// Refuses, before anything starts, what could only fail later.
fn check_args(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let max_key = tandem::registry::Config::default().max_key_size;
    for key in &args.keys {
        if key.is_empty() {
            bail!("--subscribe: the key is empty");
        }
        if key.len() > max_key {
            bail!("--subscribe: the key is {} bytes, over the registry's {max_key}-byte limit", key.len());
        }
    }
    if args.spawn == Some(0) {
        bail!("--spawn 0: spawn at least one process (or leave --spawn out to run one here)");
    }
    Standalone::check(&args.name, dir)?;
    Ok(())
}

/// Waits until the channel is ready. A rejection by the leader (most often a
/// different token) is not fatal here: the driver said why at ERROR and waits
/// for that leader to go, so this waits with it.
async fn wait_ready(client: &Client<ConfigApi>) -> anyhow::Result<()> {
    loop {
        match client.ready().await {
            Ok(()) => return Ok(()),
            Err(Error::Rejected(_)) => {
                let mut status = client.watch();
                status
                    .wait_for(|s| !matches!(s.state_of(ConfigApi::NAME), State::Rejected(_)))
                    .await
                    .context("the connection closed")?;
            }
            // The upstream is down: subscribe anyway (the leader accepts it as
            // pending and serves its cached value, if any).
            Err(Error::Remote(error)) => {
                tracing::warn!(%error, "the upstream is down; subscribing anyway");
                return Ok(());
            }
            Err(error) => return Err(error).context("waiting for a leader"),
        }
    }
}

/// Starts an embedded registry and, if asked, a writer for `key`.
async fn embedded_registry(key: String, write_every: u64) -> anyhow::Result<(tandem::registry::ServerHandle, String)> {
    let server = tandem::registry::Server::bind("127.0.0.1:0", Default::default()).await?.spawn();
    let addr = server.local_addr().to_string();
    if write_every > 0 {
        let writer = tandem::registry::RegistryClient::connect(addr.as_str()).await?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(write_every));
            for n in 1u64.. {
                tick.tick().await;
                if writer.put(&key, format!("hello-{n}")).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok((server, addr))
}

/// The parent: an embedded registry if needed, N children, their lines forwarded.
async fn spawn_processes(args: Args, dir: PathBuf, n: usize) -> anyhow::Result<()> {
    let mut server = None;
    let registry = match &args.registry {
        Some(addr) => addr.clone(),
        None => {
            let (handle, addr) = embedded_registry(args.keys[0].clone(), args.write_every.unwrap_or(1000)).await?;
            eprintln!("embedded registry listening on {addr}");
            server = Some(handle);
            addr
        }
    };
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(1024);
    for _ in 0..n {
        let mut command = Command::new(&exe);
        command.args(["--name", &args.name, "--registry", &registry, "--write-every", "0"]);
        command.arg("--dir").arg(&dir);
        for key in &args.keys {
            command.args(["--subscribe", key]);
        }
        if let Some(token) = &args.token {
            command.args(["--token", token]);
        }
        if let Some(cache_dir) = &args.cache_dir {
            command.arg("--cache-dir").arg(cache_dir);
        }
        command.stdout(Stdio::piped());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory of the parent; it runs in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().context("spawning a process")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(lines_tx);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => println!("{line}"),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(server);
    Ok(())
}

/// The registry address for a process without `--registry`: the first process
/// in `dir` starts an embedded registry and publishes its address in a file.
async fn shared_registry(
    args: &Args,
    dir: &Path,
) -> anyhow::Result<(Option<(tandem::registry::ServerHandle, nix::fcntl::Flock<std::fs::File>)>, String)> {
    let lock_path = dir.join(format!("{}.registry.lock", args.name));
    let addr_path = dir.join(format!("{}.registry", args.name));
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let (server, addr) = embedded_registry(args.keys[0].clone(), args.write_every.unwrap_or(1000)).await?;
            let tmp = addr_path.with_extension("tmp");
            std::fs::write(&tmp, &addr)?;
            std::fs::rename(&tmp, &addr_path)?;
            eprintln!("embedded registry listening on {addr}");
            Ok((Some((server, lock)), addr))
        }
        Err(_) => {
            for _ in 0..500 {
                if let Ok(addr) = std::fs::read_to_string(&addr_path)
                    && !addr.is_empty()
                {
                    return Ok((None, addr));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            bail!("no registry address in {} after 5 s", addr_path.display())
        }
    }
}

/// One process: elect, subscribe, print.
async fn run_process(args: Args, dir: PathBuf) -> anyhow::Result<()> {
    let (_embedded, registry) = match &args.registry {
        Some(addr) => (None, addr.clone()),
        None => shared_registry(&args, &dir).await?,
    };
    let pid = std::process::id();
    let cache = match &args.cache_dir {
        Some(dir) => Some(tandem::leader::Cache::open(dir).with_context(|| format!("--cache-dir {}", dir.display()))?),
        None => None,
    };
    let connector = Standalone::new(args.name.clone(), dir, move |builder| {
        let registry = registry.clone();
        let builder = match &cache {
            Some(cache) => builder.cache(cache.clone()),
            None => builder,
        };
        // Started even while the registry is down; rebuilt until it answers.
        builder.channel_with_retry::<ConfigApi, _, _, _>(move || RegistryUpstream::connect(registry.clone()))
    })
    .token(args.token.clone());
    let mut config = tandem::follower::Config::default();
    config.token = args.token.clone();
    let connection = Connection::builder().config(config).channel::<ConfigApi>().connect(connector).spawn();
    let client = connection.client::<ConfigApi>();
    // Handled from now on (its default action would end the process).
    let mut sigusr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?;

    // Print every role change.
    let mut status = connection.status();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let current = {
                let status = status.borrow_and_update();
                status.epoch().map(|epoch| (status.is_leader(), epoch))
            };
            if let Some((leader, epoch)) = current
                && last != current
            {
                println!("pid={pid} role={} epoch={epoch}", role(leader));
                last = current;
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    });

    wait_ready(&client).await?;
    let mut streams = futures::stream::SelectAll::new();
    for key in &args.keys {
        let subscription = loop {
            match client.subscribe(key.clone()).await {
                Ok(subscription) => break subscription,
                Err(error) if error.is_retryable() || matches!(error, Error::Rejected(_)) => {
                    tracing::warn!(%error, key, "subscribe failed; retrying");
                    wait_ready(&client).await?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error).context("subscribe"),
            }
        };
        let key = key.clone();
        streams.push(subscription.map(move |update| (key.clone(), update)).boxed());
    }

    // With an embedded registry and a writer in this process, a get now and then shows invoke at work.
    let reader = client.clone();
    let first_key = args.keys[0].clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Err(error) = reader.invoke(ConfigRequest::Get(first_key.clone())).await {
                tracing::debug!(%error, "get failed");
            }
        }
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = sigusr2.recv() => match connection.step_down().await {
                Ok(()) => println!("pid={pid} stepped_down=yes"),
                Err(error) => {
                    tracing::warn!(%error, "SIGUSR2: cannot step down");
                    println!("pid={pid} stepped_down=no");
                }
            },
            item = streams.next() => {
                let Some((key, update)) = item else { break };
                let value = update.value.value.unwrap_or_else(|| "<none>".into());
                println!(
                    "pid={pid} role={} key={key} value={value} epoch={} seq={} source={}",
                    role(client.is_leader()),
                    update.epoch,
                    update.seq,
                    update.source
                );
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // On the leading process, close hands off: the others re-elect at once, with no WARN.
    connection.close().await;
    Ok(())
}

fn role(leader: bool) -> &'static str {
    if leader { "leader" } else { "follower" }
}
