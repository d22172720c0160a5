//! Multi-process tests: each runs the real `cluster_fixture` example (built by
//! `cargo test -p tandem-cluster` into `target/<profile>/examples/`) and reads
//! its stdout line by line. Every wait is bounded by the test's deadline; no
//! test sleeps to wait for a state; every process a test started is killed by
//! pid when the test ends, pass or fail.
//!
//! Run the whole package (`cargo test -p tandem-cluster`): a `--test cluster`
//! filter alone does not rebuild the example, and would drive a stale one.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_testkit::{ProcessGuard, alive, field};

/// The longest any one test may run.
const TEST_TIMEOUT: Duration = Duration::from_secs(40);

fn fixture_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/cluster-<hash> -> target/<profile>/examples/cluster_fixture
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = profile_dir.join("examples").join("cluster_fixture");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test -p tandem-cluster`, which builds the examples",
        path.display()
    );
    path
}

/// A running fixture cluster and everything it printed.
struct Fixture {
    /// The master: SIGTERM when dropped (so it removes its runtime directory), SIGKILL after 5 s.
    master: Option<ProcessGuard>,
    lines: Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    stderr: Arc<Mutex<Vec<String>>>,
    deadline: Instant,
}

impl Fixture {
    fn start(args: &[&str]) -> Fixture {
        Fixture::start_with(args, |_| {})
    }

    /// [`start`](Self::start), with the command adjusted by `prepare` first
    /// (a `pre_exec` hook: CPU affinity, a cgroup).
    fn start_with(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Fixture {
        let mut command = Command::new(fixture_path());
        command.args(args).env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        prepare(&mut command);
        let mut child = command.spawn().expect("spawn the fixture");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        let err_lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&err_lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap_or_else(PoisonError::into_inner).push(line);
            }
        });
        Fixture {
            master: Some(ProcessGuard::with_grace(child, Duration::from_secs(5))),
            lines,
            seen: Vec::new(),
            stderr: err_lines,
            deadline: Instant::now() + TEST_TIMEOUT,
        }
    }

    fn master_pid(&self) -> u32 {
        self.master.as_ref().map(ProcessGuard::id).expect("master")
    }

    fn line(&self, i: usize) -> &str {
        &self.seen[i].1
    }

    fn at(&self, i: usize) -> Instant {
        self.seen[i].0
    }

    /// The index of the first line at or after `from` matching `pred`, waiting
    /// for more output until the test's deadline.
    fn wait_from(&mut self, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        if let Some(i) = self.seen.iter().skip(from).position(|(_, l)| pred(l)) {
            return from + i;
        }
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(entry) => {
                    let matched = pred(&entry.1);
                    self.seen.push(entry);
                    if matched && self.seen.len() > from {
                        return self.seen.len() - 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
                Err(RecvTimeoutError::Disconnected) => panic!("the fixture's output ended while waiting for {what}"),
            }
        }
    }

    fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        self.wait_from(0, what, pred)
    }

    fn wait_line(&mut self, line: &str) -> usize {
        self.wait(line, |l| l == line)
    }

    fn wait_prefix(&mut self, prefix: &str) -> usize {
        self.wait(prefix, |l| l.starts_with(prefix))
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.seen.iter().filter(|(_, l)| pred(l)).count()
    }

    /// Polls stderr (the status table goes there) until a line matches.
    fn wait_stderr(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        while Instant::now() < self.deadline {
            if self.stderr.lock().unwrap_or_else(PoisonError::into_inner).iter().any(|l| pred(l)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what} on stderr");
    }

    /// Waits for the master to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let master = self.master.as_mut().expect("master");
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = master.child().try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < until, "the master did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ready(&mut self) -> Ready {
        let i = self.wait_prefix("cluster ready:");
        Ready::parse(self.line(i))
    }

    /// Every pid the fixture ever spawned (from its `spawned:` lines).
    fn spawned_pids(&mut self) -> Vec<u32> {
        while let Ok(entry) = self.lines.try_recv() {
            self.seen.push(entry);
        }
        self.seen.iter().filter(|(_, l)| l.starts_with("spawned:")).filter_map(|(_, l)| pid_in(l)).collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let pids = self.spawned_pids();
        drop(self.master.take());
        for pid in pids {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("cluster_fixture"));
            if ours && alive(pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!("---- fixture stdout ----");
            for (_, l) in &self.seen {
                eprintln!("{l}");
            }
            eprintln!("---- fixture stderr (last 60 lines) ----");
            let err = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
            for l in err.iter().rev().take(60).rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The `cluster ready:` line.
#[derive(Debug)]
struct Ready {
    master: u32,
    agent: u32,
    workers: Vec<u32>,
}

impl Ready {
    fn parse(line: &str) -> Ready {
        let num =
            |key: &str| field(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{key} in {line}"));
        let workers = field(line, "workers")
            .map(|v| v.split(',').filter(|s| !s.is_empty()).map(|p| p.parse().expect("worker pid")).collect())
            .unwrap_or_default();
        Ready { master: num("master"), agent: num("agent"), workers }
    }
}

/// The pid in `(pid N)`.
fn pid_in(line: &str) -> Option<u32> {
    let start = line.find("(pid ")? + 5;
    line[start..].split(')').next()?.parse().ok()
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).expect("send a signal");
}

/// Polls (bounded) until none of `pids` is alive; returns how long it took.
fn wait_all_dead(pids: &[u32], limit: Duration) -> Duration {
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        let still: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        assert!(start.elapsed() < limit, "still alive after {limit:?}: {still:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

#[test]
fn start_up_is_ordered_and_the_ready_line_lists_live_processes() {
    let mut f = Fixture::start(&["--workers", "3"]);
    let ready_at = f.wait_prefix("cluster ready:");
    let ready = Ready::parse(f.line(ready_at));
    assert_eq!(ready.master, f.master_pid());
    assert_eq!(ready.workers.len(), 3, "{ready:?}");
    let distinct: HashSet<u32> = ready.workers.iter().copied().chain([ready.agent, ready.master]).collect();
    assert_eq!(distinct.len(), 5, "{ready:?}");
    assert!(alive(ready.agent));
    assert!(ready.workers.iter().all(|&p| alive(p)), "{ready:?}");

    // The agent was ready before any worker was spawned; every worker before cluster-ready.
    let agent_ready = f.wait_prefix("agent ready:");
    let first_worker = f.wait_prefix("spawned: worker");
    assert!(agent_ready < first_worker, "a worker was spawned before the agent was ready");
    for (i, pid) in ready.workers.iter().enumerate() {
        let id = i + 1;
        let line = f.wait_line(&format!("worker ready: worker={id} pid={pid}"));
        assert!(line < ready_at);
        // Each worker got the agent's info in its Init.
        f.wait_line(&format!("worker {id} agent pid={} epoch=1 up=true", ready.agent));
    }

    // Every process's logs carry its role, worker id and pid.
    let w2 = format!("worker.id=2 pid={}", ready.workers[1]);
    f.wait_stderr("worker 2's log line", |l| {
        l.contains("role=\"worker\"") && l.contains(&w2) && l.contains("worker function started")
    });
    let a = format!("pid={}", ready.agent);
    f.wait_stderr("the agent's log line", |l| {
        l.contains("role=\"agent\"") && l.contains(&a) && l.contains("agent function started")
    });
    let m = format!("pid={}", ready.master);
    f.wait_stderr("the master's log line", |l| l.contains("role=\"master\"") && l.contains(&m));

    // SIGUSR1: the status table on stderr (ROLE SLOT PID STATE RESTARTS UPTIME CPU% RSS LAST EXIT).
    signal(ready.master, Signal::SIGUSR1);
    let agent = ready.agent.to_string();
    let row = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<String>>();
    f.wait_stderr("the agent's status row", |l| {
        let r = row(l);
        r.len() == 9 && r[0] == "agent" && r[2] == agent && r[3] == "online"
    });
    f.wait_stderr("worker 3's status row", |l| {
        let r = row(l);
        r.len() == 9 && r[0] == "worker" && r[1] == "3" && r[3] == "online" && r[7].ends_with('M')
    });
}

#[test]
fn a_killed_worker_is_restarted_in_the_same_slot() {
    let mut f = Fixture::start(&["--workers", "2"]);
    let ready = f.ready();
    let old = ready.workers[1];
    signal(old, Signal::SIGKILL);
    f.wait_prefix(&format!("exited: worker 2 (pid {old}) was killed by signal 9"));
    let i = f.wait_prefix("worker restarted: worker=2 ");
    let new: u32 = field(f.line(i), "pid").and_then(|p| p.parse().ok()).expect("pid");
    assert_ne!(new, old);
    assert!(alive(new));
    assert!(alive(ready.workers[0]), "worker 1 is untouched");
    assert_eq!(f.count(|l| l.starts_with("worker restarted: worker=1 ")), 0);
}

#[test]
fn a_killed_agent_is_restarted_with_a_higher_epoch_and_workers_are_told() {
    let mut f = Fixture::start(&["--workers", "2"]);
    let ready = f.ready();
    signal(ready.agent, Signal::SIGKILL);
    let i = f.wait_prefix("agent restarted: ");
    let line = f.line(i).to_owned();
    let pid: u32 = field(&line, "pid").and_then(|p| p.parse().ok()).expect("pid");
    assert_eq!(field(&line, "epoch"), Some("2"));
    assert_ne!(pid, ready.agent);
    assert!(alive(pid));
    for id in 1..=2 {
        f.wait_line(&format!("worker {id} agent pid={pid} epoch=2 up=true"));
    }
    assert!(ready.workers.iter().all(|&p| alive(p)), "workers are not restarted with the agent");
}

#[test]
fn killing_the_master_leaves_no_child_behind() {
    let mut f = Fixture::start(&["--workers", "3"]);
    let ready = f.ready();
    let children: Vec<u32> = ready.workers.iter().copied().chain([ready.agent]).collect();
    signal(ready.master, Signal::SIGKILL);
    let took = wait_all_dead(&children, Duration::from_secs(1));
    eprintln!("all children gone {took:?} after the master's SIGKILL");
    // A killed master cannot remove its runtime directory (the next master
    // would); this test removes it so a test run leaves nothing behind.
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let prefix = format!("tandem-fixture-{}-", ready.master);
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[test]
fn sigterm_stops_workers_then_the_agent_and_exits_0() {
    let mut f = Fixture::start(&["--workers", "2", "--grace-ms", "3000"]);
    let ready = f.ready();
    let started = Instant::now();
    signal(ready.master, Signal::SIGTERM);
    let status = f.wait_exit(Duration::from_secs(8));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}: longer than the grace", started.elapsed());
    let agent = f.wait_line("agent stopping");
    for id in 1..=2 {
        assert!(f.wait_line(&format!("worker {id} stopping")) < agent, "worker {id} must stop before the agent");
    }
    let children: Vec<u32> = ready.workers.iter().copied().chain([ready.agent]).collect();
    wait_all_dead(&children, Duration::from_secs(1));
}

#[test]
fn a_second_signal_skips_the_grace() {
    let mut f = Fixture::start(&["--workers", "2", "--stubborn", "--grace-ms", "20000"]);
    let ready = f.ready();
    signal(ready.master, Signal::SIGTERM);
    f.wait_line("worker 1 stopping");
    f.wait_line("worker 2 stopping");
    let second = Instant::now();
    signal(ready.master, Signal::SIGINT);
    let status = f.wait_exit(Duration::from_secs(5));
    assert!(second.elapsed() < Duration::from_secs(3), "took {:?}", second.elapsed());
    assert_eq!(status.code(), Some(0), "{status:?}");
    f.wait_line("shutdown started: forced=true");
    let children: Vec<u32> = ready.workers.iter().copied().chain([ready.agent]).collect();
    wait_all_dead(&children, Duration::from_secs(1));
}

#[test]
fn a_worker_that_ignores_the_stop_is_sigkilled_when_the_grace_expires_and_the_master_exits_0() {
    const GRACE: Duration = Duration::from_millis(1000);
    let mut f = Fixture::start(&["--workers", "2", "--stubborn", "--grace-ms", "1000"]);
    let ready = f.ready();
    let started = Instant::now();
    signal(ready.master, Signal::SIGTERM);
    f.wait_line("worker 1 stopping");
    f.wait_line("worker 2 stopping");
    let status = f.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took >= GRACE, "the workers were killed before their grace was over: {took:?}");
    assert!(took < GRACE + Duration::from_secs(3), "took {took:?}: the grace did not end in a SIGKILL");
    // Killed, not stopped: the exit events say SIGKILL, and the agent stopped
    // gracefully only after both were gone.
    let agent = f.wait_line("agent stopping");
    for pid in &ready.workers {
        let exited = f.wait(&format!("worker pid {pid} killed"), |l| {
            l.starts_with("exited: worker ") && l.contains(&format!("(pid {pid})")) && l.contains("(SIGKILL)")
        });
        assert!(exited < agent, "worker pid {pid} must be gone before the agent stops");
    }
    assert_eq!(
        f.count(|l| l.starts_with("shutdown started: forced=true")),
        0,
        "one signal: the grace ran out by itself"
    );
    // The master says why, and whom it killed.
    f.wait_stderr("the grace-over line", |l| {
        l.contains("grace period over; killing what is left") && l.contains("Workers")
    });
    for pid in &ready.workers {
        f.wait_stderr("the SIGKILL line", |l| l.contains("SIGKILL") && l.contains(&format!("pid={pid}")));
    }
    let children: Vec<u32> = ready.workers.iter().copied().chain([ready.agent]).collect();
    wait_all_dead(&children, Duration::from_secs(1));
}

#[test]
fn a_worker_crashing_at_start_up_is_backed_off_reported_and_retried_later() {
    let mut f = Fixture::start(&[
        "--workers",
        "2",
        "--crash-at-start",
        "2",
        "--backoff-ms",
        "100",
        "--crash-loop-limit",
        "4",
        "--failed-retry-ms",
        "1500",
    ]);
    let mut from = 0;
    let mut delays = Vec::new();
    let mut gaps = Vec::new();
    for failures in 1..=4u32 {
        let failed = f.wait_from(from, "a start failure of worker 2", |l| {
            l.starts_with("start failed: worker 2 (pid ") && l.ends_with("exited with code 3 before it was ready")
        });
        let scheduled = f.wait_from(failed, "restart scheduled", |l| l.starts_with("restart scheduled: worker=2 "));
        let line = f.line(scheduled).to_owned();
        assert_eq!(field(&line, "failures"), Some(failures.to_string().as_str()), "{line}");
        let delay: u64 = field(&line, "in_ms").and_then(|d| d.parse().ok()).expect("in_ms");
        let respawned = f.wait_from(scheduled, "worker 2 respawned", |l| l.starts_with("spawned: worker 2 "));
        delays.push(delay);
        gaps.push(f.at(respawned) - f.at(scheduled));
        from = respawned;
    }
    assert_eq!(delays, vec![100, 200, 400, 800], "restart delays must grow");
    let waited: Duration = gaps.iter().sum();
    assert!(waited >= Duration::from_millis(1200), "restarts came too fast: {gaps:?}");
    assert!(gaps[3] >= Duration::from_millis(600), "{gaps:?}");

    // The fifth crash in a row marks the slot failed; the cluster is ready without it.
    let failed = f.wait_from(from, "slot failed", |l| l.starts_with("slot failed: worker=2 "));
    assert_eq!(f.line(failed), "slot failed: worker=2 failures=5 retry_in_ms=1500");
    let ready = f.ready();
    assert_eq!(ready.workers.len(), 1);
    let ready_line = f.wait_prefix("cluster ready:");
    assert!(f.line(ready_line).ends_with(" failed=2"), "{}", f.line(ready_line));

    // Not lost for good: retried later, and a crash then fails it again at once.
    let retried = f.wait_from(failed, "worker 2 retried", |l| l.starts_with("spawned: worker 2 "));
    assert!(f.at(retried) - f.at(failed) >= Duration::from_millis(1200), "retried too early");
    let again = f.wait_from(retried, "slot failed again", |l| l.starts_with("slot failed: worker=2 "));
    assert_eq!(f.line(again), "slot failed: worker=2 failures=5 retry_in_ms=1500");
    assert_eq!(f.count(|l| l.starts_with("spawned: worker 2 ")), 6, "5 fast attempts, then one retry");
    assert!(alive(ready.workers[0]), "worker 1 is unaffected");
}

/// A start function that panics just after `ready()`: its readiness still
/// reached the master (written before the panic ends the process, even on a
/// worker's one-thread runtime), so the slot is a crash after ready, not a
/// start failure.
#[test]
fn a_worker_panicking_right_after_ready_was_ready() {
    let mut f = Fixture::start(&["--workers", "2", "--panic-after-ready", "2", "--backoff-ms", "100"]);
    let ready = f.wait_prefix("cluster ready:");
    let exited = f.wait_from(ready, "worker 2's exit", |l| l.starts_with("exited: worker 2 (pid "));
    assert!(f.line(exited).contains("exited with code 101"), "{}", f.line(exited));
    f.wait_from(exited, "worker 2 restarted", |l| l.starts_with("spawned: worker 2 "));
    assert_eq!(f.count(|l| l.starts_with("start failed: worker 2")), 0, "its ready was lost");
}

#[test]
fn a_worker_that_never_reports_ready_times_out_with_its_name_and_pid() {
    let mut f = Fixture::start(&["--workers", "2", "--hang-at-start", "1", "--start-timeout-ms", "500"]);
    let spawned = f.wait_prefix("spawned: worker 1 ");
    let pid = pid_in(f.line(spawned)).expect("pid");
    f.wait_line("worker 1 hanging at start");
    // Its user message "ready" did not make it ready: only the deadline decides.
    let failed = f.wait_line(&format!("start failed: worker 1 (pid {pid}): was not ready within 500ms"));
    assert_eq!(f.count(|l| l.starts_with("worker ready: worker=1 ")), 0);
    f.wait_from(failed, "the kill", |l| l.starts_with(&format!("exited: worker 1 (pid {pid}) was killed by signal 9")));
    f.wait_from(failed, "its restart", |l| l.starts_with("restart scheduled: worker=1 "));
}

#[test]
fn the_messenger_routes_stamps_senders_and_reports_undeliverable_messages() {
    let mut f = Fixture::start(&["--workers", "3", "--messenger", "--backoff-ms", "5000"]);
    let ready = f.ready();
    let (m, a) = (ready.master, ready.agent);
    let w: Vec<u32> = ready.workers.clone();
    f.wait_line("checks done");

    // To the agent, to one worker, to all workers, to a random one, to everyone.
    f.wait_line("check to-agent: ok ()");
    f.wait_line(&format!("note to=agent from=master/{m} payload=m1"));
    f.wait_line("check to-worker: ok ()");
    f.wait_line(&format!("note to=worker/2 from=master/{m} payload=m2"));
    f.wait_line("check to-workers: ok 3");
    for id in 1..=3 {
        f.wait_line(&format!("note to=worker/{id} from=master/{m} payload=m3"));
    }
    let random = f.wait_prefix("check random: ok ");
    let picked = f.line(random).trim_start_matches("check random: ok ").to_owned();
    f.wait_line(&format!("note to=worker/{picked} from=master/{m} payload=m4"));
    f.wait_line("check broadcast: ok 4");
    f.wait_line(&format!("note to=agent from=master/{m} payload=m5"));
    for id in 1..=3 {
        f.wait_line(&format!("note to=worker/{id} from=master/{m} payload=m5"));
    }
    assert_eq!(f.count(|l| l.ends_with("payload=m2")), 1, "m2 went to worker 2 only");
    assert_eq!(f.count(|l| l.ends_with("payload=m3")), 3, "m3 went to the workers only");
    assert_eq!(f.count(|l| l.ends_with("payload=m4")), 1, "m4 went to one worker");
    assert_eq!(f.count(|l| l.ends_with("payload=m5")), 4, "m5 went to everyone but its sender");

    // Request/reply, deadline, no handler, no such worker.
    f.wait_line(&format!("check request-agent: ok \"agent/{a} saw master/{m} m6\""));
    f.wait_prefix("check request-deadline: timeout=true error retryable=true worker 1 sent no reply within 300ms");
    f.wait_line("check request-nohandler: error retryable=false worker 1 has no handler for topic \"nobody\"");
    f.wait_line("check no-such-worker: error retryable=false there is no worker 9 (the cluster has workers 1 to 3)");

    // From a worker: the master stamps the true sender, whatever the payload claims.
    let w1 = format!("worker/1/{}", w[0]);
    f.wait_line(&format!("worker 1 reply from agent: agent/{a} saw {w1} q3"));
    f.wait_line(&format!("note to=worker/2 from={w1} payload=i-am-the-agent"));
    f.wait_line(&format!("worker 1 reply from worker 3: worker/3/{} saw {w1} q4", w[2]));
    f.wait_prefix("worker 1 silent: timeout=true");
    let random = f.wait_prefix("worker 1 random picked worker=");
    let picked = field(f.line(random), "worker").expect("id").to_owned();
    assert!(picked == "2" || picked == "3", "a random pick excludes the sender: {picked}");
    f.wait_line(&format!("note to=worker/{picked} from={w1} payload=from-1-random"));
    f.wait_line("worker 1 status rows=5");

    // A dead worker: its pending request fails, and new messages get a typed error.
    f.wait_line("check pending-request-dead-worker: error retryable=true worker 3 exited before replying");
    f.wait_line("check dead-worker: error retryable=true worker 3 is not running (backing off)");
    f.wait_line("check dead-worker-request: error retryable=true worker 3 is not running (backing off)");
}

#[test]
fn links_echo_frames_and_end_when_either_side_dies() {
    let mut f = Fixture::start(&["--workers", "2", "--links"]);
    let ready = f.ready();
    let one = f.wait_prefix("link worker=1 link=1 pong=1");
    let two = f.wait_prefix("link worker=1 link=2 pong=2");
    assert!(one < two);
    f.wait_line("agent link from worker=1 link=1");
    f.wait_line("agent link from worker=1 link=2");

    // The agent dies: the worker's links end.
    signal(ready.agent, Signal::SIGKILL);
    f.wait_line("link worker=1 link=1 closed");
    f.wait_line("link worker=1 link=2 closed");
    // A new link to the restarted agent echoes again.
    f.wait_line("link worker=1 link=3 pong=3");
    f.wait_line("link worker=1 reopened epoch=2");

    // The worker dies: the agent's end of its link ends.
    signal(ready.workers[0], Signal::SIGKILL);
    f.wait_line("agent link=3 ended");
}

/// A reader slower than its writer slows the writer down (link credit)
/// instead of losing the link: 20,000 frames sent flat out to a worker that
/// reads them in bursts with pauses all arrive, in order, on the same link,
/// and the sender's `send` had to wait for most of the reader's pauses.
#[test]
fn a_slow_link_reader_slows_its_sender_instead_of_losing_the_link() {
    let mut f = Fixture::start(&["--workers", "1", "--flood", "20000"]);
    f.ready();
    f.wait_line("agent link from worker=1 link=1");
    let received = f.wait_prefix("worker 1 flood ");
    let line = f.line(received).to_owned();
    assert!(line.starts_with("worker 1 flood received=20000 in_order=true "), "{line}");
    let paused_ms: u64 = field(&line, "paused_ms").expect("paused_ms").parse().expect("a number");
    let sent = f.wait_prefix("agent flood link=1 ");
    let line = f.line(sent).to_owned();
    assert!(line.starts_with("agent flood link=1 sent=20000 "), "{line}");
    let waits: u64 = field(&line, "waits").expect("waits").parse().expect("a number");
    let elapsed_ms: u64 = field(&line, "elapsed_ms").expect("elapsed_ms").parse().expect("a number");
    assert!(waits > 0, "the sender never waited: {line}");
    // The writer can only be a few windows ahead of the reader, so it finishes
    // after nearly all of the reader's pauses (200 of 10 ms).
    assert!(paused_ms >= 2000, "the reader did not pause: {paused_ms} ms");
    assert!(
        elapsed_ms * 10 >= paused_ms * 8,
        "the sender finished in {elapsed_ms} ms, the reader paused {paused_ms} ms"
    );
    f.wait_line("worker 1 flood link open after=true");
    assert_eq!(f.count(|l| l.contains("ended") || l.contains("closed") || l.contains("failed")), 0);
    let stderr = f.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let closes: Vec<&String> = stderr.iter().filter(|l| l.contains("closing")).collect();
    assert!(closes.is_empty(), "a link was closed: {closes:?}");
}

// ---- the default worker count: the CPUs the master may use -----------------

/// The CPUs in the calling thread's affinity mask.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero `cpu_set_t` is a valid empty set; the kernel writes
    // at most `size_of::<cpu_set_t>()` bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity: {}", std::io::Error::last_os_error());
    // SAFETY: every index is below CPU_SETSIZE, the set's size.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

/// Restricts the calling thread (or, before exec, the process) to `cpu` alone.
/// Async-signal-safe: a stack value and one system call.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as in `allowed_cpus`; `cpu` is one of the CPUs it returned.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn the_default_worker_count_follows_this_threads_cpu_affinity() {
    let allowed = allowed_cpus();
    let unpinned = tandem_cluster::default_workers();
    // A cgroup CPU quota may lower it further, never raise it.
    assert!((1..=allowed.len()).contains(&unpinned), "{unpinned} workers for CPUs {allowed:?}");
    assert_eq!(tandem_cluster::Config::default().worker_count(), unpinned);
    if allowed.len() < 2 {
        eprintln!("NOTE: this host lets the test use one CPU only ({allowed:?}): pinning cannot change the count");
    }
    // Affinity is per thread: a thread of the test's own, pinned to one CPU.
    let cpu = allowed[0];
    let counts = std::thread::spawn(move || {
        pin_to(cpu).expect("sched_setaffinity");
        let mut config = tandem_cluster::Config::default();
        let by_default = config.worker_count();
        config.workers = Some(3);
        (tandem_cluster::default_workers(), by_default, config.worker_count())
    })
    .join()
    .expect("the pinned thread");
    assert_eq!(counts, (1, 1, 3), "pinned to CPU {cpu}");
}

#[test]
fn a_master_pinned_to_one_cpu_starts_one_worker_by_default() {
    let allowed = allowed_cpus();
    if allowed.len() < 2 {
        eprintln!("NOTE: this host lets the test use one CPU only ({allowed:?}): one worker either way");
    }
    let cpu = allowed[0];
    let mut f = Fixture::start_with(&["--default-workers"], |command| {
        // SAFETY: between fork and exec the hook only calls `pin_to`: a stack
        // value and `sched_setaffinity`, async-signal-safe.
        unsafe { command.pre_exec(move || pin_to(cpu)) };
    });
    let ready = f.ready();
    assert_eq!(ready.workers.len(), 1, "{ready:?}");
    // The children inherit the mask.
    let status = std::fs::read_to_string(format!("/proc/{}/status", ready.workers[0])).expect("the worker's status");
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(str::trim);
    assert_eq!(list, Some(cpu.to_string().as_str()));
}

/// A cgroup v1 `cpu` group of its own with a CPU quota, removed when dropped
/// (once the processes in it are gone).
struct CpuQuota {
    dir: PathBuf,
    procs: std::ffi::CString,
}

impl CpuQuota {
    /// A group limited to `cpus` CPUs, or why it cannot be made here (not
    /// root, no writable cgroup v1 `cpu` hierarchy).
    fn new(cpus: u32) -> Result<CpuQuota, String> {
        let root = PathBuf::from("/sys/fs/cgroup/cpu");
        if !root.join("cpu.cfs_quota_us").exists() {
            return Err(format!("no cgroup v1 cpu controller at {}", root.display()));
        }
        let dir = root.join(format!("tandem-test-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let group = CpuQuota { procs: std::ffi::CString::new(format!("{}/cgroup.procs", dir.display())).unwrap(), dir };
        let write = |file: &str, value: String| {
            std::fs::write(group.dir.join(file), value).map_err(|e| format!("cannot set {file}: {e}"))
        };
        write("cpu.cfs_period_us", "100000".into())?;
        write("cpu.cfs_quota_us", (100_000 * cpus).to_string())?;
        Ok(group)
    }

    /// Moves the calling process into the group. Async-signal-safe (open, write, close).
    fn enter(procs: &std::ffi::CStr) -> std::io::Result<()> {
        // SAFETY: a NUL-terminated path and a 1-byte buffer that outlive the calls.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // The group can go once its last process is reaped.
        let until = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_master_under_a_one_cpu_cgroup_quota_starts_one_worker_by_default() {
    let allowed = allowed_cpus();
    if allowed.len() < 2 {
        eprintln!("NOTE: this host lets the test use one CPU only ({allowed:?}): one worker either way");
    }
    let quota = match CpuQuota::new(1) {
        Ok(quota) => quota,
        Err(why) => {
            eprintln!("SKIPPED: cannot set a CPU quota here ({why}); the cgroup part of the default count did not run");
            return;
        }
    };
    let procs = quota.procs.clone();
    // Dropped before `quota` (declared after it): the cluster is gone when the group is removed.
    let mut f = Fixture::start_with(&["--default-workers"], move |command| {
        // SAFETY: between fork and exec the hook only calls `CpuQuota::enter`:
        // open, write and close, async-signal-safe.
        unsafe { command.pre_exec(move || CpuQuota::enter(&procs)) };
    });
    let ready = f.ready();
    assert_eq!(ready.workers.len(), 1, "{ready:?}");
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", ready.workers[0])).expect("the worker's cgroup");
    let name = quota.dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(cgroup.lines().any(|l| l.contains(":cpu") && l.ends_with(&name)), "{cgroup}");
}
