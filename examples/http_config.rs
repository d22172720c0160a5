//! An HTTP config service: a master, an agent whose Leader holds ONE registry
//! connection, and N workers serving HTTP on ONE port with axum, answering
//! from their Follower's subscriptions.
//!
//! ```text
//! cargo run --example http_config -- --workers 4 --listen 127.0.0.1:8080
//! curl -i localhost:8080/config/app.greeting           # 200 "hello", x-worker-pid, x-tandem-epoch, x-tandem-seq
//! curl -X PUT --data hi localhost:8080/config/app.greeting   # written through the Leader
//! kill -HUP <master pid>                                # rolling reload, zero failed requests
//! ```
//!
//! Routes: `GET /config/{key}` (the latest value from the worker's
//! subscription: 200 with the value, 404 when absent; a key not subscribed is
//! read through the Leader), `PUT /config/{key}` (the body is the value;
//! written through the Leader), `GET /healthz`.
//!
//! Flags: `--workers N`, `--listen ADDR` (default 127.0.0.1:0; `unix:PATH` for
//! a Unix socket), `--mode reuseport|shared|round-robin`, `--registry ADDR` (an embedded
//! registry when absent, seeded with `app.greeting=hello`), `--subscribe KEY`
//! (repeatable; default `app.greeting`), `--duration SECS` (0, the default,
//! runs until SIGINT/SIGTERM), `--max-memory MIB` (per worker),
//! `--agent-max-memory MIB`, `--ready-timeout SECS` (default 30), `--plain` (no
//! cluster: one process serving the same routes on a multi-thread runtime with
//! a thread per CPU, for comparison; `bench/http.sh` measures against it).
//!
//! Each worker runs on CPUs / workers runtime threads, at least 1 (one: a
//! current-thread runtime), as `Builder::run_blocking` chooses.
//!
//! `--name NAME`, `--metrics ADDR` and `--log-dir DIR` as in config_center (the
//! `tandem` CLI, `/metrics`; `metrics on <ADDR>` follows `listening on`; the
//! children's output in `DIR/<name>/`, `tandem logs NAME`).
//!
//! stdout is the service's own output, one line each: `listening on <ADDR>`
//! first, `metrics on <ADDR>` with `--metrics`, and with `--api-reloads N`
//! `api reload: ok replaced=<n> workers=<pid>,...` (or `api reload: error: <why>`).
//!
//! stderr is the log (`tandem::logging::init`): the cluster logs each of its
//! lifecycle events there once: `cluster ready: master=<pid> agent=<pid>
//! workers=<pid>,...`, after SIGHUP `reload started: slots=<id>,...`, `worker
//! replaced: worker=<id> old=<pid> new=<pid> reason=<reload|max-memory>` and
//! `reload done: workers=<pid>,...` (INFO) or `reload failed: <reason>`
//! (WARN); also `memory limit: ...`, `restart scheduled: ...` (WARN),
//! `worker restarted: ...` (INFO).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use futures::StreamExt;
use tandem::cluster::{ClusterEvent, Listener, MasterContext, ProcessRole, ShareMode, WorkerContext};
use tandem::cluster_glue::{Transport, WorkerConnector, start_leader};
use tandem::registry_upstream::{ConfigApi, ConfigRequest, ConfigResponse, RegistryUpstream};
use tandem::{Connection, Leader};

#[derive(Parser, Debug, Clone)]
#[command(about = "Workers serving one HTTP port from their shared config subscription")]
struct Args {
    /// Worker processes. The default is the CPUs this process may use. Each
    /// worker runs on CPUs / workers runtime threads (at least 1; one is a
    /// current-thread runtime): a worker per CPU, one thread each.
    #[arg(long)]
    workers: Option<usize>,
    /// Where to listen: host:port (port 0 picks one), or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// How workers share the port: reuseport (default for TCP on Linux), shared or round-robin.
    #[arg(long)]
    mode: Option<ShareMode>,
    /// The registry's address; without it the master starts an embedded one.
    #[arg(long)]
    registry: Option<String>,
    /// A key the workers subscribe to (repeatable; the default is app.greeting).
    #[arg(long = "subscribe")]
    keys: Vec<String>,
    /// Stop after this many seconds; 0 runs until SIGINT/SIGTERM.
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Replace a worker whose RSS exceeds this many MiB (gracefully).
    #[arg(long, value_name = "MIB")]
    max_memory: Option<u64>,
    /// Restart the agent gracefully when its RSS exceeds this many MiB.
    #[arg(long, value_name = "MIB")]
    agent_max_memory: Option<u64>,
    /// No cluster: one process serving the same routes on a multi-thread
    /// runtime, a thread per CPU (for comparison).
    #[arg(long)]
    plain: bool,
    /// Testing: serve GET /debug/alloc/{mib}, which allocates and keeps MIB MiB.
    #[arg(long, hide = true)]
    debug_endpoints: bool,
    /// Testing: workers wait this long before reporting ready.
    #[arg(long, hide = true, default_value_t = 0)]
    ready_delay_ms: u64,
    /// Testing: once the cluster is ready, ask for this many reloads at once
    /// through the API (`ClusterControl::reload`) and print each outcome.
    #[arg(long, hide = true, default_value_t = 0)]
    api_reloads: usize,
    /// Testing: a worker started while this file exists never reports ready.
    #[arg(long, hide = true)]
    hang_if_exists: Option<std::path::PathBuf>,
    /// How long the agent and a new worker may take to report ready (a reload
    /// rolls back after it).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    ready_timeout: u64,
    /// The cluster's name for `tandem ls/status/reload/stop/leader`. The
    /// default is the executable's file name (`http_config`).
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
    log_dir: Option<std::path::PathBuf>,
}

/// Where the children find the registry the master started for them.
const REGISTRY_ENV: &str = "HTTP_CONFIG_REGISTRY";

/// What a worker knows of each subscribed key: (value, epoch, seq).
type Cache = Arc<RwLock<HashMap<String, (Option<String>, u64, u64)>>>;

#[derive(Clone)]
struct App {
    cache: Cache,
    client: Option<tandem::follower::Client<ConfigApi>>,
    pid: HeaderValue,
}

fn main() -> anyhow::Result<()> {
    tandem::logging::init();
    let mut args = Args::parse();
    if args.keys.is_empty() {
        args.keys = vec!["app.greeting".into()];
    }
    // Code before the builder runs in every process: only the master binds the
    // embedded registry; the children get its address from the master
    // (`child_env` below).
    let mut embedded = None;
    let registry = match &args.registry {
        Some(addr) => addr.clone(),
        None if ProcessRole::of_this_process() == ProcessRole::Master => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the embedded registry")?;
            listener.set_nonblocking(true)?;
            let addr = listener.local_addr()?.to_string();
            embedded = Some(listener);
            addr
        }
        None => std::env::var(REGISTRY_ENV).context("the master did not pass the registry address")?,
    };
    if args.plain {
        return plain(args, embedded, registry);
    }

    let addr = tandem::cluster::ListenAddr::parse(&args.listen)?;
    let mode = args.mode.unwrap_or_else(|| ShareMode::default_for(&addr));
    let mut builder = tandem::cluster::Cluster::builder("http_config").listen_with("http", addr, mode);
    if embedded.is_some() {
        builder = builder.child_env(REGISTRY_ENV, registry.clone());
    }
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    builder = builder.start_timeout(Duration::from_secs(args.ready_timeout));
    if let Some(name) = &args.name {
        builder = builder.name(name);
    }
    if let Some(addr) = args.metrics {
        builder = builder.metrics(addr);
    }
    if let Some(dir) = &args.log_dir {
        builder = builder.log_dir(dir);
    }
    if let Some(mib) = args.max_memory {
        builder = builder.worker_max_memory(mib * 1024 * 1024);
    }
    if let Some(mib) = args.agent_max_memory {
        builder = builder.agent_max_memory(mib * 1024 * 1024);
    }
    let (agent_registry, worker_args) = (registry.clone(), args.clone());
    builder
        .agent(move |ctx| async move {
            let upstream = RegistryUpstream::connect(agent_registry).await?;
            let leader =
                start_leader(&ctx, Leader::builder().channel_from::<ConfigApi, _>(async move { Ok(upstream) })).await?;
            ctx.stopped().await;
            leader.shutdown().await;
            Ok(())
        })
        .worker(move |ctx| worker(ctx, worker_args))
        .master(move |ctx| master(ctx, embedded, args))
        .run_blocking()?;
    Ok(())
}

async fn worker(ctx: WorkerContext, args: Args) -> Result<(), tandem::cluster::BoxError> {
    // Take the port first: it is served as soon as the router runs.
    let listener = ctx.listener("http")?;
    let mut config = tandem::follower::Config::default();
    config.token = Some(ctx.token().to_string());
    let connection = Connection::builder()
        .config(config)
        .channel::<ConfigApi>()
        .connect(WorkerConnector::new(&ctx, Transport::Direct))
        .spawn();
    let client = connection.client::<ConfigApi>();
    client.ready().await?;
    let cache: Cache = Arc::default();
    let mut first_values = Vec::new();
    for key in &args.keys {
        let mut subscription = client.subscribe(key.clone()).await?;
        let (cache, key) = (Arc::clone(&cache), key.clone());
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        first_values.push(first_rx);
        tokio::spawn(async move {
            let mut first = Some(first_tx);
            while let Some(update) = subscription.next().await {
                let entry = (update.value.value, update.epoch, update.seq);
                cache.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.clone(), entry);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        });
    }
    // Ready only once every key has its first value (or absence) from the Leader.
    for first in first_values {
        first.await.map_err(|_| "a subscription ended before its first value")?;
    }
    let app = App { cache, client: Some(client), pid: HeaderValue::from(std::process::id()) };
    // Once stopping, every answer says `Connection: close`: keep-alive clients
    // then open their next connection to another worker instead of racing a
    // close of an idle connection.
    let stop = ctx.stop_token();
    let router = routes(app, args.debug_endpoints).layer(axum::middleware::map_response(move |mut res: Response| {
        let stopping = stop.is_cancelled();
        async move {
            if stopping {
                res.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            res
        }
    }));
    let server = match listener {
        Listener::Tcp(l) => serve(l, router, &ctx).await,
        Listener::Unix(l) => serve(l, router, &ctx).await,
        Listener::RoundRobin(l) => serve(l, router, &ctx).await,
        other => return Err(format!("unsupported listener {other:?}").into()),
    };
    tokio::time::sleep(Duration::from_millis(args.ready_delay_ms)).await;
    if !args.hang_if_exists.as_ref().is_some_and(|p| p.exists()) {
        ctx.ready().await?;
    }
    // Returns once the stop signal came and in-flight requests are answered.
    server.await??;
    connection.close().await;
    Ok(())
}

/// A listener that stops accepting as soon as the worker is asked to stop,
/// and counts the connections it accepted that are still open.
struct StopAccepting<L> {
    inner: L,
    stop: tokio_util::sync::CancellationToken,
    open: Arc<tokio::sync::watch::Sender<usize>>,
}

impl<L: axum::serve::Listener> axum::serve::Listener for StopAccepting<L>
where
    L::Io: Unpin,
{
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => std::future::pending().await,
            (io, addr) = self.inner.accept() => {
                self.open.send_modify(|n| *n += 1);
                (Counted { inner: io, open: Arc::clone(&self.open) }, addr)
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection counted in its listener's open connections until dropped.
struct Counted<T> {
    inner: T,
    open: Arc<tokio::sync::watch::Sender<usize>>,
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How long a stopping worker lets open connections finish on their own
/// (clients that open a connection per request close it after the answer;
/// keep-alive ones after their next answer, which says `Connection: close`)
/// before hyper's graceful shutdown closes the idle ones that are left.
const DRAIN_SETTLE: Duration = Duration::from_secs(2);

/// Serves `router` on `listener` until the worker is asked to stop: then stops
/// accepting at once, lets open connections finish (at most `DRAIN_SETTLE`),
/// and shuts the rest down gracefully (in-flight requests are answered).
async fn serve<L>(listener: L, router: Router, ctx: &WorkerContext) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
    L::Addr: std::fmt::Debug,
{
    let stop = ctx.stop_token();
    let (open, mut open_rx) = tokio::sync::watch::channel(0usize);
    let listener = StopAccepting { inner: listener, stop: stop.clone(), open: Arc::new(open) };
    let drained = async move {
        stop.cancelled().await;
        let _ = tokio::time::timeout(DRAIN_SETTLE, open_rx.wait_for(|n| *n == 0)).await;
    };
    tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(drained).await })
}

fn routes(app: App, debug: bool) -> Router {
    let mut router = Router::new()
        .route("/config/{key}", get(get_config).put(put_config))
        .route("/healthz", get(|| async { "ok\n" }));
    if debug {
        router = router.route("/debug/alloc/{mib}", get(alloc));
    }
    router.with_state(app)
}

async fn get_config(State(app): State<App>, Path(key): Path<String>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-worker-pid", app.pid.clone());
    let cached = app.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).cloned();
    match cached {
        Some((value, epoch, seq)) => {
            headers.insert("x-tandem-epoch", HeaderValue::from(epoch));
            headers.insert("x-tandem-seq", HeaderValue::from(seq));
            match value {
                Some(value) => (StatusCode::OK, headers, value).into_response(),
                None => (StatusCode::NOT_FOUND, headers, "no such key\n").into_response(),
            }
        }
        // Not subscribed: one read through the Leader.
        None => match &app.client {
            Some(client) => match client.invoke(ConfigRequest::Get(key)).await {
                Ok(ConfigResponse::Value(Some(v))) if v.value.is_some() => {
                    (StatusCode::OK, headers, v.value.unwrap_or_default()).into_response()
                }
                Ok(_) => (StatusCode::NOT_FOUND, headers, "no such key\n").into_response(),
                Err(e) => (StatusCode::BAD_GATEWAY, headers, format!("{e}\n")).into_response(),
            },
            None => (StatusCode::NOT_FOUND, headers, "no such key\n").into_response(),
        },
    }
}

async fn put_config(State(app): State<App>, Path(key): Path<String>, body: String) -> Response {
    let Some(client) = &app.client else {
        return (StatusCode::METHOD_NOT_ALLOWED, "read-only in --plain mode\n").into_response();
    };
    match client.invoke(ConfigRequest::Put(key, body)).await {
        Ok(ConfigResponse::Revision(rev)) => (StatusCode::OK, format!("revision {rev}\n")).into_response(),
        Ok(other) => (StatusCode::BAD_GATEWAY, format!("unexpected answer {other:?}\n")).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
    }
}

/// Testing only: grows this worker's RSS by `mib` MiB (kept until exit).
async fn alloc(State(app): State<App>, Path(mib): Path<usize>) -> Response {
    static KEPT: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let block = vec![1u8; mib.min(4096) * 1024 * 1024];
    KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(block);
    let mut headers = HeaderMap::new();
    headers.insert("x-worker-pid", app.pid.clone());
    (StatusCode::OK, headers, "allocated\n").into_response()
}

async fn master(
    ctx: MasterContext,
    embedded: Option<std::net::TcpListener>,
    args: Args,
) -> Result<(), tandem::cluster::BoxError> {
    for listener in ctx.listeners() {
        println!("listening on {}", listener.address);
    }
    if let Some(addr) = ctx.metrics_addr() {
        println!("metrics on {addr}");
    }
    let _server = match embedded {
        Some(listener) => {
            let addr = listener.local_addr()?.to_string();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let server = tandem::registry::Server::from_listener(listener, Default::default())?.spawn();
            tandem::registry::RegistryClient::connect(addr.as_str()).await?.put("app.greeting", "hello").await?;
            Some(server)
        }
        None => None,
    };
    let stop_after = async {
        match args.duration {
            0 => std::future::pending().await,
            secs => tokio::time::sleep(Duration::from_secs(secs)).await,
        }
    };
    tokio::pin!(stop_after);
    let mut stopping = false;
    // The cluster logs every event once (stderr); the service only acts on them.
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
        if let (ClusterEvent::ClusterReady { .. }, n @ 1..) = (&event, args.api_reloads) {
            for _ in 0..n {
                let control = ctx.control();
                tokio::spawn(async move {
                    match control.reload().await {
                        Ok(report) => println!(
                            "api reload: ok replaced={} workers={}",
                            report.replaced.len(),
                            report.workers.iter().flatten().map(u32::to_string).collect::<Vec<_>>().join(",")
                        ),
                        Err(e) => println!("api reload: error: {e}"),
                    }
                });
            }
        }
    }
    Ok(())
}

/// `--plain`: one process, no cluster, the same routes; the values are read
/// once from the registry at start.
fn plain(args: Args, embedded: Option<std::net::TcpListener>, registry: String) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let _server = match embedded {
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                Some(tandem::registry::Server::from_listener(listener, Default::default())?.spawn())
            }
            None => None,
        };
        let client = tandem::registry::RegistryClient::connect(registry.as_str()).await?;
        if args.registry.is_none() {
            client.put("app.greeting", "hello").await?;
        }
        let cache: Cache = Arc::default();
        for key in &args.keys {
            let value = client.get(key).await?.map(|v| String::from_utf8_lossy(&v.value).into_owned());
            cache.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.clone(), (value, 0, 0));
        }
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let app = App { cache, client: None, pid: HeaderValue::from(std::process::id()) };
        let shutdown = async move {
            match args.duration {
                0 => {
                    let _ = tokio::signal::ctrl_c().await;
                }
                secs => tokio::time::sleep(Duration::from_secs(secs)).await,
            }
        };
        axum::serve(listener, routes(app, args.debug_endpoints)).with_graceful_shutdown(shutdown).await?;
        anyhow::Ok(())
    })
}
