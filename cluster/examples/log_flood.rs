//! A cluster whose workers write lines to stdout at a set rate: what the log
//! capture ([`Builder::log_dir`](tandem_cluster::Builder::log_dir)) is tested
//! and measured with (`cluster/tests/logs.rs`, `bench/logquota.sh`).
//!
//! Run: `cargo run -p tandem-cluster --example log_flood -- --log-dir /tmp/logs --rate 10000 --secs 60 --report /tmp/report`
//! then `ls -l /tmp/logs/log_flood/`; Ctrl-C stops it.
//!
//! Each worker prints `worker <K> line <n> xxx...` (`--line-bytes` long in
//! all) at `--rate` lines a second for `--secs` seconds, on a thread of its
//! own, one `write` per line; then writes `<report>/worker-<K>.json`:
//! `{"lines": n, "secs": s, "max_write_ms": m, "max_pipe_bytes": q,
//! "pipe_size": p}`: the longest a write took (a descheduled thread shows
//! it too), and the most bytes that waited in the pipe for the master,
//! sampled every 64 lines (a write blocks only when they reach the size). With `--tick-ms`, each worker
//! also prints `worker <K> tick <n>` that often, for as long as it runs. The
//! master prints `metrics on <ADDR>` (with `--metrics`) and `ready` on its
//! stdout, which is not captured.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use tandem_cluster::{BoxError, Cluster, ClusterEvent, MasterContext, WorkerContext};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// The cluster's name (`tandem ls`) and the sub-directory of the logs.
    #[arg(long, default_value = "log_flood")]
    name: String,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Capture the children's output into this directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Rotation size of each log file, in bytes (the default: the cluster's, 10 MiB).
    #[arg(long)]
    log_file_size: Option<u64>,
    /// All log files together, in bytes (the default: the cluster's, 100 MiB).
    #[arg(long)]
    log_quota: Option<u64>,
    /// Serve /metrics here (port 0: any).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Lines a second each worker writes (0: none).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// For how long, in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// The length of each line, its newline included.
    #[arg(long, default_value_t = 100)]
    line_bytes: usize,
    /// Where each worker writes its report when its flood is over.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Each worker also prints a tick this often, in milliseconds.
    #[arg(long)]
    tick_ms: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    tandem_cluster::init_tracing();
    let args = Args::parse();
    let mut builder = Cluster::builder("log_flood").name(args.name.clone()).workers(args.workers);
    if let Some(dir) = &args.log_dir {
        builder = builder.log_dir(dir);
    }
    let defaults = tandem_cluster::Config::default();
    builder = builder
        .log_limits(args.log_file_size.unwrap_or(defaults.log_file_size), args.log_quota.unwrap_or(defaults.log_quota));
    if let Some(addr) = args.metrics {
        builder = builder.metrics(addr);
    }
    let (w, m) = (args.clone(), args);
    builder.worker(move |ctx| worker(ctx, w)).master(move |ctx| master(ctx, m)).run_blocking()?;
    Ok(())
}

async fn master(ctx: MasterContext, _args: Args) -> Result<(), BoxError> {
    if let Some(addr) = ctx.metrics_addr() {
        println!("metrics on {addr}");
    }
    let mut events = ctx.events();
    while let Some(event) = events.recv().await {
        if let ClusterEvent::ClusterReady { .. } = event {
            println!("ready");
        }
    }
    Ok(())
}

async fn worker(ctx: WorkerContext, args: Args) -> Result<(), BoxError> {
    let id = ctx.id();
    println!("worker {id} started");
    tracing::info!("worker {id} up");
    ctx.ready().await?;
    if args.rate > 0 {
        let args = args.clone();
        std::thread::spawn(move || flood(id, &args));
    }
    match args.tick_ms {
        Some(ms) => {
            let mut interval = tokio::time::interval(Duration::from_millis(ms.max(1)));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        n += 1;
                        println!("worker {id} tick {n}");
                    }
                    _ = ctx.stopped() => return Ok(()),
                }
            }
        }
        None => ctx.stopped().await,
    }
    Ok(())
}

/// `rate` lines a second for `secs`, paced every millisecond; then the report.
fn flood(id: u32, args: &Args) {
    let started = Instant::now();
    let total = args.rate * args.secs;
    let mut stdout = std::io::stdout();
    let mut written = 0u64;
    let mut max_write = Duration::ZERO;
    // How full the pipe to the master got: at its size, a write would block.
    let pipe_size = pipe_size();
    let mut max_queued = 0usize;
    let prefix_len = format!("worker {id} line {total} ").len();
    let pad = "x".repeat(args.line_bytes.saturating_sub(prefix_len + 1));
    while written < total {
        let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while written < due.min(total) {
            let line = format!("worker {id} line {written} {pad}\n");
            let before = Instant::now();
            if stdout.write_all(line.as_bytes()).is_err() {
                return;
            }
            max_write = max_write.max(before.elapsed());
            written += 1;
            if written.is_multiple_of(64) {
                max_queued = max_queued.max(queued());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(dir) = &args.report {
        let report = format!(
            "{{\"lines\": {written}, \"secs\": {secs:.3}, \"max_write_ms\": {:.3}, \"max_pipe_bytes\": {max_queued}, \"pipe_size\": {pipe_size}}}\n",
            max_write.as_secs_f64() * 1000.0
        );
        let _ = std::fs::write(dir.join(format!("worker-{id}.json")), report);
    }
}

/// The size of the pipe on stdout (`F_GETPIPE_SZ`); 0 when stdout is no pipe.
fn pipe_size() -> usize {
    // SAFETY: fcntl on fd 1 with F_GETPIPE_SZ reads a kernel value; no memory is passed.
    let size = unsafe { libc::fcntl(1, libc::F_GETPIPE_SZ) };
    usize::try_from(size).unwrap_or(0)
}

/// The bytes written to stdout's pipe and not yet read by the master (`FIONREAD`).
fn queued() -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points to `n`.
    let rc = unsafe { libc::ioctl(1, libc::FIONREAD, &mut n) };
    if rc == 0 { usize::try_from(n).unwrap_or(0) } else { 0 }
}
