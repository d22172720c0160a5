//! The main demo: a master, an agent whose Leader holds ONE connection to the
//! registry, and N workers whose Followers subscribe to config keys through it.
//!
//! ```text
//! cargo run --example config_center -- --workers 4
//! ```
//!
//! Without `--registry ADDR` the master starts an embedded registry server and
//! changes `--subscribe`'s first key every second, so values flow. With it, the
//! demo only subscribes (`--write-every MS` turns the writer on).
//!
//! Against etcd (built with the `etcd` feature; see `docs/etcd.md`):
//!
//! ```text
//! cargo run --features etcd --example config_center -- --etcd http://127.0.0.1:2379 --workers 4 --subscribe K
//! etcdctl --endpoints http://127.0.0.1:2379 put K hello     # all 4 workers print value=hello
//! ```
//!
//! Against Redis (built with the `redis` feature; see `docs/redis.md`):
//!
//! ```text
//! cargo run --features redis --example config_center -- --redis redis://127.0.0.1:6379 --workers 4 --subscribe K
//! redis-cli -p 6379 set K hello                                # all 4 workers print value=hello
//! ```
//!
//! `--etcd ENDPOINTS` (comma-separated) gives the agent's Leader an etcd client
//! instead of the registry's; the demo then only subscribes unless
//! `--write-every MS` is given (the master then writes through its own etcd
//! connection). `--register SERVICE` (with the registry or `--etcd`) has each
//! worker register itself as instance `worker-<id>` of SERVICE through the
//! Leader, on the Leader's 2-second lease, and again under each new Leader.
//! `--own PREFIX` has each worker keep the key `PREFIX/worker-<id>` (value
//! `pid=<pid> epoch=<epoch>`) published through the Leader: once per Leader,
//! again when `Client::watch()` shows a new epoch (publishes are not replayed
//! after a failover: the owner re-publishes).
//!
//! Flags: `--workers N`, `--registry ADDR`, `--subscribe KEY` (repeatable; the
//! default is `app.greeting` and `app.flags`), `--transport direct|messenger|auto`,
//! `--write-every MS`, `--duration SECS` (0, the default, runs until a signal),
//! `--cache-dir DIR` (the agent's Leader keeps the last value of every key
//! there and serves it, marked `source=cache`, while the registry is down).
//!
//! The registry may be down when the cluster starts: the agent's Leader starts
//! anyway (workers see the channel as down, calls fail fast), keeps
//! reconnecting, and values flow as soon as the registry is up.
//! `--name NAME` (for the `tandem` CLI; the default is `config_center`),
//! `--metrics ADDR` (serve `/metrics`; port 0 picks one), `--metrics-max-connections N`,
//! `--log-dir DIR` (the agent's and the workers' output into `DIR/<name>/agent.log`,
//! `worker-<K>.log`: rotated, within a quota; `tandem logs NAME` reads them).
//!
//! stdout is the demo's own output, one line each:
//! - with `--metrics`: `metrics on <ADDR>` (the bound address)
//! - once the cluster is ready: `upstream connections: <n> (workers: <N>)`, from the registry's own stats
//!   (`upstream connections: unknown (<why>) ...` while the registry is unreachable: the
//!   cluster starts anyway, and values flow once it is up);
//!   with `--etcd`, the ESTABLISHED TCP connections from the agent and the
//!   workers to the etcd endpoints, read from /proc (the master's writer is not counted);
//!   with `--redis`, the clients in Redis's `CLIENT LIST` but the one asking (and the writer)
//! - with `--register`: `registered: worker=<id> pid=<pid> service=<service> epoch=<leader epoch>`
//! - with `--own`: `owned: worker=<id> pid=<pid> key=<key> epoch=<leader epoch>`
//! - each value a worker receives: `worker=<id> pid=<pid> key=<key> value=<value> epoch=<epoch> seq=<seq> source=<live|cache>`
//!   (`source=cache`: the agent's last-known-good value, served while the registry is unreachable)
//!
//! stderr is the log (`tandem::logging::init`): the cluster logs each of its
//! lifecycle events there once, for example
//! `cluster ready: master=<pid> agent=<pid> workers=<pid>,<pid>,...` (INFO),
//! `agent restarted: pid=<pid> epoch=<epoch>`, `worker restarted: worker=<id> pid=<pid>` (INFO),
//! `hung: agent (pid <pid>) silent_ms=<ms>; killed` (ERROR: a process stopped
//! answering the master's pings, SIGSTOP or a blocked runtime; it then restarts).
//!
//! Mistakes end the master at once with exit code 1 and one error line, before
//! any process starts: `--workers 0`, an empty or over-long `--subscribe` key.
//!
//! Try `kill -9` on the agent's pid: the master starts a new agent with a higher
//! epoch, the workers reconnect and resubscribe, and the values resume. `kill
//! -STOP` on it does the same about 3 seconds later: the master finds it hung. SIGTERM
//! or Ctrl-C stops workers, then the agent, then the master (exit code 0).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use tandem::Connection;
use tandem::cluster::{ClusterEvent, MasterContext, ProcessRole, WorkerContext};
use tandem::cluster_glue::{Transport, WorkerConnector, agent_leader, start_leader};
use tandem::presence::{Presence, stay_registered};
use tandem::registry::Instance;
use tandem::registry_upstream::{ConfigApi, ConfigRequest, RegistryUpstream, ServiceApi};

#[derive(Parser, Debug, Clone)]
#[command(about = "A supervised cluster whose workers share one registry connection")]
struct Args {
    /// Worker processes. The default is the CPUs this process may use.
    #[arg(long)]
    workers: Option<usize>,
    /// The registry's address; without it the master starts an embedded one.
    #[arg(long)]
    registry: Option<String>,
    /// A key the workers subscribe to (repeatable).
    #[arg(long = "subscribe")]
    keys: Vec<String>,
    /// How workers reach the agent's Leader: direct, messenger or auto.
    #[arg(long, default_value = "direct")]
    transport: Transport,
    /// Write the first key every MS milliseconds (0 = never). The default is
    /// 1000 with the embedded registry, 0 with `--registry`.
    #[arg(long)]
    write_every: Option<u64>,
    /// Stop after this many seconds; 0 runs until SIGINT/SIGTERM.
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// etcd endpoints, comma-separated: the Leader uses etcd instead of the
    /// registry. Needs the `etcd` feature.
    #[arg(long, value_name = "ENDPOINTS", conflicts_with = "registry")]
    etcd: Option<String>,
    /// A Redis URL (`redis://HOST:PORT`): the Leader uses Redis instead of the
    /// registry. Needs the `redis` feature.
    #[arg(long, value_name = "URL", conflicts_with_all = ["registry", "etcd"])]
    redis: Option<String>,
    /// Each worker registers itself as an instance of SERVICE through the
    /// Leader (again under each new Leader). With the registry or `--etcd`.
    #[arg(long, value_name = "SERVICE", conflicts_with = "redis")]
    register: Option<String>,
    /// Each worker publishes the key PREFIX/worker-<id> through the Leader,
    /// again under each new Leader.
    #[arg(long, value_name = "PREFIX")]
    own: Option<String>,
    /// Keep the last-known-good value of every subscribed key in DIR (created
    /// 0700; files 0600) and serve it while the upstream is unreachable.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// A child ready for this many milliseconds counts as stable: its next
    /// crash is restarted after the initial delay (100 ms) again, and does not
    /// count towards the crash-loop limit. The default is 30000.
    #[arg(long, value_name = "MS")]
    stable_after: Option<u64>,
    /// Keep a hot standby next to the agent: it mirrors the Leader (no
    /// upstream connection) and takes over at the next epoch when the agent
    /// dies (`Config::standby`). The default is off.
    #[arg(long)]
    standby: bool,
    /// The cluster's name for `tandem ls/status/reload/stop/leader`. The
    /// default is the executable's file name (`config_center`).
    #[arg(long)]
    name: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port;
    /// the address is printed as `metrics on <ADDR>`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Capture the agent's and the workers' stdout and stderr into
    /// DIR/<name>/agent.log and worker-<K>.log (rotated at 10 MiB, 100 MiB in
    /// all; `tandem logs NAME` shows them). Without it they go to this
    /// process's own stdout and stderr.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// The most `/metrics` connections served at once (the default is 64, or
    /// a quarter of the descriptor limit when lower).
    #[arg(long, value_name = "N")]
    metrics_max_connections: Option<usize>,
}

/// Where the children find the registry the master started for them.
const REGISTRY_ENV: &str = "CONFIG_CENTER_REGISTRY";

fn main() -> anyhow::Result<()> {
    tandem::logging::init();
    let mut args = Args::parse();
    if args.keys.is_empty() {
        args.keys = vec!["app.greeting".into(), "app.flags".into()];
    }
    check_args(&args)?;
    if args.etcd.is_some() && !cfg!(feature = "etcd") {
        anyhow::bail!(
            "--etcd needs the etcd adapter, which this build lacks: \
             cargo run --features etcd --example config_center -- --etcd ENDPOINTS ..."
        );
    }
    if args.redis.is_some() && !cfg!(feature = "redis") {
        anyhow::bail!(
            "--redis needs the Redis adapter, which this build lacks: \
             cargo run --features redis --example config_center -- --redis redis://HOST:PORT ..."
        );
    }
    #[cfg(feature = "redis")]
    if let Some(url) = &args.redis {
        tandem::redis_upstream::redis::Client::open(url.as_str()).with_context(|| format!("--redis {url}"))?;
    }
    // Code before the builder runs in every process: only the master binds the
    // embedded registry; the children get its address from the master
    // (`child_env` below).
    let mut embedded = None;
    let embedded_registry = args.registry.is_none() && args.etcd.is_none() && args.redis.is_none();
    let registry = match &args.registry {
        Some(addr) => addr.clone(),
        // Unused: the Leader talks to etcd or Redis.
        None if !embedded_registry => String::new(),
        None if ProcessRole::of_this_process() == ProcessRole::Master => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the embedded registry")?;
            listener.set_nonblocking(true)?;
            let addr = listener.local_addr()?.to_string();
            embedded = Some(listener);
            addr
        }
        None => std::env::var(REGISTRY_ENV).context("the master did not pass the registry address")?,
    };
    if let (Some(dir), ProcessRole::Master) = (&args.cache_dir, ProcessRole::of_this_process()) {
        // Fail here, once, rather than in every agent start.
        tandem::leader::Cache::open(dir).with_context(|| format!("--cache-dir {}", dir.display()))?;
    }
    let write_every = args.write_every.unwrap_or(if embedded_registry { 1000 } else { 0 });

    let mut builder = tandem::cluster::Cluster::builder("config_center");
    if embedded.is_some() {
        builder = builder.child_env(REGISTRY_ENV, registry.clone());
    }
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    if let Some(ms) = args.stable_after {
        let mut policy = tandem::cluster::RestartPolicy::default();
        policy.stable_after = Duration::from_millis(ms);
        builder = builder.restart_policy(policy);
    }
    if let Some(name) = &args.name {
        builder = builder.name(name);
    }
    if args.standby {
        builder = builder.standby(true);
    }
    if let Some(addr) = args.metrics {
        builder = builder.metrics(addr);
    }
    if let Some(dir) = &args.log_dir {
        builder = builder.log_dir(dir);
    }
    if let Some(n) = args.metrics_max_connections {
        builder = builder.metrics_max_connections(n);
    }
    let (agent_registry, agent_etcd, worker_args) = (registry.clone(), args.etcd.clone(), args.clone());
    let cache_dir = args.cache_dir.clone();
    let agent_redis = args.redis.clone();
    builder
        .agent(move |ctx| async move {
            let builder = agent_leader(cache_dir.as_deref())?;
            let leader = match (agent_etcd, agent_redis) {
                #[cfg(feature = "etcd")]
                (Some(endpoints), _) => etcd::leader(&endpoints, builder).await?,
                #[cfg(feature = "redis")]
                (_, Some(url)) => redis::leader(&url, builder).await?,
                _ => {
                    // ONE registry connection for both channels, built when the
                    // registry answers: the Leader starts without it and retries.
                    let shared = Arc::new(tokio::sync::OnceCell::<RegistryUpstream>::new());
                    let connect = move || {
                        let (shared, addr) = (shared.clone(), agent_registry.clone());
                        async move { shared.get_or_try_init(|| RegistryUpstream::connect(addr)).await.cloned() }
                    };
                    builder
                        .channel_with_retry::<ConfigApi, _, _, _>(connect.clone())
                        .channel_with_retry::<ServiceApi, _, _, _>(connect)
                }
            };
            let leader = start_leader(&ctx, leader).await?;
            ctx.stopped().await;
            leader.shutdown().await;
            Ok(())
        })
        .worker(move |ctx| worker(ctx, worker_args))
        .master(move |ctx| master(ctx, embedded, registry, args, write_every))
        .run_blocking()?;
    Ok(())
}

async fn registry_stats(addr: &str) -> anyhow::Result<tandem::registry::Stats> {
    Ok(tandem::registry::RegistryClient::connect(addr).await?.stats().await?)
}

/// Refuses, before the cluster starts, what would only make a worker crash-loop.
fn check_args(args: &Args) -> anyhow::Result<()> {
    if args.workers == Some(0) {
        anyhow::bail!("--workers 0: a cluster needs at least one worker (leave --workers out for one per CPU)");
    }
    let max_key = tandem::registry::Config::default().max_key_size;
    for key in &args.keys {
        if key.is_empty() {
            anyhow::bail!("--subscribe: the key is empty");
        }
        if key.len() > max_key {
            anyhow::bail!("--subscribe: the key is {} bytes, over the registry's {max_key}-byte limit", key.len());
        }
    }
    Ok(())
}

async fn worker(ctx: WorkerContext, args: Args) -> Result<(), tandem::cluster::BoxError> {
    let mut config = tandem::follower::Config::default();
    config.token = Some(ctx.token().to_string());
    let mut connection = Connection::builder().config(config).channel::<ConfigApi>();
    if args.register.is_some() {
        connection = connection.channel::<ServiceApi>();
    }
    let connection = connection.connect(WorkerConnector::new(&ctx, args.transport)).spawn();
    let client = connection.client::<ConfigApi>();
    // No wait for `ready()`: while the upstream is down the Leader accepts
    // subscriptions as pending (and serves its cached values).
    let mut streams = futures::stream::SelectAll::new();
    for key in &args.keys {
        let subscription = loop {
            match client.subscribe(key.clone()).await {
                Ok(subscription) => break subscription,
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, key, "subscribe failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error.into()),
            }
        };
        let key = key.clone();
        streams.push(subscription.map(move |update| (key.clone(), update)).boxed());
    }
    ctx.ready().await?;
    let _presence = args.register.as_deref().map(|service| register(&connection, service, ctx.id()));
    let _owned =
        args.own.as_deref().map(|prefix| own(client.clone(), format!("{prefix}/worker-{}", ctx.id()), ctx.id()));

    let (id, pid) = (ctx.id(), std::process::id());
    let mut gets = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            item = streams.next() => {
                let Some((key, update)) = item else { break };
                let value = update.value.value.unwrap_or_else(|| "<none>".into());
                println!(
                    "worker={id} pid={pid} key={key} value={value} epoch={} seq={} source={}",
                    update.epoch, update.seq, update.source
                );
            }
            _ = gets.tick() => {
                // Now and then a call, through the same leader.
                match client.invoke(ConfigRequest::Get(args.keys[0].clone())).await {
                    Ok(value) => tracing::debug!(?value, "get"),
                    Err(error) => tracing::info!(%error, "get failed"),
                }
            }
            _ = ctx.stopped() => break,
        }
    }
    connection.close().await;
    Ok(())
}

async fn master(
    ctx: MasterContext,
    embedded: Option<std::net::TcpListener>,
    registry: String,
    args: Args,
    write_every: u64,
) -> Result<(), tandem::cluster::BoxError> {
    let _server = match embedded {
        Some(listener) => {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            Some(tandem::registry::Server::from_listener(listener, Default::default())?.spawn())
        }
        None => None,
    };
    #[cfg(feature = "etcd")]
    if let (Some(endpoints), true) = (&args.etcd, write_every > 0) {
        etcd::spawn_writer(endpoints, args.keys[0].clone(), write_every).await?;
    }
    #[cfg(feature = "redis")]
    if let (Some(url), true) = (&args.redis, write_every > 0) {
        redis::spawn_writer(url, args.keys[0].clone(), write_every)?;
    }
    if write_every > 0 && args.etcd.is_none() && args.redis.is_none() {
        // The writer's own connection: a stand-in for whoever changes the config.
        let writer = tandem::registry::RegistryClient::connect(registry.as_str()).await?;
        let key = args.keys[0].clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(write_every));
            for n in 1u64.. {
                tick.tick().await;
                if let Err(error) = writer.put(&key, format!("v{n}")).await {
                    tracing::warn!(%error, "writer stopped");
                    return;
                }
            }
        });
    }
    if let Some(addr) = ctx.metrics_addr() {
        println!("metrics on {addr}");
    }
    let stop_after = async {
        match args.duration {
            0 => std::future::pending().await,
            secs => tokio::time::sleep(Duration::from_secs(secs)).await,
        }
    };
    tokio::pin!(stop_after);
    let mut stopping = false;
    let mut events = ctx.events();
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
            _ = &mut stop_after, if !stopping => {
                stopping = true;
                ctx.shutdown();
                continue;
            }
        };
        match &event {
            #[cfg(feature = "etcd")]
            ClusterEvent::ClusterReady { agent, workers, .. } if args.etcd.is_some() => {
                let endpoints = args.etcd.as_deref().unwrap_or_default();
                let pids: Vec<u32> = std::iter::once(*agent).chain(workers.iter().copied()).collect();
                let connections = etcd::connections(endpoints, &pids)?;
                println!("upstream connections: {connections} (workers: {})", workers.len());
            }
            #[cfg(feature = "redis")]
            ClusterEvent::ClusterReady { workers, .. } if args.redis.is_some() => {
                // Redis may be down now (the Leader rides it out): then say so and go on.
                match redis::connections(args.redis.as_deref().unwrap_or_default()).await {
                    Ok(clients) => {
                        let writers = usize::from(write_every > 0);
                        println!(
                            "upstream connections: {} (workers: {})",
                            clients.saturating_sub(writers),
                            workers.len()
                        );
                    }
                    Err(error) => println!("upstream connections: unknown ({error}) (workers: {})", workers.len()),
                }
            }
            ClusterEvent::ClusterReady { workers, .. } => {
                // A short-lived connection: the registry does not count the one
                // asking, and the writer (when on) is not a worker's, so leave it out.
                let writers = usize::from(write_every > 0) as u64;
                match registry_stats(&registry).await {
                    Ok(stats) => println!(
                        "upstream connections: {} (workers: {})",
                        stats.connections.saturating_sub(writers),
                        workers.len()
                    ),
                    // The cluster runs without its upstream and reconnects; say so and go on.
                    Err(error) => println!("upstream connections: unknown ({error:#}) (workers: {})", workers.len()),
                }
            }
            // The cluster logs every event once (stderr); the demo only acts on them.
            _ => {}
        }
    }
    Ok(())
}

/// How long a worker's registration outlives a Leader that stopped keeping it alive.
const REGISTRATION_TTL: Duration = Duration::from_secs(2);

/// Registers this worker as `worker-<id>` of `service`, under every new
/// Leader; prints a line each time.
fn register(connection: &Connection, service: &str, worker: impl std::fmt::Display) -> Presence {
    let pid = std::process::id();
    let mut instance = Instance::new(service, format!("worker-{worker}"), format!("pid:{pid}"));
    instance.metadata.insert("pid".into(), pid.to_string());
    let presence = stay_registered(connection.client::<ServiceApi>(), instance, REGISTRATION_TTL);
    let mut registered = presence.registered();
    let (service, worker) = (service.to_string(), worker.to_string());
    tokio::spawn(async move {
        while registered.changed().await.is_ok() {
            if let Some(epoch) = *registered.borrow_and_update() {
                println!("registered: worker={worker} pid={pid} service={service} epoch={epoch}");
            }
        }
    });
    presence
}

/// Keeps `key` published through the Leader, as `docs/using.md`'s "re-publish what a
/// process owns" says: once per Leader, when `Client::watch()` shows its epoch
/// (a publish is not replayed after a failover). Prints a line each time;
/// stops when dropped.
fn own(client: tandem::Client<ConfigApi>, key: String, worker: impl std::fmt::Display) -> tandem::presence::Presence {
    let (pid, worker) = (std::process::id(), worker.to_string());
    let caller = client.clone();
    tandem::presence::on_each_leader(&caller, "publishing an owned key", move |epoch| {
        let (client, key, worker) = (client.clone(), key.clone(), worker.clone());
        async move {
            client.publish(ConfigRequest::Put(key.clone(), format!("pid={pid} epoch={epoch}"))).await?;
            println!("owned: worker={worker} pid={pid} key={key} epoch={epoch}");
            Ok(())
        }
    })
}

/// The demo's etcd side (`--etcd`): the agent's upstream, the master's writer,
/// and the connection count.
#[cfg(feature = "etcd")]
mod etcd {
    use std::sync::Arc;
    use std::time::Duration;

    use tandem::etcd_upstream::EtcdUpstream;
    use tandem::etcd_upstream::etcd::{Config, EtcdClient, endpoint_addrs, established_connections};
    use tandem::leader::LeaderBuilder;
    use tandem::registry_upstream::{ConfigApi, ServiceApi};

    /// Both channels served by one etcd client (one connection), built when
    /// the Leader starts and retried until etcd answers: nothing connects
    /// before `start()` (a hot standby holds no upstream connection).
    pub async fn leader(endpoints: &str, builder: LeaderBuilder) -> Result<LeaderBuilder, tandem::cluster::BoxError> {
        let shared = Arc::new(tokio::sync::OnceCell::<EtcdUpstream>::new());
        let endpoints = endpoints.to_owned();
        let connect = move || {
            let (shared, endpoints) = (shared.clone(), endpoints.clone());
            async move { shared.get_or_try_init(|| EtcdUpstream::connect(Config::from_list(&endpoints))).await.cloned() }
        };
        Ok(builder
            .channel_with_retry::<ConfigApi, _, _, _>(connect.clone())
            .channel_with_retry::<ServiceApi, _, _, _>(connect))
    }

    /// Puts `v1`, `v2`, ... into `key` every `every_ms`, through the master's own
    /// connection; keeps going through outages.
    pub async fn spawn_writer(endpoints: &str, key: String, every_ms: u64) -> Result<(), tandem::cluster::BoxError> {
        let writer = EtcdClient::connect(Config::from_list(endpoints)).await?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            for n in 1u64.. {
                tick.tick().await;
                if let Err(error) = writer.put(&key, format!("v{n}")).await {
                    tracing::warn!(error = %error.chain(), "write failed");
                }
            }
        });
        Ok(())
    }

    /// ESTABLISHED TCP connections from `pids` to the endpoints.
    pub fn connections(endpoints: &str, pids: &[u32]) -> Result<usize, tandem::cluster::BoxError> {
        let addrs = endpoint_addrs(&Config::from_list(endpoints).endpoints)?;
        Ok(established_connections(pids, &addrs)?)
    }
}

/// The demo's Redis side (`--redis`): the agent's upstream, the master's writer
/// and the connection count.
#[cfg(feature = "redis")]
mod redis {
    use std::time::Duration;

    use tandem::leader::LeaderBuilder;
    use tandem::redis_upstream::RedisUpstream;
    use tandem::redis_upstream::redis::{self, aio::ConnectionManager};
    use tandem::registry_upstream::ConfigApi;

    /// The config channel served by Redis (two connections: commands and
    /// pub/sub), built when the Leader starts and retried until Redis answers:
    /// nothing connects before `start()` (a hot standby holds no upstream connection).
    pub async fn leader(url: &str, builder: LeaderBuilder) -> Result<LeaderBuilder, tandem::cluster::BoxError> {
        let url = url.to_owned();
        Ok(builder.channel_with_retry::<ConfigApi, _, _, _>(move || {
            let url = url.clone();
            async move { RedisUpstream::connect(&url).await }
        }))
    }

    /// Sets `key` to `v1`, `v2`, ... every `every_ms`, through the master's own
    /// connection; keeps going through outages.
    pub fn spawn_writer(url: &str, key: String, every_ms: u64) -> Result<(), tandem::cluster::BoxError> {
        let writer = ConnectionManager::new_lazy_with_config(redis::Client::open(url)?, Default::default())?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            for n in 1u64.. {
                tick.tick().await;
                let set = redis::cmd("SET").arg(&key).arg(format!("v{n}")).to_owned();
                if let Err(error) = set.query_async::<()>(&mut writer.clone()).await {
                    tracing::warn!(%error, "write failed");
                }
            }
        });
        Ok(())
    }

    /// The clients Redis lists in `CLIENT LIST`, but the short-lived one asking.
    pub async fn connections(url: &str) -> Result<usize, tandem::cluster::BoxError> {
        let mut asking = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
        let own: u64 = redis::cmd("CLIENT").arg("ID").query_async(&mut asking).await?;
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut asking).await?;
        let own = format!("id={own}");
        Ok(list.lines().filter(|line| line.split_whitespace().next() != Some(own.as_str())).count())
    }
}
