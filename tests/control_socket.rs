//! The master's control socket against hostile and unlucky clients (issue
//! 23), with the real `config_center` example and the real `tandem` binary:
//! 16 clients sending 4 MiB lines cost the master little, a client that does
//! not read its answers loses its slot, a refused `tandem` prints the
//! master's refusal and exits 3, and `tandem ls` shows a master that does not
//! answer instead of hiding it.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cli::{stderr, stdout, tandem};
use common::{Proc, example, field, poll_until, private_dir};
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);
/// `tandem_cluster::control::WRITE_TIMEOUT`.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// `tandem_cluster::control::LIST_TIMEOUT`.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// What a refused `tandem` prints.
const BUSY: &str = "tandem: the master is serving its limit of 16 control connections; try again\n";
/// The CLI's exit code for it.
const EXIT_BUSY: i32 = 3;

/// A running `config_center` cluster named `name` with one worker, in its own
/// runtime dir; the master's stderr joins its lines when `logs`.
struct Cluster {
    proc: Proc,
    master: i32,
    socket: PathBuf,
    xdg: tempfile::TempDir,
}

async fn start(name: &str, logs: bool) -> Cluster {
    let xdg = private_dir();
    let mut proc = Proc::spawn_with(
        &example("config_center"),
        &["--workers", "1", "--name", name],
        &[("XDG_RUNTIME_DIR", xdg.path().as_os_str())],
        logs,
    );
    let ready = proc.expect_line(STEP, |l| l.contains("cluster ready:")).await;
    let master = field(ready.trim_start_matches("stderr: "), "master").unwrap().parse().unwrap();
    let socket = xdg.path().join("tandem").join(name).join("control.sock");
    Cluster { proc, master, socket, xdg }
}

/// The resident set of `pid`, in bytes (`VmRSS`).
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the master's /proc status");
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().expect("VmRSS in kB") * 1024
}

/// Samples `rss(pid)` until dropped; `peak()` is the largest seen.
struct RssPeak {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn watch(pid: i32) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let seen = Arc::clone(&peak);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(5));
            loop {
                every.tick().await;
                seen.fetch_max(rss(pid), Ordering::Relaxed);
            }
        });
        RssPeak { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resumes a stopped process when dropped (declared after its [`Proc`], so
/// it is dropped first and the Proc's SIGTERM is handled).
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// Everything the master wrote to `stream` until it closed it (a reset after
/// the lines it left counts as the end).
async fn read_all(stream: &mut UnixStream) -> String {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut bytes)).await.expect("the master closed the connection");
    String::from_utf8(bytes).expect("UTF-8 answers")
}

/// The repro of issue 23: 16 same-user clients each send one 4 MiB line of
/// `\x01` (half of them without its newline) and do not read. The master
/// used to read each line whole and build a ~55 MB answer echoing it: 870 MB,
/// and `tandem` locked out for 75 s. Now it reads at most a few KiB of each,
/// answers a short error, closes, and stays small; `tandem` gets in at once.
#[tokio::test]
async fn sixteen_clients_sending_4_mib_lines_cost_the_master_little() {
    tokio::time::timeout(TIMEOUT, async {
        let cluster = start("flood-it", false).await;
        let before = rss(cluster.master);
        let peak = RssPeak::watch(cluster.master);

        let mut writers = Vec::new();
        for i in 0..16 {
            let mut stream = UnixStream::connect(&cluster.socket).await.expect("connect");
            writers.push(tokio::spawn(async move {
                let mut line = vec![1u8; 4 * 1024 * 1024];
                if i % 2 == 0 {
                    line.push(b'\n');
                }
                // The master stops reading after a few KiB and closes: this
                // write is cut short (EPIPE or ECONNRESET), as it should.
                let _ = stream.write_all(&line).await;
                stream
            }));
        }
        let mut hostile = Vec::new();
        for writer in writers {
            hostile.push(tokio::time::timeout(STEP, writer).await.expect("a 4 MiB write hung").unwrap());
        }

        // While the 16 still hold their sockets (unread), tandem gets in.
        let xdg = cluster.xdg.path().to_owned();
        poll_until(STEP, "tandem status to succeed during the flood", || async {
            tandem(&xdg, &["status", "flood-it", "--json"]).await.status.success()
        })
        .await;
        let peak = peak.peak();
        eprintln!("master VmRSS before {before} B, peak during the flood {peak} B");
        assert!(peak < 64 * 1024 * 1024, "the master grew from {before} to {peak} bytes");

        // Each got one short error naming the limit, then the end.
        for stream in &mut hostile {
            let answer = read_all(stream).await;
            assert!(answer.len() < 1024 && answer.ends_with('\n'), "{} bytes: {answer}", answer.len());
            assert_eq!(answer.lines().count(), 1, "{answer}");
            let answer: Value = serde_json::from_str(answer.trim_end()).expect("a JSON answer");
            assert_eq!(answer["ok"], false, "{answer}");
            let prefix = "\u{1}".repeat(64);
            assert_eq!(
                answer["error"].as_str(),
                Some(
                    format!("bad request: the line is longer than 4096 bytes (the limit), starting {prefix:?}...")
                        .as_str()
                ),
            );
        }

        // A bad line under the limit: its length and first 64 bytes echoed.
        let mut stream = UnixStream::connect(&cluster.socket).await.expect("connect");
        stream.write_all(&[[1u8; 1000].as_slice(), b"\n"].concat()).await.unwrap();
        let mut answer = String::new();
        let mut reader = tokio::io::BufReader::new(&mut stream);
        tokio::time::timeout(STEP, tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
        assert_eq!(
            answer["error"].as_str().unwrap(),
            format!(
                "bad request (1000 bytes, starting {:?}...): expected value at line 1 column 1; expected \
                 {{\"cmd\":\"info|status|leader|reload|reload_agent|scale|restart|restart_agent|stop\"}}",
                "\u{1}".repeat(64)
            )
        );
    })
    .await
    .expect("test timed out")
}

/// 16 clients each send 3,000 `info` requests and never read the answers:
/// once a socket's buffers are full the master's write to it stalls. The
/// CLI is refused (exit 3, the master's words) while they hold every slot,
/// and gets in once their answers have gone unread for `WRITE_TIMEOUT`.
#[tokio::test]
async fn a_client_that_does_not_read_its_answers_loses_its_slot() {
    tokio::time::timeout(TIMEOUT, async {
        let mut cluster = start("slow-it", true).await;
        let requests = "{\"cmd\":\"info\"}\n".repeat(3000);
        let mut hostile = Vec::new();
        for _ in 0..16 {
            let mut stream = UnixStream::connect(&cluster.socket).await.expect("connect");
            stream.write_all(requests.as_bytes()).await.expect("requests sent");
            hostile.push(stream);
        }

        let xdg = cluster.xdg.path().to_owned();
        poll_until(STEP, "tandem status to be refused", || async {
            let out = tandem(&xdg, &["status", "slow-it"]).await;
            out.status.code() == Some(EXIT_BUSY) && stderr(&out) == BUSY && stdout(&out).is_empty()
        })
        .await;
        let refused = Instant::now();
        poll_until(WRITE_TIMEOUT + STEP, "tandem status to get in again", || async {
            tandem(&xdg, &["status", "slow-it"]).await.status.success()
        })
        .await;
        let took = refused.elapsed();
        assert!(took < WRITE_TIMEOUT + Duration::from_secs(5), "slots freed {took:?} after the refusal");

        // Each got some answers, not all 3,000: the master gave up on it.
        for stream in &mut hostile {
            let answers = read_all(stream).await;
            let count = answers.lines().count();
            assert!((1..3000).contains(&count), "{count} answers");
            for line in answers.lines() {
                let info: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                assert_eq!(info["result"]["name"], "slow-it", "{line}");
            }
        }
        let warning = cluster.proc.expect_line(STEP, |l| l.contains("did not read its answer in time")).await;
        assert!(warning.contains("WARN") && warning.contains("timeout_ms=5000"), "{warning}");
    })
    .await
    .expect("test timed out")
}

/// 16 idle clients hold every slot: each `tandem` command prints the
/// master's refusal and exits 3 (it used to print "Broken pipe", its own
/// failed write), and `tandem ls` lists the cluster as busy.
#[tokio::test]
async fn a_refused_tandem_prints_the_refusal_and_exits_3() {
    tokio::time::timeout(TIMEOUT, async {
        let cluster = start("busy-it", false).await;
        let xdg = cluster.xdg.path().to_owned();
        let mut idle = Vec::new();
        for _ in 0..16 {
            idle.push(UnixStream::connect(&cluster.socket).await.expect("connect"));
        }
        // Refused once the master has accepted all 16.
        poll_until(STEP, "tandem status to be refused", || async {
            tandem(&xdg, &["status", "busy-it"]).await.status.code() == Some(EXIT_BUSY)
        })
        .await;
        for args in [
            &["status", "busy-it"][..],
            &["reload", "busy-it"],
            &["reload", "busy-it", "--agent"],
            &["stop", "busy-it"],
        ] {
            let out = tandem(&xdg, args).await;
            assert_eq!(out.status.code(), Some(EXIT_BUSY), "{args:?}: {}{}", stdout(&out), stderr(&out));
            assert_eq!(stderr(&out), BUSY, "{args:?}");
            assert_eq!(stdout(&out), "", "{args:?}");
        }
        let out = tandem(&xdg, &["ls", "--json"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let listed: Value = serde_json::from_slice(&out.stdout).expect("ls --json is JSON");
        assert_eq!(
            listed,
            serde_json::json!([{
                "name": "busy-it",
                "pid": cluster.master,
                "state": "busy",
                "error": "the master is serving its limit of 16 control connections; try again",
            }])
        );

        // The idle clients gone, the slots are free again.
        drop(idle);
        poll_until(STEP, "tandem status to succeed", || async {
            tandem(&xdg, &["status", "busy-it"]).await.status.success()
        })
        .await;
    })
    .await
    .expect("test timed out")
}

/// A master stopped with SIGSTOP still holds its name: `tandem ls` lists it
/// as `not answering` after `LIST_TIMEOUT` (it used to print "no running
/// clusters"), with the pid from its pid file, and as online again once
/// resumed.
#[tokio::test]
async fn ls_lists_a_stopped_master_as_not_answering() {
    tokio::time::timeout(TIMEOUT, async {
        let cluster = start("stopped-it", false).await;
        let xdg = cluster.xdg.path().to_owned();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(cluster.master), Signal::SIGSTOP).unwrap();
        let resume = Resume(cluster.master);

        let started = Instant::now();
        let out = tandem(&xdg, &["ls"]).await;
        let took = started.elapsed();
        assert!(out.status.success(), "{}", stderr(&out));
        let expected = format!(
            "{:<24} {:>8} {:>8} {:>8} {}\n",
            "stopped-it", cluster.master, "-", "-", "not answering (no answer within 2s)"
        );
        assert_eq!(stdout(&out).lines().nth(1).map(|l| format!("{l}\n")), Some(expected), "{}", stdout(&out));
        assert!(took >= LIST_TIMEOUT && took < LIST_TIMEOUT + Duration::from_secs(5), "took {took:?}");

        let out = tandem(&xdg, &["ls", "--json"]).await;
        let listed: Value = serde_json::from_slice(&out.stdout).expect("ls --json is JSON");
        assert_eq!(
            listed,
            serde_json::json!([{
                "name": "stopped-it",
                "pid": cluster.master,
                "state": "not answering",
                "error": "no answer within 2s",
            }])
        );
        // An unknown name still names it among the running ones.
        let out = tandem(&xdg, &["status", "nope"]).await;
        assert!(stderr(&out).contains("no running cluster named \"nope\"; running: stopped-it"), "{}", stderr(&out));

        drop(resume);
        let out = tandem(&xdg, &["ls", "--json"]).await;
        let listed: Value = serde_json::from_slice(&out.stdout).expect("ls --json is JSON");
        assert_eq!((listed[0]["name"].as_str(), listed[0]["state"].as_str()), (Some("stopped-it"), Some("online")));
        assert_eq!(listed[0]["pid"], cluster.master, "{listed}");
    })
    .await
    .expect("test timed out")
}
