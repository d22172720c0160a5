//! Workers serving one port: the real `http_config` example (master, agent,
//! workers) under HTTP load on new connections, through reloads, a broken
//! executable, `kill -9` and the memory limit.

mod common;
#[path = "common/http_load.rs"]
mod http_load;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Proc, example, field, poll_until};
use http_load::{Load, Seen, get};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(120);
const LINE: Duration = Duration::from_secs(30);
/// Concurrent clients of the load loops.
const CLIENTS: usize = 4;
/// The load loops: each request on a new connection.
const LOAD: http_load::Config = http_load::Config {
    clients: CLIENTS,
    max_requests: 200_000,
    path: "/config/app.greeting",
    per_connection: Some(1),
};

struct Cluster {
    master: Proc,
    addr: String,
    workers: Vec<u32>,
}

async fn start(program: &Path, extra: &[&str]) -> Cluster {
    let mut args = if extra.contains(&"--workers") { vec![] } else { vec!["--workers", "3"] };
    args.extend_from_slice(extra);
    let mut master = Proc::spawn(program, &args);
    let listening = master.expect_line(LINE, |l| l.starts_with("listening on ")).await;
    let addr = listening.trim_start_matches("listening on ").to_owned();
    let ready = master.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
    let workers = pids(field(&ready, "workers").unwrap());
    Cluster { master, addr, workers }
}

fn pids(list: &str) -> Vec<u32> {
    list.split(',').map(|p| p.parse().unwrap()).collect()
}

async fn assert_clean(seen: &Seen) {
    let failed = seen.failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "failed requests: {:?}", seen.errors.lock().await);
}

async fn every_worker_serves(mode: &str) {
    let mut c = start(&example("http_config"), &["--mode", mode]).await;
    let expected: HashSet<u32> = c.workers.iter().copied().collect();
    let mut served = HashSet::new();
    let mut requests = 0;
    while served != expected {
        assert!(requests < 3000, "{mode}: after {requests} requests only {served:?} of {expected:?} answered");
        let answer = get(&c.addr, "/config/app.greeting").await.unwrap();
        assert_eq!(answer.status, 200);
        served.insert(answer.pid.expect("x-worker-pid"));
        requests += 1;
    }
    // And under concurrent load, nothing fails.
    let load = Load::start(&c.addr, LOAD);
    load.more(300).await;
    let seen = load.finish().await;
    assert_clean(&seen).await;
    c.master.signal(Signal::SIGTERM);
    assert!(c.master.wait(LINE).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reuseport_mode_serves_from_every_worker() {
    tokio::time::timeout(TIMEOUT, every_worker_serves("reuseport")).await.expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_mode_serves_from_every_worker() {
    tokio::time::timeout(TIMEOUT, every_worker_serves("shared")).await.expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unix_socket_listener_serves_from_every_worker_and_is_removed_at_exit() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = common::private_dir();
        let path = dir.path().join("http.sock");
        let listen = format!("unix:{}", path.display());
        let mut c = start(&example("http_config"), &["--listen", &listen]).await;
        assert_eq!(c.addr, listen);
        let expected: HashSet<u32> = c.workers.iter().copied().collect();
        let mut served = HashSet::new();
        for _ in 0..3000 {
            let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
            stream
                .write_all(b"GET /config/app.greeting HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            assert!(response.ends_with("hello"), "{response}");
            let pid = response.lines().find_map(|l| l.strip_prefix("x-worker-pid: ")).unwrap();
            served.insert(pid.trim().parse().unwrap());
            if served == expected {
                break;
            }
        }
        assert_eq!(served, expected);
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
        assert!(!path.exists(), "the master removes its socket file");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_mode_serves_from_every_worker() {
    tokio::time::timeout(TIMEOUT, every_worker_serves("round-robin")).await.expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_load_fails_no_request_and_replaces_every_worker_reuseport() {
    reload_under_load("reuseport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_load_fails_no_request_and_replaces_every_worker_shared() {
    reload_under_load("shared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_load_fails_no_request_and_replaces_every_worker_round_robin() {
    reload_under_load("round-robin").await;
}

async fn reload_under_load(mode: &str) {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--mode", mode]).await;
        let load = Load::start(&c.addr, LOAD);
        load.more(200).await;
        c.master.signal(Signal::SIGHUP);
        let done =
            c.master.expect_line(LINE, |l| l.starts_with("reload done:") || l.starts_with("reload failed:")).await;
        assert!(done.starts_with("reload done:"), "{done}");
        let new = pids(field(&done, "workers").unwrap());
        assert_eq!(new.len(), c.workers.len());
        assert!(new.iter().all(|p| !c.workers.contains(p)), "old {:?} new {new:?}", c.workers);
        for id in 1..=3 {
            let line = format!("worker={id} ");
            assert!(
                c.master.seen.iter().any(|l| l.starts_with("worker replaced:") && l.contains(&line)),
                "{:#?}",
                c.master.seen
            );
        }
        load.seen.mark().await;
        load.more(200).await;
        let seen = load.finish().await;
        assert_clean(&seen).await;
        let after = seen.pids_after_mark.lock().await.clone();
        assert!(after.iter().all(|p| new.contains(p)), "answered by {after:?} after the reload; new workers {new:?}");
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_onto_a_broken_executable_is_rolled_back_and_the_old_workers_keep_serving() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = common::private_dir();
        let program = dir.path().join("http_config");
        std::fs::copy(example("http_config"), &program).unwrap();
        let mut c = start(&program, &[]).await;
        // Deploy a "new version" that exits at once: replaced on disk (rename,
        // as a deploy does; the running file is not modified).
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::rename(&broken, &program).unwrap();

        let load = Load::start(&c.addr, LOAD);
        load.more(200).await;
        c.master.signal(Signal::SIGHUP);
        let done =
            c.master.expect_line(LINE, |l| l.starts_with("reload done:") || l.starts_with("reload failed:")).await;
        assert!(done.starts_with("reload failed:") && done.contains("exited with code 3"), "{done}");
        load.seen.mark().await;
        load.more(300).await;
        let seen = load.finish().await;
        assert_clean(&seen).await;
        let after = seen.pids_after_mark.lock().await.clone();
        let old: HashSet<u32> = c.workers.iter().copied().collect();
        assert_eq!(after, old, "the old workers (all of them) still serve");
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_asked_for_while_one_runs_is_reported_not_queued() {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--ready-delay-ms", "500"]).await;
        c.master.signal(Signal::SIGHUP);
        c.master.expect_line(LINE, |l| l.starts_with("reload started:")).await;
        c.master.signal(Signal::SIGHUP);
        let refused = c.master.expect_line(LINE, |l| l.starts_with("reload failed:")).await;
        assert!(refused.contains("already running"), "{refused}");
        c.master.expect_line(LINE, |l| l.starts_with("reload done:")).await;
        let starts = c.master.seen.iter().filter(|l| l.starts_with("reload started:")).count();
        assert_eq!(starts, 1, "the second request did not start a reload: {:#?}", c.master.seen);
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_whose_new_worker_is_not_ready_in_time_is_rolled_back() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = common::private_dir();
        let hang = dir.path().join("hang");
        let hang_arg = hang.to_str().unwrap().to_owned();
        let mut c = start(&example("http_config"), &["--ready-timeout", "2", "--hang-if-exists", &hang_arg]).await;
        std::fs::write(&hang, "").unwrap(); // from now on, new workers never report ready
        let load = Load::start(&c.addr, LOAD);
        load.more(100).await;
        c.master.signal(Signal::SIGHUP);
        let done =
            c.master.expect_line(LINE, |l| l.starts_with("reload done:") || l.starts_with("reload failed:")).await;
        assert!(done.starts_with("reload failed:") && done.contains("was not ready within 2s"), "{done}");
        load.seen.mark().await;
        load.more(200).await;
        let seen = load.finish().await;
        assert_clean(&seen).await;
        let old: HashSet<u32> = c.workers.iter().copied().collect();
        assert_eq!(*seen.pids_after_mark.lock().await, old, "the old workers (all of them) still serve");
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_over_its_memory_limit_again_soon_after_start_is_replaced_after_a_backoff() {
    tokio::time::timeout(TIMEOUT, async {
        // 1 MiB: every worker is over it from the start.
        let mut c = start(&example("http_config"), &["--workers", "1", "--max-memory", "1"]).await;
        let first = c.master.expect_line(LINE, |l| l.starts_with("worker replaced:")).await;
        assert!(first.ends_with("reason=max-memory"), "{first}");
        let scheduled = c.master.expect_line(LINE, |l| l.starts_with("restart scheduled: worker=1 ")).await;
        assert_eq!(field(&scheduled, "failures"), Some("2"), "{scheduled}");
        let delay: u64 = field(&scheduled, "in_ms").unwrap().parse().unwrap();
        assert!(delay > 0, "{scheduled}");
        // The next one backs off longer.
        let scheduled = c.master.expect_line(LINE, |l| l.starts_with("restart scheduled: worker=1 ")).await;
        assert_eq!(field(&scheduled, "failures"), Some("3"), "{scheduled}");
        let next: u64 = field(&scheduled, "in_ms").unwrap().parse().unwrap();
        assert!(next > delay, "{next} after {delay}");
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_onto_an_executable_of_another_ipc_version_is_refused_and_rolled_back() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = common::private_dir();
        let program = dir.path().join("http_config");
        std::fs::copy(example("http_config"), &program).unwrap();
        let mut c = start(&program, &[]).await;
        // The "new version": the same binary, told by its environment that its
        // master speaks another IPC version (as a master of another build would).
        let real = dir.path().join("http_config.real");
        std::fs::hard_link(&program, &real).unwrap();
        let wrapper = dir.path().join("wrapper");
        let script = format!("#!/bin/sh\nTANDEM_IPC_VERSION=999 exec {} \"$@\"\n", real.display());
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::rename(&wrapper, &program).unwrap();
        let load = Load::start(&c.addr, LOAD);
        load.more(100).await;
        c.master.signal(Signal::SIGHUP);
        let done =
            c.master.expect_line(LINE, |l| l.starts_with("reload done:") || l.starts_with("reload failed:")).await;
        assert!(done.contains("another IPC version"), "{done}");
        load.seen.mark().await;
        load.more(200).await;
        let seen = load.finish().await;
        assert_clean(&seen).await;
        let old: HashSet<u32> = c.workers.iter().copied().collect();
        assert_eq!(*seen.pids_after_mark.lock().await, old);
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_over_its_memory_limit_is_restarted_while_the_workers_keep_serving() {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--agent-max-memory", "1"]).await;
        let load = Load::start(&c.addr, LOAD);
        let over = c.master.expect_line(LINE, |l| l.starts_with("memory limit: agent ")).await;
        assert!(over.contains("limit_mib=1.0"), "{over}");
        let restarted = c.master.expect_line(LINE, |l| l.starts_with("agent restarted:")).await;
        assert_eq!(field(&restarted, "epoch"), Some("2"), "{restarted}");
        load.more(200).await;
        let seen = load.finish().await;
        assert_clean(&seen).await;
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reload_api_reports_the_outcome_and_refuses_a_concurrent_call() {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--api-reloads", "2"]).await;
        let first = c.master.expect_line(LINE, |l| l.starts_with("api reload:")).await;
        let second = c.master.expect_line(LINE, |l| l.starts_with("api reload:")).await;
        let (ok, refused) = if first.contains(": ok ") { (first, second) } else { (second, first) };
        assert!(refused.contains("error: a reload is already running"), "{refused}");
        assert_eq!(field(&ok, "replaced"), Some("3"), "{ok}");
        let new = pids(field(&ok, "workers").unwrap());
        assert!(new.iter().all(|p| !c.workers.contains(p)), "old {:?} new {new:?}", c.workers);
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_follows_a_flipped_symlink_to_the_new_executable() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = common::private_dir();
        let v1 = dir.path().join("v1");
        std::fs::copy(example("http_config"), &v1).unwrap();
        let v2 = dir.path().join("v2");
        std::fs::write(&v2, "#!/bin/sh\nexit 4\n").unwrap();
        std::fs::set_permissions(&v2, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let current = dir.path().join("current");
        std::os::unix::fs::symlink(&v1, &current).unwrap();
        let mut c = start(&current, &[]).await;
        // Deploy v2 by flipping the symlink (atomically, by rename).
        let next = dir.path().join("next");
        std::os::unix::fs::symlink(&v2, &next).unwrap();
        std::fs::rename(&next, &current).unwrap();
        c.master.signal(Signal::SIGHUP);
        let done =
            c.master.expect_line(LINE, |l| l.starts_with("reload done:") || l.starts_with("reload failed:")).await;
        assert!(done.contains("exited with code 4"), "v2 was started: {done}");
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

/// The inodes of the sockets a process holds.
fn socket_inodes(pid: u32) -> HashSet<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return HashSet::new() };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:").map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_kill_9_of_a_worker_fails_at_most_its_in_flight_requests() {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--mode", "round-robin"]).await;
        let load = Load::start(&c.addr, LOAD);
        load.more(200).await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.workers[1] as i32), Signal::SIGKILL).unwrap();
        let restarted = c.master.expect_line(LINE, |l| l.starts_with("worker restarted: worker=2 ")).await;
        let new: u32 = field(&restarted, "pid").unwrap().parse().unwrap();
        load.seen.mark().await;
        poll_until(LINE, "the restarted worker answering", || async {
            load.seen.pids_after_mark.lock().await.contains(&new)
        })
        .await;
        let seen = load.finish().await;
        let failed = seen.failed.load(Ordering::Relaxed);
        assert!(
            failed <= CLIENTS as u64,
            "{failed} failed requests, more than the {CLIENTS} that could be in flight: {:?}",
            seen.errors.lock().await
        );
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_fails_at_most_its_in_flight_requests_and_its_slot_keeps_its_socket() {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--mode", "reuseport"]).await;
        let victim = c.workers[0];
        // The slot's listening socket: held by the victim and by the master.
        let master_sockets = socket_inodes(c.master.pid as u32);
        let slot_sockets: HashSet<String> =
            socket_inodes(victim).intersection(&master_sockets).cloned().collect::<HashSet<_>>();
        assert!(!slot_sockets.is_empty(), "the worker holds a socket the master keeps");
        let load = Load::start(&c.addr, LOAD);
        load.more(200).await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        let restarted = c.master.expect_line(LINE, |l| l.starts_with("worker restarted: worker=1 ")).await;
        let new: u32 = field(&restarted, "pid").unwrap().parse().unwrap();
        assert!(
            slot_sockets.iter().all(|s| socket_inodes(new).contains(s)),
            "the restarted worker got the slot's socket back"
        );
        load.seen.mark().await;
        let answered_by_new = async {
            poll_until(LINE, "the restarted worker answering", || async {
                load.seen.pids_after_mark.lock().await.contains(&new)
            })
            .await
        };
        answered_by_new.await;
        let seen = load.finish().await;
        let failed = seen.failed.load(Ordering::Relaxed);
        assert!(
            failed <= CLIENTS as u64,
            "{failed} failed requests, more than the {CLIENTS} that could be in flight: {:?}",
            seen.errors.lock().await
        );
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_over_its_memory_limit_is_replaced_without_failing_a_request() {
    tokio::time::timeout(TIMEOUT, async {
        let mut c = start(&example("http_config"), &["--max-memory", "96", "--debug-endpoints"]).await;
        let load = Load::start(&c.addr, LOAD);
        load.more(100).await;
        let answer = get(&c.addr, "/debug/alloc/128").await.unwrap();
        assert_eq!(answer.status, 200);
        let fat = answer.pid.unwrap();
        let replaced = c
            .master
            .expect_line(LINE, |l| l.starts_with("worker replaced:") && l.contains(&format!(" old={fat} ")))
            .await;
        assert!(replaced.ends_with("reason=max-memory"), "{replaced}");
        let new: u32 = field(&replaced, "new").unwrap().parse().unwrap();
        poll_until(LINE, "the fat worker gone", || async { !common::alive(fat as i32) }).await;
        load.seen.mark().await;
        poll_until(LINE, "the new worker answering", || async {
            load.seen.pids_after_mark.lock().await.contains(&new)
        })
        .await;
        let seen = load.finish().await;
        assert_clean(&seen).await;
        c.master.signal(Signal::SIGTERM);
        assert!(c.master.wait(LINE).await.success());
    })
    .await
    .expect("test timed out");
}
