//! Stalled, idle, greedy and too many clients: each runs into a limit with a
//! clear goodbye, and the clients that behave keep being served.
//!
//! Limits are configured small so that every test runs in a few seconds of
//! real time over real loopback sockets.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{LIMIT, SETTLE, next, start};
use futures::future::join_all;
use tandem_protocol::internal::error_chain;
use tandem_registry::{Config, Instance, RegistryClient, WatchSpec};
use tandem_testkit::{Lines, ProcessGuard, eventually, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_tandem-registry");

/// The most a behaving client's call may take while others misbehave.
const CALL: Duration = Duration::from_secs(2);

/// Reads until the server closes the connection (or it fails); returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A connection that sends three bytes of a length prefix and nothing more.
async fn stalled_prefix(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0, 0, 0]).await.unwrap();
    stream
}

/// Connects and puts one key; the error chain if either fails.
async fn put(addr: SocketAddr, key: &str) -> Result<u64, String> {
    let client = RegistryClient::connect(addr).await.map_err(|e| error_chain(&e))?;
    client.put(key, "v").await.map_err(|e| error_chain(&e))
}

/// `Request { id: 1, op: Put { key: "k", value } }`, framed (MessagePack by hand:
/// `[1, {"Put": ["k", bin32 value]}]`).
fn put_frame(value_len: usize) -> Vec<u8> {
    let mut body = vec![0x92, 0x01, 0x81, 0xa3, b'P', b'u', b't', 0x92, 0xa1, b'k', 0xc6];
    body.extend_from_slice(&(value_len as u32).to_be_bytes());
    body.resize(body.len() + value_len, b'x');
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_beyond_the_cap_are_refused_while_a_connected_client_is_served() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.max_connections = 10;
        config.frame_timeout = Duration::from_millis(1500);
        let server = start(config).await;
        let addr = server.local_addr();
        let client = RegistryClient::connect(addr).await.unwrap();
        let mut watch = client.watch(WatchSpec::key("k"), None).await.unwrap();

        // 9 more fill the cap; the 21 after them are told why they are refused. (One after
        // the other: the server accepts them in that order.)
        let stalled_at = Instant::now();
        let mut stalled = Vec::new();
        for _ in 0..30 {
            stalled.push(stalled_prefix(addr).await);
        }
        let mut refused = Vec::new();
        for stream in &mut stalled[9..] {
            let bytes = tokio::time::timeout(CALL, read_to_close(stream)).await.expect("refused at once");
            refused.push(bytes);
        }
        assert!(refused.iter().all(|r| contains(r, "too_many_connections")), "{refused:?}");
        assert!(contains(&refused[0], "limit of 10 connections"));

        // The connected client is served all along, within its deadline.
        let revision = tokio::time::timeout(CALL, client.put("k", "during")).await.expect("in time").unwrap();
        assert_eq!(next(&mut watch).await.unwrap().revision(), revision);
        // A new one is refused with the reason, at once.
        let error = tokio::time::timeout(CALL, put(addr, "k")).await.expect("at once").unwrap_err();
        assert!(error.contains("too_many_connections"), "{error}");

        // The stalled ones are closed at the frame timeout, each told why...
        for stream in &mut stalled[..9] {
            let bytes = read_to_close(stream).await;
            assert!(contains(&bytes, "frame_timeout"), "{}", String::from_utf8_lossy(&bytes));
        }
        let waited = stalled_at.elapsed();
        assert!(waited >= Duration::from_millis(1500), "closed after {waited:?}");
        // ...and their places serve new clients.
        eventually(SETTLE, "the places are free", || async { put(addr, "k").await.is_ok() }).await;
        eventually(SETTLE, "only the first client is left", || async {
            let stats = client.stats().await.unwrap();
            (stats.connections, stats.watches) == (0, 1)
        })
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_that_trickle_in_are_bounded_by_the_budget() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.partial_frame_budget = 2 * 1024 * 1024;
        let server = start(config).await;
        let addr = server.local_addr();
        let client = RegistryClient::connect(addr).await.unwrap();

        // Ten clients each start a 1 MiB put and send half of it: two fit in the budget.
        let frame = put_frame(1024 * 1024 - 64);
        let mut greedy = Vec::new();
        for _ in 0..10 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The server may hang up before it has read it all: that is the point.
            let _ = stream.write_all(&frame[..frame.len() / 2]).await;
            greedy.push(stream);
        }
        let mut over = Vec::new();
        let mut held = Vec::new();
        for mut stream in greedy {
            match tokio::time::timeout(Duration::from_millis(300), read_to_close(&mut stream)).await {
                Ok(bytes) => over.push(bytes),
                Err(_) => held.push(stream),
            }
        }
        assert_eq!((held.len(), over.len()), (2, 8));
        assert!(over.iter().all(|bytes| contains(bytes, "frame_budget")), "{over:?}");
        assert!(contains(&over[0], "limit 2097152 bytes"), "{}", String::from_utf8_lossy(&over[0]));

        // Small requests need no budget.
        tokio::time::timeout(CALL, client.put("small", "v")).await.expect("in time").unwrap();
        // The two held frames complete and are served; their budget is free again.
        for stream in &mut held {
            stream.write_all(&frame[frame.len() / 2..]).await.unwrap();
        }
        eventually(SETTLE, "both puts are applied", || async { client.stats().await.unwrap().keys == 2 }).await;
        let value = vec![b'y'; 1024 * 1024 - 64];
        tokio::time::timeout(CALL, client.put("large", value)).await.expect("in time").unwrap();
        assert_eq!(client.get("k").await.unwrap().unwrap().value.len(), 1024 * 1024 - 64);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_watchers_and_lease_holders_are_kept() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.idle_timeout = Duration::from_millis(300);
        let server = start(config).await;
        let addr = server.local_addr();
        let watcher = RegistryClient::connect(addr).await.unwrap();
        let mut watch = watcher.watch(WatchSpec::prefix(""), None).await.unwrap();
        let holder = RegistryClient::connect(addr).await.unwrap();
        // Kept alive every 10 s: silent for many idle timeouts in between.
        let _registration =
            holder.register(Instance::new("billing", "b1", "10.0.0.1:80"), Duration::from_secs(30)).await.unwrap();

        // Three idle periods, one after the other: a silent connection is closed each time.
        for _ in 0..3 {
            let opened = Instant::now();
            let mut silent = TcpStream::connect(addr).await.unwrap();
            let bytes = read_to_close(&mut silent).await;
            assert!(contains(&bytes, "idle_timeout"), "{}", String::from_utf8_lossy(&bytes));
            assert!(opened.elapsed() >= Duration::from_millis(300), "closed after {:?}", opened.elapsed());
        }
        // A client that sends requests is not idle, however many idle periods it lasts.
        let busy = RegistryClient::connect(addr).await.unwrap();
        for _ in 0..10 {
            busy.put("busy", "v").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!watcher.is_closed() && !holder.is_closed());
        assert_eq!(watcher.discover("billing").await.unwrap().len(), 1);
        assert_eq!(next(&mut watch).await.unwrap().key(), "busy");
        // Once its work is done, it is closed too.
        let error = tokio::time::timeout(Duration::from_secs(5), busy.closed()).await.expect("closed");
        assert!(error_chain(&error).contains("idle_timeout"), "{}", error_chain(&error));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_the_first_request_timeout_and_others_are_not() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.first_request_timeout = Duration::from_millis(200);
        config.idle_timeout = Duration::from_millis(1500);
        let server = start(config).await;
        let addr = server.local_addr();
        let watcher = RegistryClient::connect(addr).await.unwrap();
        let mut watch = watcher.watch(WatchSpec::prefix(""), None).await.unwrap();
        // Connected, but its first call comes only after the silent ones below are closed.
        let late = RegistryClient::connect(addr).await.unwrap();
        // A raw client that sends its first request at once, then nothing.
        let prompt_at = Instant::now();
        let mut prompt = TcpStream::connect(addr).await.unwrap();
        prompt.write_all(&put_frame(1)).await.unwrap();

        // Nothing at all, and a first frame that never finishes (the frame timeout is 10 s):
        // both are closed at the first-request timeout, told why.
        let opened = Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = stalled_prefix(addr).await;
        for stream in [&mut silent, &mut partial] {
            let bytes = read_to_close(stream).await;
            assert!(contains(&bytes, "first_request_timeout"), "{}", String::from_utf8_lossy(&bytes));
            assert!(contains(&bytes, "no request within 200 ms of connecting"));
        }
        assert!(opened.elapsed() >= Duration::from_millis(200), "closed after {:?}", opened.elapsed());

        // The client connected before them is past its own first-request deadline, and served.
        assert!(!late.is_closed());
        let revision = tokio::time::timeout(CALL, late.put("late", "v")).await.expect("in time").unwrap();
        assert_eq!(revision, 3, "after the raw client's put");
        assert_eq!(next(&mut watch).await.unwrap().key(), "k");
        assert_eq!(next(&mut watch).await.unwrap().revision(), 3);

        // Once its request arrived, the raw client is held to the idle timeout only.
        let bytes = read_to_close(&mut prompt).await;
        assert!(contains(&bytes, "idle_timeout"), "{}", String::from_utf8_lossy(&bytes));
        assert!(!contains(&bytes, "first_request_timeout"), "{}", String::from_utf8_lossy(&bytes));
        assert!(prompt_at.elapsed() >= Duration::from_millis(1500), "closed after {:?}", prompt_at.elapsed());
        // The watcher has been silent for as long, and is kept.
        assert!(!watcher.is_closed());
        watcher.put("after", "v").await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap().key(), "after");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_filled_by_silent_clients_is_freed_at_the_first_request_timeout() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.max_connections = 5;
        config.first_request_timeout = Duration::from_millis(500);
        let server = start(config).await;
        let addr = server.local_addr();

        let filled_at = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..5 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The hello's first bytes: the server has accepted it and counts it.
            let mut hello = [0u8; 1];
            assert_eq!(stream.read(&mut hello).await.unwrap(), 1);
            silent.push(stream);
        }
        let refused = tokio::time::timeout(CALL, put(addr, "k")).await.expect("at once").unwrap_err();
        assert!(refused.contains("too_many_connections"), "{refused}");

        for stream in &mut silent {
            let bytes = read_to_close(stream).await;
            assert!(contains(&bytes, "first_request_timeout"), "{}", String::from_utf8_lossy(&bytes));
        }
        assert!(filled_at.elapsed() >= Duration::from_millis(500), "closed after {:?}", filled_at.elapsed());
        // Their places serve a normal client, long before the 5-minute idle timeout.
        eventually(SETTLE, "the places are free", || async { put(addr, "k").await.is_ok() }).await;
        eventually(SETTLE, "every connection is closed", || async { server.stats().connections == 0 }).await;
    })
    .await
}

/// How long the server may take to write an awaited log line.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A `tandem-registry serve` process, killed (by PID) and reaped on drop.
struct Served {
    _process: ProcessGuard,
    addr: SocketAddr,
    /// Its stderr (the log), line by line.
    log: Lines,
}

impl Served {
    /// Serves with the open-file limit set to `nofile` in the child only (this
    /// test process keeps its own).
    async fn start(nofile: u64, args: &[&str]) -> Served {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info,tandem_registry=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec the closure only calls `setrlimit`, which is
        // async-signal-safe, and touches no memory shared with the parent.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = ProcessGuard::new(command.spawn().expect("spawns tandem-registry"));
        let mut stdout = Lines::new("tandem-registry's stdout");
        stdout.read_blocking(process.child().stdout.take().expect("piped stdout"));
        let mut log = Lines::new("tandem-registry's log");
        log.read_blocking(process.child().stderr.take().expect("piped stderr"));
        let first = stdout.expect_line(LOG_WAIT, |_| true).await;
        let addr = first.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected {first:?}"));
        Served { addr: addr.parse().expect("an address"), _process: process, log }
    }

    /// Waits (up to [`LOG_WAIT`]) for a log line containing `needle`; returns it.
    async fn expect_log(&mut self, needle: &str) -> String {
        self.log.expect_line(LOG_WAIT, |line| line.contains(needle)).await
    }

    /// The log lines read (each within [`LOG_WAIT`]) until `count` of them contain `needle`.
    async fn log_until(&mut self, needle: &str, count: usize) -> Vec<String> {
        let from = self.log.seen.len();
        for _ in 0..count {
            self.expect_log(needle).await;
        }
        self.log.seen[from..].to_vec()
    }

    /// The log lines read since the last look containing `needle`.
    fn count_log(&mut self, needle: &str) -> usize {
        self.log.drain().iter().filter(|line| line.contains(needle)).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_backs_off_and_keeps_serving() {
    within(LIMIT, async {
        // 64 descriptors, and a connection cap above them: `accept` fails with EMFILE.
        let mut server = Served::start(64, &["--max-connections", "1000", "--frame-timeout", "1"]).await;
        server.expect_log("the connection limit is above what the open-file limit allows").await;
        let addr = server.addr;
        let client = RegistryClient::connect(addr).await.unwrap();

        let mut stalled = join_all((0..100).map(|_| stalled_prefix(addr))).await;
        server.expect_log("Too many open files").await;
        // The connected client is served while accept fails.
        tokio::time::timeout(CALL, client.put("k", "during")).await.expect("in time").unwrap();
        // Every stalled connection is accepted in turn and closed at its frame timeout.
        for stream in &mut stalled {
            let bytes = read_to_close(stream).await;
            assert!(contains(&bytes, "frame_timeout"), "{}", String::from_utf8_lossy(&bytes));
        }
        server.expect_log("accepting connections again").await;
        assert_eq!(put(addr, "k").await, Ok(3));
        // The failures were logged once, not once per attempt (the next line is due in 10 s).
        assert_eq!(server.count_log("accept failed"), 0, "rate-limited to one line per 10 s");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_cap_stays_under_the_open_file_limit() {
    within(LIMIT, async {
        let mut server = Served::start(64, &[]).await;
        // 64 descriptors minus 32 reserved.
        server.expect_log("max_connections=32").await;
        let addr = server.addr;
        let mut held = join_all((0..32).map(|_| TcpStream::connect(addr))).await;
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let bytes = tokio::time::timeout(CALL, read_to_close(&mut refused)).await.expect("refused at once");
        assert!(contains(&bytes, "limit of 32 connections"), "{}", String::from_utf8_lossy(&bytes));
        server.expect_log("connection refused: the registry is at its connection limit").await;
        // A place frees up when a connection closes.
        held.pop();
        eventually(SETTLE, "a place is free", || async { put(addr, "k").await.is_ok() }).await;
        assert_eq!(server.count_log("Too many open files"), 0, "the cap is reached before the descriptors run out");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_logged_each_at_debug_and_together_at_warn() {
    within(LIMIT, async {
        let mut server = Served::start(256, &["--first-request-timeout", "0.2"]).await;
        server.expect_log("first_request_timeout_ms=200").await;
        let addr = server.addr;
        let mut silent = join_all((0..5).map(|_| TcpStream::connect(addr))).await;
        for stream in &mut silent {
            let stream = stream.as_mut().unwrap();
            let bytes = read_to_close(stream).await;
            assert!(contains(&bytes, "first_request_timeout"), "{}", String::from_utf8_lossy(&bytes));
        }
        // One DEBUG line per connection; one WARN for them all (the next is due in 10 s).
        let lines = server.log_until("code first_request_timeout", 5).await;
        let debug = lines.iter().filter(|l| l.contains("DEBUG") && l.contains("code first_request_timeout"));
        assert_eq!(debug.count(), 5, "{lines:#?}");
        let warn: Vec<&String> = lines.iter().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warn.len(), 1, "{lines:#?}");
        assert!(warn[0].contains("--first-request-timeout") && warn[0].contains("suppressed=0"), "{}", warn[0]);
        // The server still serves.
        assert_eq!(put(addr, "k").await, Ok(2));
    })
    .await
}
