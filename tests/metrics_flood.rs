//! The metrics endpoint cannot take the master's descriptors (issue 23, case
//! 3): the real `config_center` master at `ulimit -n 1024`, 2,000 idle TCP
//! connections held on `/metrics`. The connections over the cap are refused
//! (`503`, closed) and counted, the held ones are closed by the header
//! timeout, a scrape answers, `tandem status` answers, and a worker killed
//! meanwhile is respawned. Before the cap, the master's table filled: no
//! scrape, no `tandem status`, and the worker's slot failed with `EMFILE`.
//!
//! Each test gets its own `XDG_RUNTIME_DIR`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cli::{status_json, status_until};
use common::{Proc, example, field, private_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(30);
/// The master's open-file limit, as in the repro.
const MASTER_NOFILE: u64 = 1024;
/// The connections the flood holds.
const FLOOD: usize = 2000;
/// `Config::metrics_max_connections`' default at that limit.
const CAP: usize = 64;

/// GET /metrics over HTTP/1.0: (status line, body).
async fn scrape(addr: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.expect("send request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await; // a refusal may end in a reset
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

/// The value of the sample `name` (whatever its labels: every sample carries `cluster`).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        value.parse().ok()
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0)
}

/// Raises this process's soft open-file limit to the hard one, so that it can
/// hold the flood; returns the soft limit.
fn raise_own_nofile() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit; RLIMIT_NOFILE is a valid resource.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above; raising the soft limit up to the hard one is always allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_cur
}

#[tokio::test]
async fn two_thousand_idle_connections_on_metrics_leave_the_master_working() {
    tandem_testkit::within(TIMEOUT, flood()).await;
}

async fn flood() {
    let own = raise_own_nofile();
    assert!(own >= FLOOD as u64 + 200, "this test needs {} descriptors; the hard limit is {own}", FLOOD + 200);
    let xdg = private_dir();
    let name = "flood-it";
    let program = example("config_center");
    // The shell sets the limit and execs: the master keeps the pid.
    let script = format!("ulimit -n {MASTER_NOFILE} && exec \"$0\" \"$@\"");
    let mut cluster = Proc::spawn_with(
        Path::new("/bin/sh"),
        &["-c", &script, program.to_str().unwrap(), "--workers", "2", "--name", name, "--metrics", "127.0.0.1:0"],
        &[("XDG_RUNTIME_DIR", xdg.path().as_os_str())],
        true,
    );
    let metrics_line = cluster.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
    let addr = metrics_line.trim_start_matches("metrics on ").to_owned();
    let ready = cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
    let master: u32 = field(&ready, "master").unwrap().parse().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{master}/limits")).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(nofile.split_whitespace().nth(3), Some("1024"), "{nofile}");

    // The flood: every connection is accepted by the kernel; the master
    // serves CAP of them and refuses the rest at once.
    let mut held = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await {
            held.push(stream);
        }
    }
    assert!(held.len() >= FLOOD - 50, "only {} of {FLOOD} connections were made", held.len());
    let fds = open_fds(master);
    assert!(fds < 200, "the master holds {fds} descriptors during the flood (limit {MASTER_NOFILE})");

    // The master keeps working: the control socket answers, a killed worker comes back.
    let rows = status_json(xdg.path(), name).await;
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let victim = rows.iter().find(|r| r["role"] == "worker" && r["slot"] == 1).unwrap()["pid"].as_u64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    status_until(xdg.path(), name, STEP, "worker 1 respawned", |rows| {
        let w = rows.iter().find(|r| r["role"] == "worker" && r["slot"] == 1).unwrap();
        w["state"] == "online" && w["restarts"] == 1 && w["pid"].as_u64() != Some(victim)
    })
    .await;

    // Every held connection ends: refused at once (503), or served and closed
    // by the header timeout (5 s by default; connections made after the
    // first ones timed out took their slots): none is left hanging.
    let mut refused_seen = 0;
    for stream in &mut held {
        let mut first = [0u8; 12];
        let n = tokio::time::timeout(STEP, stream.read(&mut first)).await.expect("a held connection left hanging");
        match n {
            Ok(12) if &first == b"HTTP/1.1 503" => refused_seen += 1,
            Ok(0) | Err(_) => {} // closed without an answer: it sent no request
            Ok(n) => panic!("an answer to no request: {:?}", String::from_utf8_lossy(&first[..n])),
        }
    }
    let served = held.len() - refused_seen;
    assert!(served >= CAP && refused_seen >= held.len() / 2, "{refused_seen} of {} refused", held.len());

    // A scrape answers, with the refusals and timeouts counted.
    let deadline = tokio::time::Instant::now() + STEP;
    let text = loop {
        let (status, body) = scrape(&addr).await;
        if status.contains(" 200 ") {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no scrape answered 200; the last: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refused = sample(&text, "tandem_metrics_connections_refused_total").expect("refused counted");
    let timed_out = sample(&text, "tandem_metrics_connections_timed_out_total").expect("timeouts counted");
    assert!(refused >= refused_seen as f64, "refused {refused}, seen {refused_seen}:\n{text}");
    assert!(timed_out >= served as f64, "timed out {timed_out}, served {served}:\n{text}");
    assert_eq!(sample(&text, "tandem_metrics_connections_open"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "tandem_process_up{cluster=\"flood-it\",role=\"worker\",slot=\"1\"}"),
        Some(1.0),
        "{text}"
    );

    // The refusals are logged rate-limited: one WARN line per 10 s at most.
    let warned = cluster.drain().iter().filter(|l| l.contains("serving its limit of connections")).count();
    assert!((1..=3).contains(&warned), "{warned} WARN lines for {refused} refusals");
}

/// Issue 23, case 5: a round-robin worker out of descriptors. The real
/// `http_config` cluster in round-robin mode at `ulimit -n 256`, one worker;
/// 400 idle connections to its port: the worker keeps the first ones until its
/// table is full; each later one reaches it as a header without its
/// descriptor. Each is closed (the client sees the close, not a hang), counted
/// in the master's `tandem_round_robin_lost_total`, and logged rate-limited;
/// once the held connections close, the worker serves again.
#[tokio::test]
async fn a_round_robin_worker_out_of_descriptors_closes_what_it_cannot_receive() {
    tandem_testkit::within(TIMEOUT, round_robin_out_of_descriptors()).await;
}

async fn round_robin_out_of_descriptors() {
    const NOFILE: usize = 256;
    const CONNECTIONS: usize = 400;
    raise_own_nofile();
    let xdg = private_dir();
    let program = example("http_config");
    let script = format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\"");
    let args = [
        "-c",
        &script,
        program.to_str().unwrap(),
        "--mode",
        "round-robin",
        "--workers",
        "1",
        "--name",
        "rr-lost-it",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut cluster =
        Proc::spawn_with(Path::new("/bin/sh"), &args, &[("XDG_RUNTIME_DIR", xdg.path().as_os_str())], true);
    let listening = cluster.expect_line(STEP, |l| l.starts_with("listening on ")).await;
    let addr = listening.trim_start_matches("listening on ").to_owned();
    let metrics_line = cluster.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
    let metrics = metrics_line.trim_start_matches("metrics on ").to_owned();
    cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;

    let mut held = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        held.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    // The ones the worker could not receive are closed; the others stay open
    // (the worker holds them, idle). A closed one reads EOF or a reset. The
    // hand-offs go on while this looks, so both are measured again until they
    // agree (a connection found closed stays closed).
    let deadline = tokio::time::Instant::now() + STEP;
    let mut is_closed = vec![false; held.len()];
    let (closed, lost) = loop {
        for (stream, closed) in held.iter().zip(is_closed.iter_mut()).filter(|(_, c)| !**c) {
            let mut byte = [0u8; 1];
            match stream.try_read(&mut byte) {
                Ok(0) => *closed = true,
                Ok(_) => panic!("an answer to no request"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {} // still open: held by the worker
                Err(_) => *closed = true,
            }
        }
        let closed = is_closed.iter().filter(|c| **c).count();
        let text = scrape(&metrics).await.1;
        let lost = sample(&text, "tandem_round_robin_lost_total").unwrap_or(0.0) as usize;
        if (lost >= CONNECTIONS - NOFILE && closed == lost) || tokio::time::Instant::now() >= deadline {
            break (closed, lost);
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the master's counter, with a deadline
    };
    assert!(lost >= CONNECTIONS - NOFILE, "lost connections not counted: {lost}");
    assert_eq!(closed, lost, "each connection counted lost is closed, and only those");

    // Logged at WARN once, then at most once per 10 s; never per connection.
    let lines = cluster.drain().to_vec();
    let warned = lines.iter().filter(|l| l.contains("could not receive a handed-off connection")).count();
    assert!((1..=4).contains(&warned), "{warned} worker WARN lines for {lost} lost connections");
    let master_warned = lines.iter().filter(|l| l.contains("a worker could not receive a handed-off")).count();
    assert!((1..=4).contains(&master_warned), "{master_warned} master WARN lines for {lost} lost connections");
    assert!(!lines.iter().any(|l| l.contains("bad message on the descriptor channel")), "the old per-connection error");

    // Once the held connections close, the worker serves again.
    drop(held);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut stream = TcpStream::connect(&addr).await.expect("connect");
        stream.write_all(b"GET /config/app.greeting HTTP/1.0\r\n\r\n").await.expect("send");
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        if response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the worker does not serve again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
