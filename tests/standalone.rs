//! Standalone mode with real processes: the `standalone` example binary and a
//! real registry server.

mod common;

use std::time::Duration;

use common::{Proc, assert_in_order, example, field, poll_until, private_dir};
use tandem::registry::{RegistryClient, Server};

const TIMEOUT: Duration = Duration::from_secs(60);
const LINE: Duration = Duration::from_secs(10);

fn is_value(value: &str) -> impl Fn(&str) -> bool + '_ {
    move |line| is_stdout(line) && field(line, "value") == Some(value)
}

/// A line the example printed (not a log line of its stderr, when captured).
fn is_stdout(line: &str) -> bool {
    !line.starts_with("stderr: ")
}

/// A role line (`pid=.. role=.. epoch=..`) at `epoch`.
fn is_role_at(epoch: &str) -> impl Fn(&str) -> bool + '_ {
    move |line| is_stdout(line) && field(line, "epoch") == Some(epoch) && field(line, "key").is_none()
}

/// A registry, and `n` standalone processes electing under `name` in a
/// private directory: each said `epoch=1`, exactly one is the leader.
struct Group {
    _server: tandem::registry::ServerHandle,
    admin: RegistryClient,
    dir: tempfile::TempDir,
    args: Vec<String>,
    procs: Vec<Proc>,
    /// Where the leader is in `procs`.
    leader_at: usize,
    /// The processes log at INFO and their stderr lines join `seen` (`stderr: ...`).
    logged: bool,
}

impl Group {
    async fn start(name: &str, n: usize) -> Group {
        Group::start_with(name, n, false).await
    }

    /// [`start`](Self::start), with each process's INFO log lines captured.
    async fn start_logged(name: &str, n: usize) -> Group {
        Group::start_with(name, n, true).await
    }

    async fn start_with(name: &str, n: usize, logged: bool) -> Group {
        let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
        let addr = server.local_addr().to_string();
        let admin = RegistryClient::connect(addr.as_str()).await.unwrap();
        let dir = private_dir();
        let run_dir = dir.path().join("run").to_str().unwrap().to_owned();
        let args: Vec<String> =
            ["--name", name, "--dir", &run_dir, "--registry", &addr, "--subscribe", "k", "--write-every", "0"]
                .iter()
                .map(|a| a.to_string())
                .collect();
        let mut group = Group { _server: server, admin, dir, args, procs: Vec::new(), leader_at: 0, logged };
        group.procs = (0..n).map(|_| group.spawn()).collect();
        let mut leaders = Vec::new();
        for (i, proc) in group.procs.iter_mut().enumerate() {
            let line = proc
                .expect_line(LINE, |l| is_stdout(l) && field(l, "role").is_some() && field(l, "key").is_none())
                .await;
            assert_eq!(field(&line, "epoch"), Some("1"));
            if field(&line, "role") == Some("leader") {
                leaders.push(i);
            }
        }
        assert_eq!(leaders.len(), 1, "{leaders:?}");
        group.leader_at = leaders[0];
        group
    }

    /// One more process of the group.
    fn spawn(&self) -> Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        if self.logged {
            Proc::spawn_with(&example("standalone"), &args, &[("RUST_LOG", std::ffi::OsStr::new("info"))], true)
        } else {
            Proc::spawn(&example("standalone"), &args)
        }
    }
}

#[tokio::test]
async fn four_processes_share_one_connection_and_survive_the_leaders_death() {
    tokio::time::timeout(TIMEOUT, async {
        let mut group = Group::start("it", 4).await;
        let (admin, mut procs, leader_at) = (group.admin.clone(), std::mem::take(&mut group.procs), group.leader_at);

        // One put reaches every process; the registry saw ONE connection and ONE watch.
        admin.put("k", "v1").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("v1")).await;
        }
        let stats = admin.stats().await.unwrap();
        assert_eq!((stats.connections, stats.watches), (1, 1), "{stats:?}");

        // A late process gets the current value at once.
        let mut late = group.spawn();
        let line = late.expect_line(LINE, |l| field(l, "key").is_some()).await;
        assert_eq!(field(&line, "value"), Some("v1"), "the first value a late subscriber sees is the current one");
        drop(late);

        // Garbage on the leader's socket ends only that session.
        let socket = group.dir.path().join("run").join("it.sock");
        let mut garbage = tokio::net::UnixStream::connect(&socket).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut garbage, b"\xff\xff\xff\xffgarbage").await.unwrap();
        admin.put("k", "v2").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("v2")).await;
        }

        // kill -9 the leader: a survivor takes over with a higher epoch within 2 s.
        let leader = procs.remove(leader_at);
        leader.signal(nix::sys::signal::Signal::SIGKILL);
        drop(leader);
        let mut new_leaders = 0;
        for proc in &mut procs {
            let line = proc
                .expect_line(Duration::from_secs(2), |l| field(l, "epoch") == Some("2") && field(l, "key").is_none())
                .await;
            if field(&line, "role") == Some("leader") {
                new_leaders += 1;
            }
        }
        assert_eq!(new_leaders, 1);
        admin.put("k", "v3").await.unwrap();
        for proc in &mut procs {
            let line = proc.expect_line(LINE, is_value("v3")).await;
            assert_eq!(field(&line, "epoch"), Some("2"));
        }
        for proc in &procs {
            assert_in_order(&proc.seen, "pid");
        }
        // Still one upstream connection: the dead leader's closed, the new one's open.
        poll_until(LINE, "one registry connection", || async {
            admin.stats().await.map(|s| s.connections == 1 && s.watches == 1).unwrap_or(false)
        })
        .await;
    })
    .await
    .expect("test timed out")
}

/// Issue 23: a leader that hangs (SIGSTOP) keeps its lock, so its followers
/// take its place after their `peer_timeout` (5 s by default, plus a
/// heartbeat). Resumed, the old leader is fenced: it serves nothing more at
/// its epoch (not even to its own process, whose watch event arrived while it
/// was stopped), drops its upstream connection and follows the new leader.
/// Whether every thread of `pid` is stopped (state `T`), from `/proc`.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.filter_map(Result::ok).all(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|state| state == "T")
    })
}

#[tokio::test]
async fn a_hung_leader_is_replaced_and_resumed_never_serves_at_its_epoch() {
    tokio::time::timeout(TIMEOUT, async {
        let mut group = Group::start("hung", 3).await;
        let (admin, mut procs, leader_at) = (group.admin.clone(), std::mem::take(&mut group.procs), group.leader_at);
        admin.put("k", "v1").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("v1")).await;
        }

        // Stop the leader; a change arrives while it cannot run (its watch
        // event waits in its socket). SIGSTOP takes effect asynchronously:
        // wait until every thread of it is stopped before the change, or it
        // may still deliver v2 at epoch 1.
        let mut old = procs.remove(leader_at);
        old.signal(nix::sys::signal::Signal::SIGSTOP);
        let pid = old.pid;
        poll_until(LINE, "the leader stopped", || async move { all_threads_stopped(pid) }).await;
        let marks: Vec<usize> = procs
            .iter_mut()
            .map(|p| {
                p.drain();
                p.seen.len()
            })
            .collect();
        admin.put("k", "v2").await.unwrap();
        let stopped_at = std::time::Instant::now();
        let mut new_leaders = 0;
        for proc in &mut procs {
            let line = proc
                .expect_line(Duration::from_secs(12), |l| field(l, "epoch") == Some("2") && field(l, "key").is_none())
                .await;
            new_leaders += usize::from(field(&line, "role") == Some("leader"));
        }
        assert_eq!(new_leaders, 1, "exactly one follower took the hung leader's place");
        let replaced_in = stopped_at.elapsed();
        // The value and the role line may come in either order.
        for (proc, mark) in procs.iter_mut().zip(marks) {
            let already = proc.seen[mark..].iter().find(|l| is_value("v2")(l)).cloned();
            let line = match already {
                Some(line) => line,
                None => proc.expect_line(LINE, is_value("v2")).await,
            };
            assert_eq!(field(&line, "epoch"), Some("2"), "{line}");
        }

        // Resume it: it must step down before serving anything at epoch 1.
        old.drain();
        let resumed_from = old.seen.len();
        old.signal(nix::sys::signal::Signal::SIGCONT);
        let line = old.expect_line(LINE, |l| field(l, "epoch") == Some("2") && field(l, "key").is_none()).await;
        assert_eq!(field(&line, "role"), Some("follower"), "{line}");
        // Its upstream connection is gone: one connection (the new leader's) per host again.
        poll_until(LINE, "one registry connection", || async {
            admin.stats().await.map(|s| s.connections == 1 && s.watches == 1).unwrap_or(false)
        })
        .await;
        admin.put("k", "v3").await.unwrap();
        procs.push(old);
        for proc in &mut procs {
            let line = proc.expect_line(LINE, is_value("v3")).await;
            assert_eq!(field(&line, "epoch"), Some("2"), "{line}");
        }
        let old = procs.last().unwrap();
        let served_after_resume: Vec<&String> =
            old.seen[resumed_from..].iter().filter(|l| field(l, "epoch") == Some("1")).collect();
        assert!(served_after_resume.is_empty(), "served at the old epoch after resuming: {served_after_resume:#?}");
        for proc in &procs {
            assert_in_order(&proc.seen, "pid");
        }
        eprintln!("hung leader replaced in {replaced_in:?}");
    })
    .await
    .expect("test timed out")
}

/// Issue 25: a leader that steps down (SIGUSR2: `Connection::step_down`) hands
/// off: its followers log it at INFO with the old and the new epoch, never
/// `WARN lost the leader`; the next process leads at epoch + 1 at once, values
/// flow on in order, and the old process follows it. A leader that is stopped
/// (SIGTERM: `close`) hands off the same way and exits 0.
#[tokio::test]
async fn a_leader_that_steps_down_hands_off_without_a_fault() {
    tokio::time::timeout(TIMEOUT, async {
        let mut group = Group::start_logged("handoff", 3).await;
        let (admin, mut procs, leader_at) = (group.admin.clone(), std::mem::take(&mut group.procs), group.leader_at);
        admin.put("k", "v1").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("v1")).await;
        }
        for proc in &mut procs {
            proc.drain();
        }
        let marks: Vec<usize> = procs.iter().map(|p| p.seen.len()).collect();

        // Step down: every process (the old leader too) sees epoch 2 within 2 s; the new leader is another process.
        procs[leader_at].signal(nix::sys::signal::Signal::SIGUSR2);
        let stepped_at = std::time::Instant::now();
        procs[leader_at].expect_line(LINE, |l| is_stdout(l) && field(l, "stepped_down") == Some("yes")).await;
        let mut new_leader = None;
        for (i, proc) in procs.iter_mut().enumerate() {
            let line = proc.expect_line(Duration::from_secs(2), is_role_at("2")).await;
            if field(&line, "role") == Some("leader") {
                assert!(new_leader.replace(i).is_none(), "two leaders at epoch 2");
            }
        }
        let handed_off_in = stepped_at.elapsed();
        let new_leader = new_leader.expect("a leader at epoch 2");
        assert_ne!(new_leader, leader_at, "the process that stepped down left the lead to another");

        admin.put("k", "v2").await.unwrap();
        for proc in &mut procs {
            let line = proc.expect_line(LINE, is_value("v2")).await;
            assert_eq!(field(&line, "epoch"), Some("2"), "{line}");
        }
        // The old leader's upstream connection went with it: one per host.
        poll_until(LINE, "one registry connection", || async {
            admin.stats().await.map(|s| s.connections == 1 && s.watches == 1).unwrap_or(false)
        })
        .await;

        for (i, proc) in procs.iter_mut().enumerate() {
            proc.drain();
            let since = &proc.seen[marks[i]..];
            if i != leader_at {
                expect_logged(since, "INFO", &["the leader handed off", "epoch=1"]);
            }
            expect_logged(
                since,
                "INFO",
                &["following the new leader after the hand-off", "epoch.previous=1", "epoch=2"],
            );
            expect_no_fault(since);
            assert_in_order(&proc.seen, "pid");
        }

        // SIGTERM the new leader: it closes, which hands off too, and exits 0.
        let marks: Vec<usize> = procs.iter().map(|p| p.seen.len()).collect();
        let mut stopped = procs.remove(new_leader);
        stopped.signal(nix::sys::signal::Signal::SIGTERM);
        let status = stopped.finish(LINE).await;
        assert!(status.success(), "{status:?}");
        expect_logged(&stopped.seen, "INFO", &["stepping down", "epoch=2"]);
        let marks: Vec<usize> = marks.iter().enumerate().filter(|(i, _)| *i != new_leader).map(|(_, m)| *m).collect();
        let mut leaders = 0;
        for proc in &mut procs {
            let line = proc.expect_line(Duration::from_secs(2), is_role_at("3")).await;
            leaders += usize::from(field(&line, "role") == Some("leader"));
        }
        assert_eq!(leaders, 1);
        admin.put("k", "v3").await.unwrap();
        for (i, proc) in procs.iter_mut().enumerate() {
            let line = proc.expect_line(LINE, is_value("v3")).await;
            assert_eq!(field(&line, "epoch"), Some("3"), "{line}");
            proc.drain();
            let since = &proc.seen[marks[i]..];
            expect_logged(since, "INFO", &["the leader handed off", "epoch=2"]);
            expect_no_fault(since);
            assert_in_order(&proc.seen, "pid");
        }
        eprintln!("handed off in {handed_off_in:?}");
    })
    .await
    .expect("test timed out")
}

/// Issue 26: a hot standby. One follower of the group holds the standby lock
/// and mirrors the leader (no upstream connection: the registry still counts
/// one). kill -9 the leader: the standby leads at epoch + 1 at once, seeded
/// from its mirror, every process gets the next value, nothing twice or
/// backwards (the value they had is not delivered again at the new epoch),
/// one registry connection after, and a new standby is elected among the
/// followers.
#[tokio::test]
async fn the_hot_standby_takes_over_a_killed_leader_warm() {
    tokio::time::timeout(TIMEOUT, async {
        let mut group = Group::start_logged("standby", 4).await;
        let (admin, mut procs, leader_at) = (group.admin.clone(), std::mem::take(&mut group.procs), group.leader_at);
        let is_standby_line = |l: &str| !is_stdout(l) && l.contains("this process is the hot standby");
        // A follower takes the standby place (at its connect, or at its next heartbeat).
        let standbys = |procs: &mut Vec<Proc>| -> Vec<usize> {
            (0..procs.len())
                .filter(|&i| {
                    procs[i].drain();
                    i != leader_at && procs[i].seen.iter().any(|l| is_standby_line(l))
                })
                .collect()
        };
        poll_until(LINE, "a standby", || {
            let found = !standbys(&mut procs).is_empty();
            async move { found }
        })
        .await;
        let standby = standbys(&mut procs);
        assert_eq!(standby.len(), 1, "exactly one follower is the standby");
        let standby_at = standby[0];
        poll_until(LINE, "the standby's mirror synced", || {
            procs[standby_at].drain();
            let synced = procs[standby_at].seen.iter().any(|l| l.contains("mirror synced"));
            async move { synced }
        })
        .await;

        admin.put("k", "v1").await.unwrap();
        for proc in &mut procs {
            proc.expect_line(LINE, is_value("v1")).await;
        }
        // Mirroring is no upstream connection.
        let stats = admin.stats().await.unwrap();
        assert_eq!((stats.connections, stats.watches), (1, 1), "{stats:?}");
        for proc in &mut procs {
            proc.drain();
        }
        let marks: Vec<usize> = procs.iter().map(|p| p.seen.len()).collect();

        let leader = procs.remove(leader_at);
        let standby_at = if standby_at > leader_at { standby_at - 1 } else { standby_at };
        let marks: Vec<usize> = marks.iter().enumerate().filter(|(i, _)| *i != leader_at).map(|(_, m)| *m).collect();
        leader.signal(nix::sys::signal::Signal::SIGKILL);
        let killed_at = std::time::Instant::now();
        drop(leader);
        for (i, proc) in procs.iter_mut().enumerate() {
            let line = proc.expect_line(Duration::from_secs(2), is_role_at("2")).await;
            let role = if i == standby_at { "leader" } else { "follower" };
            assert_eq!(field(&line, "role"), Some(role), "the standby leads at epoch 2: {line}");
        }
        let took_over_in = killed_at.elapsed();
        procs[standby_at].drain();
        let took_over = procs[standby_at].seen[marks[standby_at]..]
            .iter()
            .any(|l| l.contains("the standby took over") && field(l, "keys") == Some("1"));
        assert!(took_over, "the standby served its mirrored key: {:#?}", procs[standby_at].seen);

        admin.put("k", "v2").await.unwrap();
        for proc in &mut procs {
            let line = proc.expect_line(LINE, is_value("v2")).await;
            assert_eq!(field(&line, "epoch"), Some("2"), "{line}");
        }
        poll_until(LINE, "one registry connection", || async {
            admin.stats().await.map(|s| s.connections == 1 && s.watches == 1).unwrap_or(false)
        })
        .await;
        // A new standby among the followers.
        poll_until(LINE, "a new standby", || {
            let found = procs.iter_mut().enumerate().any(|(i, proc)| {
                proc.drain();
                i != standby_at && proc.seen[marks[i]..].iter().any(|l| is_standby_line(l))
            });
            async move { found }
        })
        .await;
        for (i, proc) in procs.iter_mut().enumerate() {
            proc.drain();
            let repeated: Vec<&String> =
                proc.seen[marks[i]..].iter().filter(|l| is_stdout(l) && field(l, "value") == Some("v1")).collect();
            assert!(repeated.is_empty(), "v1 delivered again after the takeover: {repeated:#?}");
            assert_in_order(&proc.seen, "pid");
        }
        eprintln!("the standby took over in {took_over_in:?}");
    })
    .await
    .expect("test timed out")
}

/// One of `lines` is a log line at `level` with every one of `parts`.
fn expect_logged(lines: &[String], level: &str, parts: &[&str]) {
    let found = lines.iter().any(|l| !is_stdout(l) && l.contains(level) && parts.iter().all(|p| l.contains(p)));
    assert!(found, "no {level} line with {parts:?} in {lines:#?}");
}

/// No WARN or ERROR line: a hand-off is no fault.
fn expect_no_fault(lines: &[String]) {
    let faults: Vec<&String> =
        lines.iter().filter(|l| !is_stdout(l) && (l.contains("WARN") || l.contains("ERROR"))).collect();
    assert!(faults.is_empty(), "a hand-off logged as a fault: {faults:#?}");
}
