//! The cluster of `tandem run`: the master's preparation (settings, the
//! embedded registry), the agent's Leader with the chosen adapter, and the
//! master function that turns a program that cannot start into one clear
//! error and a non-zero exit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem::cluster::{
    BoxError, ClusterEvent, ExitReason, ListenAddr, MasterContext, ProcessRole, ShareMode, StartFailure,
};
use tandem::cluster_glue::{agent_leader, start_leader};
use tandem::leader::LeaderBuilder;
use tandem::registry_upstream::{ConfigApi, RegistryUpstream, ServiceApi};

use super::settings::{self, Spec, Upstream, Usage};
use super::shim::{PROGRAM_EXITED_TOPIC, ProgramExit, signal_text};
use super::{RunArgs, SPEC_ENV};

/// After this many consecutive exits of a worker's program before it was
/// ready (or within 30 s of it), its slot is given up: at start that ends
/// the run. See `docs/run.md`.
pub const CRASH_LOOP_LIMIT: u32 = 3;

/// The master's part before the cluster starts.
#[derive(Debug)]
pub struct Prepared {
    pub spec: Spec,
    /// The embedded registry's socket (the master only).
    pub embedded: Option<std::net::TcpListener>,
}

#[derive(Debug)]
pub enum PrepareError {
    Usage(Usage),
    Failed(String),
}

/// Resolves the settings; binds the embedded registry when no upstream is given.
pub fn prepare(args: &RunArgs) -> Result<Prepared, PrepareError> {
    let mut spec = settings::resolve(args).map_err(PrepareError::Usage)?;
    let mut embedded = None;
    if let Upstream::Embedded { address, .. } = &mut spec.upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| PrepareError::Failed(format!("cannot bind the embedded registry: {e}")))?;
        *address = listener.local_addr().map_err(|e| PrepareError::Failed(e.to_string()))?.to_string();
        embedded = Some(listener);
    }
    #[cfg(feature = "redis")]
    if let Upstream::Redis(url) = &spec.upstream {
        tandem::redis_upstream::redis::Client::open(url.as_str())
            .map_err(|e| PrepareError::Usage(Usage(format!("--redis {url}: {e}"))))?;
    }
    Ok(Prepared { spec, embedded })
}

/// Runs this process's part of the cluster.
pub async fn run(prepared: Prepared) -> Result<(), tandem::cluster::Error> {
    let Prepared { spec, embedded } = prepared;
    let spec = Arc::new(spec);
    let mut config = tandem::cluster::Config::default();
    config.name = Some(spec.name.clone());
    config.workers = Some(spec.workers);
    // The shim reports a program not ready in time itself (and kills it)
    // before the master's own deadline, and kills a program that outlives
    // its stop timeout before the master kills the shim.
    config.worker_start_timeout = spec.ready_timeout + Duration::from_secs(5);
    config.worker_stop_timeout = spec.stop_timeout + Duration::from_secs(2);
    config.worker_max_memory = spec.max_memory_mib.map(|mib| mib * 1024 * 1024);
    config.restart.crash_loop_limit = CRASH_LOOP_LIMIT;
    config.metrics = spec.metrics;
    for l in &spec.listeners {
        let addr = ListenAddr::parse(&l.address)?;
        let mode: ShareMode = l.mode.parse()?;
        config.listeners.push(tandem::cluster::ListenerSpec { name: l.name.clone(), addr, mode });
    }
    if ProcessRole::of_this_process() == ProcessRole::Master {
        let json = serde_json::to_string(&*spec).map_err(|e| tandem::cluster::Error::MasterFailed(e.into()))?;
        config.child_env.push((SPEC_ENV.to_owned(), json));
    }
    let _registry = match embedded {
        Some(listener) => {
            Some(embedded_registry(listener, &spec.upstream).await.map_err(tandem::cluster::Error::MasterFailed)?)
        }
        None => None,
    };
    let (agent_spec, worker_spec) = (Arc::clone(&spec), Arc::clone(&spec));
    tandem::cluster::Cluster::builder(spec.name.clone())
        .config(config)
        .agent(move |ctx| async move {
            let leader = leader(&agent_spec.upstream).await?;
            let leader = start_leader(&ctx, leader).await?;
            ctx.stopped().await;
            leader.shutdown().await;
            Ok(())
        })
        .worker(move |ctx| super::shim::run(ctx, worker_spec))
        .master(move |ctx| master(ctx, spec))
        .run()
        .await
}

/// Starts the embedded registry and puts the seed keys, before the cluster
/// starts; it serves until the cluster has stopped (the agent's Leader is
/// its client to the end).
async fn embedded_registry(
    listener: std::net::TcpListener,
    upstream: &Upstream,
) -> Result<tandem::registry::ServerHandle, BoxError> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let server = tandem::registry::Server::from_listener(listener, Default::default())?.spawn();
    if let Upstream::Embedded { address, put } = upstream {
        if !put.is_empty() {
            let client = tandem::registry::RegistryClient::connect(address.as_str()).await?;
            for (key, value) in put {
                client.put(key, value.clone()).await?;
            }
        }
        println!("registry on {address}");
    }
    Ok(server)
}

/// The agent's Leader: the config channel (and the services channel, but
/// with Redis) over ONE upstream connection.
async fn leader(upstream: &Upstream) -> Result<LeaderBuilder, BoxError> {
    let builder = agent_leader(None)?;
    let address = match upstream {
        Upstream::Embedded { address, .. } | Upstream::Registry(address) => address.clone(),
        #[cfg(feature = "etcd")]
        Upstream::Etcd(endpoints) => {
            use tandem::etcd_upstream::{EtcdUpstream, etcd::Config};
            let upstream = EtcdUpstream::connect(Config::from_list(endpoints)).await?;
            let services = upstream.clone();
            return Ok(builder
                .channel_from::<ConfigApi, _>(async move { Ok(upstream) })
                .channel_from::<ServiceApi, _>(async move { Ok(services) }));
        }
        #[cfg(feature = "redis")]
        Upstream::Redis(url) => {
            let upstream = tandem::redis_upstream::RedisUpstream::connect(url).await?;
            return Ok(builder.channel_from::<ConfigApi, _>(async move { Ok(upstream) }));
        }
        #[allow(unreachable_patterns)] // refused by `settings` in a build without the adapter
        other => return Err(format!("{other:?} needs an adapter this build lacks").into()),
    };
    // Built when the registry answers: the Leader starts without it and retries.
    let shared = Arc::new(tokio::sync::OnceCell::<RegistryUpstream>::new());
    let connect = move || {
        let (shared, address) = (shared.clone(), address.clone());
        async move { shared.get_or_try_init(|| RegistryUpstream::connect(address)).await.cloned() }
    };
    Ok(builder
        .channel_with_retry::<ConfigApi, _, _, _>(connect.clone())
        .channel_with_retry::<ServiceApi, _, _, _>(connect))
}

/// The master function: prints the addresses, and ends the run when a
/// worker's program cannot start.
async fn master(ctx: MasterContext, spec: Arc<Spec>) -> Result<(), BoxError> {
    for listener in ctx.listeners() {
        println!("listening on {} ({})", listener.address, listener.name);
    }
    if let Some(addr) = ctx.metrics_addr() {
        println!("metrics on {addr}");
    }
    let mut events = ctx.events();
    let mut exits = ctx.messenger().subscribe(PROGRAM_EXITED_TOPIC);
    let mut ready = false;
    let mut last_exit: HashMap<u32, String> = HashMap::new();
    let mut failed: Vec<u32> = Vec::new();
    loop {
        let event = tokio::select! {
            // Biased: a shim tells how its program ended before it exits itself.
            biased;
            Some(told) = exits.next() => {
                match told.decode::<ProgramExit>() {
                    Ok(ProgramExit { worker, exit }) => {
                        last_exit.insert(worker, exit);
                    }
                    Err(error) => tracing::warn!(%error, "a bad program-exit message from a worker; ignored"),
                }
                continue;
            }
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
        };
        match event {
            ClusterEvent::Exited { process, exit, .. } if process.role == ProcessRole::Worker => {
                if let Some(id) = process.worker_id {
                    last_exit.insert(id, exit_text(&exit));
                }
            }
            ClusterEvent::StartFailed { process, reason } if process.role == ProcessRole::Worker => {
                if let Some(id) = process.worker_id {
                    let text = match &reason {
                        StartFailure::Exited(exit) => exit_text(exit),
                        other => other.to_string(),
                    };
                    last_exit.insert(id, text);
                }
            }
            ClusterEvent::WorkerReady { id, .. } | ClusterEvent::WorkerRestarted { id, .. } => {
                failed.retain(|&f| f != id);
            }
            ClusterEvent::ClusterReady { workers, .. } => {
                ready = true;
                println!("ready: {} workers running `{}`", workers.len(), spec.command.join(" "));
            }
            ClusterEvent::SlotFailed { role: ProcessRole::Worker, worker_id: Some(id), failures, retry_after } => {
                let last = last_exit.get(&id).map_or("unknown", String::as_str);
                let what = format!(
                    "worker {id}: `{}` exited {failures} times in a row before it was ready or soon after \
                     (last exit: {last}); its output is above",
                    spec.command.join(" ")
                );
                if !failed.contains(&id) {
                    failed.push(id);
                }
                if !ready {
                    return Err(format!("{what}; giving up").into());
                }
                if failed.len() >= spec.workers {
                    return Err(format!("{what}; every worker is failing; giving up").into());
                }
                tracing::error!("{what}; retried in {retry_after:?}, the other workers keep serving");
            }
            _ => {}
        }
    }
    Ok(())
}

/// `code 3`, `signal 9 (SIGKILL)`.
fn exit_text(exit: &ExitReason) -> String {
    match exit {
        ExitReason::Code(code) => format!("code {code}"),
        ExitReason::Signal(signal) => signal_text(*signal),
        other => other.to_string(),
    }
}
