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
//! Flags: `--workers N`, `--registry ADDR`, `--subscribe KEY` (repeatable; the
//! default is `app.greeting` and `app.flags`), `--transport direct|messenger|auto`,
//! `--write-every MS`, `--duration SECS` (0, the default, runs until a signal).
//!
//! Output, one line each:
//! - once ready: `cluster ready: master=<pid> agent=<pid> workers=<pid>,<pid>,...`
//! - right after: `upstream connections: <n> (workers: <N>)`, from the registry's own stats
//! - each value a worker receives: `worker=<id> pid=<pid> key=<key> value=<value> epoch=<epoch> seq=<seq>`
//! - after an agent restart: `agent restarted: pid=<pid> epoch=<epoch>`
//! - after a worker restart: `worker restarted: worker=<id> pid=<pid>`
//!
//! Try `kill -9` on the agent's pid: the master starts a new agent with a higher
//! epoch, the workers reconnect and resubscribe, and the values resume. SIGTERM
//! or Ctrl-C stops workers, then the agent, then the master (exit code 0).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use tandem::cluster::{ClusterEvent, MasterContext, Role, WorkerContext};
use tandem::cluster_glue::{Transport, WorkerConnector, start_leader};
use tandem::registry_upstream::{ConfigApi, ConfigRequest, RegistryUpstream, ServiceApi};
use tandem::{Connection, Leader};

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
}

/// Where the children find the registry the master started for them.
const REGISTRY_ENV: &str = "CONFIG_CENTER_REGISTRY";

fn main() -> anyhow::Result<()> {
    tandem::cluster::init_tracing();
    let mut args = Args::parse();
    if args.keys.is_empty() {
        args.keys = vec!["app.greeting".into(), "app.flags".into()];
    }
    // Code before the builder runs in every process: only the master binds the
    // embedded registry; the children inherit its address.
    let mut embedded = None;
    if args.registry.is_none() && Role::of_this_process() == Role::Master {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the embedded registry")?;
        listener.set_nonblocking(true)?;
        // SAFETY (of the API): set_var before any thread exists; the runtime starts below.
        unsafe { std::env::set_var(REGISTRY_ENV, listener.local_addr()?.to_string()) };
        embedded = Some(listener);
    }
    let registry = match &args.registry {
        Some(addr) => addr.clone(),
        None => std::env::var(REGISTRY_ENV).context("the master did not pass the registry address")?,
    };
    let write_every = args.write_every.unwrap_or(if args.registry.is_none() { 1000 } else { 0 });

    let mut builder = tandem::cluster::Cluster::builder("config_center");
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    let (agent_registry, worker_args) = (registry.clone(), args.clone());
    builder
        .agent(move |ctx| async move {
            let upstream = RegistryUpstream::connect(agent_registry).await?;
            let leader = Leader::builder()
                .channel::<ConfigApi, _>({
                    let upstream = upstream.clone();
                    async move { Ok(upstream) }
                })
                .channel::<ServiceApi, _>(async move { Ok(upstream) });
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

async fn worker(ctx: WorkerContext, args: Args) -> Result<(), tandem::cluster::BoxError> {
    let mut config = tandem::follower::Config::default();
    config.token = Some(ctx.token().to_string());
    let connection = Connection::builder()
        .config(config)
        .channel::<ConfigApi>()
        .connect(WorkerConnector::new(&ctx, args.transport))
        .spawn();
    let client = connection.client::<ConfigApi>();
    client.ready().await?;
    let mut streams = futures::stream::SelectAll::new();
    for key in &args.keys {
        let subscription = client.subscribe(key.clone()).await?;
        let key = key.clone();
        streams.push(subscription.map(move |update| (key.clone(), update)).boxed());
    }
    ctx.ready().await?;

    let (id, pid) = (ctx.id(), std::process::id());
    let mut gets = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            item = streams.next() => {
                let Some((key, update)) = item else { break };
                let value = update.value.value.unwrap_or_else(|| "<deleted>".into());
                println!("worker={id} pid={pid} key={key} value={value} epoch={} seq={}", update.epoch, update.seq);
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
    if write_every > 0 {
        // The writer's own connection: a stand-in for whoever changes the config.
        let writer = tandem::registry::Client::connect(registry.as_str()).await?;
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
            ClusterEvent::ClusterReady { workers, .. } => {
                println!("{event}");
                // A short-lived connection: the registry does not count the one
                // asking, and the writer (when on) is not a worker's, so leave it out.
                let stats = tandem::registry::Client::connect(registry.as_str()).await?.stats().await?;
                let writers = usize::from(write_every > 0) as u64;
                println!(
                    "upstream connections: {} (workers: {})",
                    stats.connections.saturating_sub(writers),
                    workers.len()
                );
            }
            ClusterEvent::AgentRestarted { .. } | ClusterEvent::WorkerRestarted { .. } => println!("{event}"),
            _ => tracing::info!("{event}"),
        }
    }
    Ok(())
}
