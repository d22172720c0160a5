//! `tandem-registry`: run the bundled registry server, or talk to one.
//!
//! ```text
//! tandem-registry serve --listen 127.0.0.1:0 [--history N] [--max-watches N]   # first stdout line: `listening on <ADDR>`
//!     [--max-connections N] [--frame-timeout SECS] [--first-request-timeout SECS]
//!     [--idle-timeout SECS] [--partial-frame-budget BYTES] [--max-frame BYTES]   # limits (docs/limits.md)
//! tandem-registry put --server ADDR KEY VALUE
//! tandem-registry get --server ADDR KEY               # exit code 1 if absent
//! tandem-registry delete --server ADDR KEY
//! tandem-registry watch --server ADDR PREFIX [--from REV]
//! tandem-registry stats --server ADDR                 # one JSON object
//! tandem-registry register --server ADDR SERVICE ID ADDRESS [--ttl SECS] [--meta K=V]...
//! tandem-registry discover --server ADDR SERVICE
//! ```
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use tandem_registry::{CancellationToken, Config, Instance, RegistryClient, Server, WatchEvent, WatchSpec};
use tracing_subscriber::EnvFilter;

/// tandem's bundled in-memory config center and service registry.
#[derive(Debug, Parser)]
#[command(name = "tandem-registry", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve until SIGINT or SIGTERM (state is in memory only).
    Serve {
        /// The address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Changes remembered for watches that start from an older revision.
        #[arg(long)]
        history: Option<usize>,
        /// Watches one connection may hold (a tandem Leader holds one per subscribed
        /// key of its host). The default is 262144.
        #[arg(long)]
        max_watches: Option<usize>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set a key; prints the revision.
    Put {
        #[arg(long)]
        server: String,
        key: String,
        value: String,
    },
    /// Print a key's value; exits with 1 if the key is not set.
    Get {
        #[arg(long)]
        server: String,
        key: String,
    },
    /// Delete a key; prints the revision, or exits with 1 if the key was not set.
    Delete {
        #[arg(long)]
        server: String,
        key: String,
    },
    /// Print changes under a prefix, one line each: `<rev> put <key> <value>` or `<rev> delete <key>`
    /// (and `<rev> compacted <compact_rev>` before a snapshot, when `--from` is older than the history).
    Watch {
        #[arg(long)]
        server: String,
        prefix: String,
        /// Start from this revision (replaying what happened since).
        #[arg(long)]
        from: Option<u64>,
    },
    /// Print the server's counters as one JSON object.
    Stats {
        #[arg(long)]
        server: String,
    },
    /// Register an instance and keep it registered until killed.
    Register {
        #[arg(long)]
        server: String,
        service: String,
        id: String,
        address: String,
        /// The lease's TTL in seconds.
        #[arg(long, default_value_t = 10.0)]
        ttl: f64,
        /// Metadata entries, `KEY=VALUE`.
        #[arg(long = "meta", value_parser = parse_meta)]
        metadata: Vec<(String, String)>,
    },
    /// Print a service's instances, one line each: `<id> <address> [<key>=<value> ...]`.
    Discover {
        #[arg(long)]
        server: String,
        service: String,
    },
}

/// `serve`'s protections against many, stalled or hostile clients; each
/// overrides the [`Config`] default named in its help.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Connections served at once; one more is sent a `too_many_connections` goodbye and closed
    /// [default: 10000, or `ulimit -n` minus 32 when lower].
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    max_connections: Option<usize>,
    /// Seconds a request may take to arrive once its first byte has; a client that stalls
    /// mid-request is sent a `frame_timeout` goodbye [default: 10].
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    frame_timeout: Option<Duration>,
    /// Seconds a new connection may take to send its first complete request before it is sent a
    /// `first_request_timeout` goodbye; 0 never closes them for that [default: 10].
    #[arg(long, value_name = "SECS", value_parser = parse_secs_or_zero)]
    first_request_timeout: Option<Duration>,
    /// Seconds a connection with no watch and no lease may stay silent before it is sent an
    /// `idle_timeout` goodbye; 0 never closes idle connections [default: 300].
    #[arg(long, value_name = "SECS", value_parser = parse_secs_or_zero)]
    idle_timeout: Option<Duration>,
    /// Bytes buffered at once, across connections, for requests over 64 KiB that have not fully
    /// arrived; a request that does not fit ends its connection with a `frame_budget` goodbye
    /// [default: 67108864 (64 MiB)].
    #[arg(long, value_name = "BYTES", value_parser = parse_positive)]
    partial_frame_budget: Option<usize>,
    /// The largest frame read or written, in bytes [default: 16777216 (16 MiB)].
    #[arg(long, value_name = "BYTES", value_parser = parse_positive)]
    max_frame: Option<usize>,
}

impl LimitArgs {
    fn apply(self, config: &mut Config) {
        let LimitArgs {
            max_connections,
            frame_timeout,
            first_request_timeout,
            idle_timeout,
            partial_frame_budget,
            max_frame,
        } = self;
        if let Some(max) = max_connections {
            config.max_connections = max;
        }
        if let Some(timeout) = frame_timeout {
            config.frame_timeout = timeout;
        }
        if let Some(timeout) = first_request_timeout {
            config.first_request_timeout = timeout;
        }
        if let Some(timeout) = idle_timeout {
            config.idle_timeout = timeout;
        }
        if let Some(budget) = partial_frame_budget {
            config.partial_frame_budget = budget;
        }
        if let Some(max) = max_frame {
            config.max_frame = max;
        }
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("`{s}` is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}` is not a number of seconds: {e}"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let duration = parse_secs_or_zero(s)?;
    if duration.is_zero() {
        return Err("must be more than 0 seconds".to_owned());
    }
    Ok(duration)
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never in a redirected log.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { listen, history, max_watches, limits } => serve(&listen, history, max_watches, limits).await,
        Command::Put { server, key, value } => {
            let revision = connect(&server).await?.put(&key, value).await.context("put failed")?;
            println!("{revision}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { server, key } => match connect(&server).await?.get(&key).await.context("get failed")? {
            Some(kv) => {
                println!("{}", String::from_utf8_lossy(&kv.value));
                Ok(ExitCode::SUCCESS)
            }
            None => Ok(ExitCode::from(1)),
        },
        Command::Delete { server, key } => {
            match connect(&server).await?.delete(&key).await.context("delete failed")? {
                Some(revision) => {
                    println!("{revision}");
                    Ok(ExitCode::SUCCESS)
                }
                None => Ok(ExitCode::from(1)),
            }
        }
        Command::Watch { server, prefix, from } => watch(&server, prefix, from).await,
        Command::Stats { server } => {
            let stats = connect(&server).await?.stats().await.context("stats failed")?;
            println!("{}", serde_json::to_string(&stats)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Register { server, service, id, address, ttl, metadata } => {
            let ttl = Duration::try_from_secs_f64(ttl).context("--ttl must be a positive number of seconds")?;
            let mut instance = Instance::new(service, id, address);
            instance.metadata.extend(metadata);
            register(&server, instance, ttl).await
        }
        Command::Discover { server, service } => {
            let mut out = std::io::stdout().lock();
            for instance in connect(&server).await?.discover(&service).await.context("discover failed")? {
                write!(out, "{} {}", instance.id, instance.address)?;
                for (key, value) in &instance.metadata {
                    write!(out, " {key}={value}")?;
                }
                writeln!(out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn connect(server: &str) -> Result<RegistryClient> {
    Ok(RegistryClient::connect(server).await?)
}

async fn serve(
    listen: &str,
    history: Option<usize>,
    max_watches: Option<usize>,
    limits: LimitArgs,
) -> Result<ExitCode> {
    let mut config = Config::default();
    if let Some(history) = history {
        config.history = history;
    }
    if let Some(max_watches) = max_watches {
        config.max_watches_per_connection = max_watches;
    }
    limits.apply(&mut config);
    let server = Server::bind(listen, config).await.with_context(|| format!("cannot listen on {listen}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.local_addr())?;
        out.flush()?;
    }
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    server.run(shutdown).await;
    signals.abort();
    Ok(ExitCode::SUCCESS)
}

async fn watch(server: &str, prefix: String, from: Option<u64>) -> Result<ExitCode> {
    let client = connect(server).await?;
    let mut watch = client.watch(WatchSpec::prefix(prefix), from).await.context("watch failed")?;
    let mut out = std::io::stdout().lock();
    while let Some(event) = watch.next().await {
        match event.context("watch ended")? {
            WatchEvent::Put { key, value, revision } => {
                writeln!(out, "{revision} put {key} {}", String::from_utf8_lossy(&value))?
            }
            WatchEvent::Delete { key, revision } => writeln!(out, "{revision} delete {key}")?,
            WatchEvent::Compacted { compact_revision, revision } => {
                writeln!(out, "{revision} compacted {compact_revision}")?
            }
            other => writeln!(out, "{} {other:?}", other.revision())?,
        }
        out.flush()?;
    }
    bail!("watch ended")
}

async fn register(server: &str, instance: Instance, ttl: Duration) -> Result<ExitCode> {
    let client = connect(server).await?;
    let registration = client.register(instance, ttl).await.context("register failed")?;
    tracing::info!(lease = registration.lease_id(), "registered");
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tokio::select! {
        () = shutdown.cancelled() => {
            registration.deregister().await.context("deregister failed")?;
            Ok(ExitCode::SUCCESS)
        }
        error = client.closed() => Err(anyhow::Error::new(error).context("registration lost")),
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
    token.cancel();
}
