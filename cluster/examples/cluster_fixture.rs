//! A small cluster whose agent and workers behave as its flags say: the real
//! binary that `cluster/tests/cluster.rs` drives. Every line it prints on
//! stdout is one fact a test can wait for (events, messages seen, link echoes).
//!
//! Run: `cargo run -p tandem-cluster --example cluster_fixture -- --workers 3 --links`
//! then `kill -USR1 <master pid>` prints the status table on stderr, and
//! Ctrl-C stops workers, then the agent, then the master.

use std::time::Duration;

use clap::Parser;
use tandem_cluster::internal::FrameLink;
use tandem_cluster::{
    AgentContext, AgentReady, BoxError, Cluster, ClusterEvent, ClusterEvents, Config, MasterContext, Messenger, Origin,
    RestartPolicy, Target, WorkerContext,
};
use tandem_protocol::Frame;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Leave the number of workers to the cluster's default (the CPUs this
    /// process may use) instead of `--workers`.
    #[arg(long)]
    default_workers: bool,
    /// Start-up timeout of the agent and each worker, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    start_timeout_ms: u64,
    /// Stop grace of the workers, then of the agent, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    grace_ms: u64,
    /// First restart delay, in milliseconds (no jitter).
    #[arg(long, default_value_t = 100)]
    backoff_ms: u64,
    /// Consecutive crashes before a slot is marked failed.
    #[arg(long, default_value_t = 10)]
    crash_loop_limit: u32,
    /// Retry delay of a failed slot, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    failed_retry_ms: u64,
    /// This worker exits with code 3 before reporting ready, every time.
    #[arg(long)]
    crash_at_start: Option<u32>,
    /// Workers exit with code 3 before reporting ready while this file exists.
    #[arg(long)]
    fail_start_file: Option<std::path::PathBuf>,
    /// The cluster's name for the control socket.
    #[arg(long)]
    name: Option<String>,
    /// This worker panics right after it reported ready, every time.
    #[arg(long)]
    panic_after_ready: Option<u32>,
    /// This worker never reports ready (it sends a user message "ready" instead).
    #[arg(long)]
    hang_at_start: Option<u32>,
    /// Workers ignore the stop notice.
    #[arg(long)]
    stubborn: bool,
    /// The agent echoes links; worker 1 opens two and checks them.
    #[arg(long)]
    links: bool,
    /// Run the messenger checks once the cluster is ready.
    #[arg(long)]
    messenger: bool,
    /// The agent sends this many frames down every link as fast as it can;
    /// worker 1 opens one and reads it slowly (bursts with pauses).
    #[arg(long, default_value_t = 0)]
    flood: u64,
    /// Worker 1 leaves this many orphans once ready: each a `sleep` whose
    /// parent shell exits at once, so it is re-parented (to PID 1, the master
    /// in a new PID namespace) and exits 50 ms later.
    #[arg(long, default_value_t = 0)]
    orphans: u32,
    /// Keep a hot standby (`Config::standby`).
    #[arg(long)]
    standby: bool,
    /// `Config::agent_max_memory`, in MiB.
    #[arg(long)]
    agent_max_memory_mib: Option<u64>,
    /// The standby touches this many MiB once it reports ready (it grows over
    /// a memory limit the agent stays under).
    #[arg(long, default_value_t = 0)]
    standby_bloat_mib: usize,
}

fn main() -> anyhow::Result<()> {
    tandem_cluster::init_tracing();
    let args = Args::parse();
    let mut config = Config::default();
    config.workers = (!args.default_workers).then_some(args.workers);
    config.agent_start_timeout = Duration::from_millis(args.start_timeout_ms);
    config.worker_start_timeout = Duration::from_millis(args.start_timeout_ms);
    config.worker_stop_timeout = Duration::from_millis(args.grace_ms);
    config.agent_stop_timeout = Duration::from_millis(args.grace_ms);
    let mut restart = RestartPolicy::default();
    restart.initial_delay = Duration::from_millis(args.backoff_ms);
    restart.jitter = 0.0;
    restart.crash_loop_limit = args.crash_loop_limit;
    restart.failed_retry = Duration::from_millis(args.failed_retry_ms);
    config.restart = restart;
    config.name = args.name.clone();
    config.standby = args.standby;
    config.agent_max_memory = args.agent_max_memory_mib.map(|mib| mib * 1024 * 1024);

    let (a, w, m) = (args.clone(), args.clone(), args);
    Cluster::builder("fixture")
        .config(config)
        .agent(move |ctx| agent(ctx, a))
        .worker(move |ctx| worker(ctx, w))
        .master(move |ctx| master(ctx, m))
        .run_blocking()?;
    Ok(())
}

/// `master/<pid>`, `agent/<pid>`, `worker/<id>/<pid>`: how the fixture prints senders.
fn who(sender: &Origin) -> String {
    match sender {
        Origin::Master { pid } => format!("master/{pid}"),
        Origin::Agent { pid, .. } => format!("agent/{pid}"),
        Origin::Worker { id, pid } => format!("worker/{id}/{pid}"),
        other => format!("{other}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn agent(ctx: AgentContext, args: Args) -> Result<(), BoxError> {
    // The standby: ready at once (nothing to mirror), then, grown by
    // `--standby-bloat-mib`, waits for its promotion (then leads as the agent
    // below) or its stop (`promoted` fails with `StandbyStopped`: a clean exit).
    let _bloat = if ctx.is_standby() {
        println!("standby up pid={}", ctx.pid());
        ctx.standby_ready(0).await?;
        let bloat = std::hint::black_box(vec![1u8; args.standby_bloat_mib * 1024 * 1024]);
        ctx.promoted().await?;
        Some(bloat)
    } else {
        None
    };
    let socket = ctx.default_socket_path();
    let _ = std::fs::remove_file(&socket);
    let _listener = tokio::net::UnixListener::bind(&socket)?;
    let m = ctx.messenger().clone();
    let me = who(m.me());
    let mut notes = m.subscribe("note");
    let mut echo = m.subscribe("echo");
    let mut links = ctx.links();
    tracing::info!("agent function started");
    println!("agent up pid={} epoch={}", ctx.pid(), ctx.epoch());
    ctx.ready(AgentReady { socket }).await?;
    loop {
        tokio::select! {
            Some(msg) = notes.recv() => println!("note to=agent from={} payload={}", who(&msg.from), text(&msg.payload)),
            Some(msg) = echo.recv() => msg.reply(format!("{me} saw {} {}", who(&msg.from), text(&msg.payload))).await?,
            Some(incoming) = links.recv() => {
                println!("agent link from worker={} link={}", incoming.worker_id, incoming.link.id);
                tokio::spawn(flood_link(incoming.link, args.flood));
            }
            _ = ctx.stopped() => {
                println!("agent stopping");
                return Ok(());
            }
        }
    }
}

/// Sends `Pong(1..=count)` as fast as the link takes them, counting the sends
/// that had to wait, then echoes.
async fn flood_link(link: FrameLink, count: u64) {
    if count > 0 {
        let started = std::time::Instant::now();
        let mut waits = 0u64;
        for n in 1..=count {
            let sent = match link.tx.try_send(Frame::Pong(n)) {
                Ok(()) => Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Full(frame)) => {
                    waits += 1;
                    link.tx.send(frame).await.map_err(|_| ())
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(()),
            };
            if sent.is_err() {
                println!("agent flood link={} failed at={n}", link.id);
                return;
            }
        }
        let elapsed = started.elapsed().as_millis();
        println!("agent flood link={} sent={count} waits={waits} elapsed_ms={elapsed}", link.id);
    }
    echo_link(link).await;
}

/// Answers every `Ping(n)` with `Pong(n)`; says when the worker's end is gone.
async fn echo_link(mut link: FrameLink) {
    while let Some(frame) = link.rx.recv().await {
        if let Frame::Ping(n) = frame
            && link.tx.send(Frame::Pong(n)).await.is_err()
        {
            break;
        }
    }
    println!("agent link={} ended", link.id);
}

async fn worker(ctx: WorkerContext, args: Args) -> Result<(), BoxError> {
    let id = ctx.id();
    if args.fail_start_file.as_ref().is_some_and(|f| f.exists()) {
        println!("worker {id} failing at start");
        std::process::exit(3);
    }
    if args.crash_at_start == Some(id) {
        println!("worker {id} crashing at start");
        std::process::exit(3);
    }
    let m = ctx.messenger().clone();
    let me = who(m.me());
    let mut notes = m.subscribe("note");
    let mut echo = m.subscribe("echo");
    let mut silent = m.subscribe("silent");
    let mut cmd = m.subscribe("cmd");
    if args.hang_at_start == Some(id) {
        // A user message that looks like readiness must not count as readiness.
        m.send_to_master("ready", "ready").await?;
        println!("worker {id} hanging at start");
        ctx.stopped().await;
        return Ok(());
    }
    tracing::info!("worker function started");
    let mut agent = ctx.agent();
    {
        let a = agent.borrow_and_update().clone();
        println!("worker {id} agent pid={} epoch={} up={}", a.pid, a.epoch, a.up);
    }
    ctx.ready().await?;
    if args.panic_after_ready == Some(id) {
        panic!("worker {id} panicking right after ready");
    }
    if args.links && id == 1 {
        tokio::spawn(link_checks(ctx.clone()));
    }
    if args.orphans > 0 && id == 1 {
        for _ in 0..args.orphans {
            tokio::process::Command::new("sh").args(["-c", "sleep 0.05 & exit 0"]).status().await?;
        }
        println!("worker 1 orphans made={}", args.orphans);
    }
    if args.flood > 0 && id == 1 {
        tokio::spawn(flood_check(ctx.clone(), args.flood));
    }
    let mut held = Vec::new(); // requests on "silent": never answered
    loop {
        // Biased, notes first: a note queued before an echo request is printed
        // before the echo is answered (the master's checks rely on it).
        tokio::select! {
            biased;
            Some(msg) = notes.recv() => println!("note to=worker/{id} from={} payload={}", who(&msg.from), text(&msg.payload)),
            Ok(()) = agent.changed() => {
                let a = agent.borrow_and_update().clone();
                if a.up {
                    println!("worker {id} agent pid={} epoch={} up=true", a.pid, a.epoch);
                }
            }
            Some(msg) = echo.recv() => msg.reply(format!("{me} saw {} {}", who(&msg.from), text(&msg.payload))).await?,
            Some(msg) = silent.recv() => {
                // Tell the master the request arrived (and is now pending here).
                m.send_to_master("held", msg.payload.clone()).await?;
                held.push(msg);
            }
            Some(_) = cmd.recv() => {
                tokio::spawn(worker_checks(m.clone()));
            }
            _ = ctx.stopped() => {
                println!("worker {id} stopping");
                if args.stubborn {
                    std::future::pending::<()>().await;
                }
                return Ok(());
            }
        }
    }
}

/// Worker 1's messenger checks, run on the master's command.
async fn worker_checks(m: Messenger) {
    let secs = Duration::from_secs(3);
    match m.request(Target::Agent, "echo", "q3", secs).await {
        Ok(r) => println!("worker 1 reply from agent: {}", text(&r)),
        Err(e) => println!("worker 1 reply from agent failed: {e}"),
    }
    // The payload claims another sender; the receiver sees the real one.
    if let Err(e) = m.send_to_worker(2, "note", "i-am-the-agent").await {
        println!("worker 1 send to worker 2 failed: {e}");
    }
    match m.request(Target::Worker(3), "echo", "q4", secs).await {
        Ok(r) => println!("worker 1 reply from worker 3: {}", text(&r)),
        Err(e) => println!("worker 1 reply from worker 3 failed: {e}"),
    }
    match m.request(Target::Worker(2), "silent", "q5", Duration::from_millis(300)).await {
        Ok(_) => println!("worker 1 silent: unexpected reply"),
        Err(e) => println!("worker 1 silent: timeout={} error={e}", e.is_timeout()),
    }
    match m.send_to_random_worker("note", "from-1-random").await {
        Ok(id) => println!("worker 1 random picked worker={id}"),
        Err(e) => println!("worker 1 random failed: {e}"),
    }
    match m.status().await {
        Ok(table) => println!("worker 1 status rows={}", table.rows.len()),
        Err(e) => println!("worker 1 status failed: {e}"),
    }
    if let Err(e) = m.send_to_master("done", "").await {
        println!("worker 1 done failed: {e}");
    }
}

/// Worker 1's link checks: two links echo; both end when the agent dies; a new
/// link to the restarted agent echoes again.
async fn link_checks(ctx: WorkerContext) {
    let mut first = Vec::new();
    for n in 1..=2u64 {
        match ping(&ctx, n).await {
            Ok(link) => first.push(link),
            Err(e) => println!("link worker=1 failed: {e}"),
        }
    }
    let epoch = ctx.agent().borrow().epoch;
    for mut link in first {
        // Keep `tx` alive: dropping it would close the link from this side.
        while link.rx.recv().await.is_some() {}
        println!("link worker=1 link={} closed", link.id);
    }
    let mut agent = ctx.agent();
    if agent.wait_for(|a| a.up && a.epoch > epoch).await.is_err() {
        return;
    }
    let epoch = agent.borrow().epoch;
    match ping(&ctx, 3).await {
        Ok(_) => println!("link worker=1 reopened epoch={epoch}"),
        Err(e) => println!("link worker=1 reopen failed: {e}"),
    }
}

/// Worker 1's slow reader: takes the agent's flood in bursts of 100 frames with
/// a 10 ms pause after each (slowness, not a wait for a state: at most 10,000
/// frames/s), checks the order, then checks the link still echoes.
async fn flood_check(ctx: WorkerContext, count: u64) {
    const BURST: u64 = 100;
    const PAUSE: Duration = Duration::from_millis(10);
    let mut link = match ctx.open_link().await {
        Ok(link) => link,
        Err(e) => return println!("worker 1 flood open failed: {e}"),
    };
    let mut paused = Duration::ZERO;
    let mut in_order = true;
    for n in 1..=count {
        match link.rx.recv().await {
            Some(Frame::Pong(got)) => in_order &= got == n,
            Some(other) => {
                println!("worker 1 flood unexpected {other:?} at={n}");
                in_order = false;
            }
            None => return println!("worker 1 flood link closed at={n}"),
        }
        if n % BURST == 0 {
            let started = std::time::Instant::now();
            tokio::time::sleep(PAUSE).await;
            paused += started.elapsed();
        }
    }
    println!("worker 1 flood received={count} in_order={in_order} paused_ms={}", paused.as_millis());
    let echoed = match link.tx.send(Frame::Ping(u64::MAX)).await {
        Ok(()) => matches!(link.rx.recv().await, Some(Frame::Pong(u64::MAX))),
        Err(_) => false,
    };
    println!("worker 1 flood link open after={echoed}");
}

async fn ping(ctx: &WorkerContext, n: u64) -> Result<FrameLink, BoxError> {
    let mut link = ctx.open_link().await?;
    link.tx.send(Frame::Ping(n)).await?;
    match link.rx.recv().await {
        Some(Frame::Pong(got)) => println!("link worker=1 link={} pong={got}", link.id),
        other => println!("link worker=1 link={} unexpected {other:?}", link.id),
    }
    Ok(link)
}

async fn master(ctx: MasterContext, args: Args) -> Result<(), BoxError> {
    let mut events = ctx.events();
    let later = ctx.events();
    let mut later = Some(later);
    let m = ctx.messenger().clone();
    let mut notes = m.subscribe("note");
    tokio::spawn(async move {
        while let Some(msg) = notes.recv().await {
            println!("note to=master from={} payload={}", who(&msg.from), text(&msg.payload));
        }
    });
    while let Some(event) = events.recv().await {
        println!("{event}");
        if let ClusterEvent::ClusterReady { workers, .. } = &event
            && args.messenger
            && let Some(later) = later.take()
        {
            tokio::spawn(master_checks(m.clone(), later, workers.clone()));
        }
    }
    Ok(())
}

fn show<T: std::fmt::Debug>(r: Result<T, tandem_cluster::Error>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("error retryable={} {e}", e.is_retryable()),
    }
}

/// The master's messenger checks (three workers).
async fn master_checks(m: Messenger, mut events: ClusterEvents, workers: Vec<u32>) {
    let secs = Duration::from_secs(3);
    println!("check to-agent: {}", show(m.send_to_agent("note", "m1").await));
    println!("check to-worker: {}", show(m.send_to_worker(2, "note", "m2").await));
    println!("check to-workers: {}", show(m.send_to_workers("note", "m3").await));
    println!("check random: {}", show(m.send_to_random_worker("note", "m4").await));
    println!("check broadcast: {}", show(m.broadcast("note", "m5").await));
    let reply = m.request(Target::Agent, "echo", "m6", secs).await.map(|b| text(&b));
    println!("check request-agent: {}", show(reply));
    let silent = m.request(Target::Worker(1), "silent", "m7", Duration::from_millis(300)).await;
    println!("check request-deadline: timeout={} {}", silent.as_ref().is_err_and(|e| e.is_timeout()), show(silent));
    println!("check request-nohandler: {}", show(m.request(Target::Worker(1), "nobody", "m8", secs).await));
    println!("check no-such-worker: {}", show(m.send_to_worker(9, "note", "m9").await));

    let mut done = m.subscribe("done");
    println!("check cmd: {}", show(m.send_to_worker(1, "cmd", "").await));
    if tokio::time::timeout(Duration::from_secs(10), done.recv()).await.is_err() {
        println!("check worker-1: no done");
    }

    // Every note sent so far has been printed once these echoes are answered.
    for id in 2..=3 {
        if let Err(e) = m.request(Target::Worker(id), "echo", "sync", secs).await {
            println!("check sync worker {id}: {e}");
        }
    }

    // A request pending at worker 3 when it dies fails with TargetExited.
    let mut held = m.subscribe("held");
    let pending = {
        let m = m.clone();
        tokio::spawn(async move { m.request(Target::Worker(3), "silent", "m10", Duration::from_secs(10)).await })
    };
    // Kill worker 3 only once it holds the request.
    let arrived = async {
        while let Some(msg) = held.recv().await {
            if &msg.payload[..] == b"m10" {
                return;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), arrived).await.is_err() {
        println!("check worker-3: the request never arrived");
    }
    let Some(&pid) = workers.get(2) else { return };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    match pending.await {
        Ok(r) => println!("check pending-request-dead-worker: {}", show(r)),
        Err(e) => println!("check pending-request-dead-worker: join error {e}"),
    }
    let exited = async {
        while let Some(event) = events.recv().await {
            if let ClusterEvent::Exited { process, .. } = &event
                && process.worker_id == Some(3)
            {
                return;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), exited).await.is_err() {
        println!("check worker-3: no exit event");
    }
    println!("check dead-worker: {}", show(m.send_to_worker(3, "note", "m11").await));
    println!("check dead-worker-request: {}", show(m.request(Target::Worker(3), "echo", "m12", secs).await));
    println!("checks done");
}
