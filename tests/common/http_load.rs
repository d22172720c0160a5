//! HTTP load for the multi-process tests (`run`, `http_config`, `scale`):
//! clients sending GETs on keep-alive HTTP/1.1 connections until stopped or
//! capped, counting the answers and failures and recording which worker
//! answered (its `x-worker-pid` header).
//!
//! Only the tests that use it compile it, declared next to `mod common;`:
//! `#[path = "common/http_load.rs"] mod http_load;`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// One request's deadline (connect + answer).
pub const REQUEST: Duration = Duration::from_secs(10);
/// How long [`Load::more`] waits for its answers.
const MORE: Duration = Duration::from_secs(30);

/// One answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The `x-worker-pid` header: the worker that answered.
    pub pid: Option<u32>,
    /// The server said `Connection: close`.
    pub close: bool,
    #[allow(dead_code)] // read by the tests of a program's answers (run), not the others
    pub body: String,
}

/// One keep-alive connection.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        Ok(Conn { stream: BufReader::new(stream) })
    }

    /// One GET of `path`; if `last`, the request says `Connection: close`.
    async fn get(&mut self, path: &str, last: bool) -> Result<Response, String> {
        let close = if last { "Connection: close\r\n" } else { "" };
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{close}\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut status = None;
        let (mut pid, mut close, mut length) = (None, false, 0);
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await.map_err(|e| format!("read: {e}"))? == 0 {
                return Err(format!("connection closed before the answer's end (status {status:?})"));
            }
            let line = line.trim_end();
            if status.is_none() {
                status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
                if status.is_none() {
                    return Err(format!("no status line: {line:?}"));
                }
                continue;
            }
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "x-worker-pid" => pid = value.trim().parse().ok(),
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                "content-length" => length = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.map_err(|e| format!("read body: {e}"))?;
        let body = String::from_utf8_lossy(&body).into_owned();
        Ok(Response { status: status.unwrap_or(0), pid, close, body })
    }
}

/// One GET of `path` on a new connection (`Connection: close`), within [`REQUEST`].
#[allow(dead_code)] // not every test sends single requests
pub async fn get(addr: &str, path: &str) -> Result<Response, String> {
    let exchange = async { Conn::open(addr).await?.get(path, true).await };
    tokio::time::timeout(REQUEST, exchange).await.unwrap_or_else(|_| Err("timed out".into()))
}

/// What a [`Load`] sends.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Concurrent clients, each on its own connection.
    pub clients: usize,
    /// The load stops once this many requests were answered, whatever happens.
    pub max_requests: u64,
    /// The path every request GETs.
    pub path: &'static str,
    /// Requests on one connection before the client opens a new one (the last
    /// says `Connection: close`); `None`: until the server closes it.
    pub per_connection: Option<u32>,
}

/// What a load saw.
#[derive(Default)]
pub struct Seen {
    /// Requests answered 200 with a worker pid.
    pub ok: AtomicU64,
    /// Every other outcome (an error, a timeout, another status, no pid).
    pub failed: AtomicU64,
    /// The failures, in order.
    pub errors: Mutex<Vec<String>>,
    /// Every worker that answered.
    pub pids: Mutex<HashSet<u32>>,
    /// The workers that answered requests sent after the last [`mark`](Seen::mark).
    pub pids_after_mark: Mutex<HashSet<u32>>,
    /// 0: no mark yet; each `mark` bumps it.
    mark: AtomicU64,
}

impl Seen {
    /// From now on, [`pids_after_mark`](Seen::pids_after_mark) records the
    /// workers that answer requests sent from now on (and only those).
    pub async fn mark(&self) {
        let mut after = self.pids_after_mark.lock().await;
        self.mark.fetch_add(1, Ordering::SeqCst);
        after.clear();
    }

    /// An answer from `pid` to a request sent when the mark was `mark`.
    async fn answered(&self, pid: u32, mark: u64) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.pids.lock().await.insert(pid);
        let mut after = self.pids_after_mark.lock().await;
        // A request sent before the last mark may be answered by a worker gone since.
        if mark != 0 && mark == self.mark.load(Ordering::SeqCst) {
            after.insert(pid);
        }
    }

    async fn failure(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.errors.lock().await.push(error);
    }
}

/// `config.clients` clients sending GETs until [`finish`](Load::finish)
/// (or `config.max_requests` answers); a client opens a new connection when
/// the server closes one, after a failure, and after `config.per_connection`
/// requests.
pub struct Load {
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: &str, config: Config) -> Load {
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..config.clients)
            .map(|_| tokio::spawn(client(addr.to_owned(), config, Arc::clone(&seen), Arc::clone(&stop))))
            .collect();
        Load { seen, stop, tasks }
    }

    /// Waits until `n` more requests were answered.
    pub async fn more(&self, n: u64) {
        let target = self.seen.ok.load(Ordering::Relaxed) + n;
        tandem_testkit::eventually(MORE, "more answered requests", || async {
            self.seen.ok.load(Ordering::Relaxed) >= target
        })
        .await;
    }

    /// Stops the clients (each after its request in flight) and returns what they saw.
    pub async fn finish(mut self) -> Arc<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            t.await.unwrap();
        }
        Arc::clone(&self.seen)
    }
}

/// One client of a [`Load`].
async fn client(addr: String, config: Config, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let mut conn: Option<Conn> = None;
    let mut used = 0;
    while !stop.load(Ordering::Relaxed) && seen.ok.load(Ordering::Relaxed) < config.max_requests {
        let mark = seen.mark.load(Ordering::SeqCst);
        let last = config.per_connection == Some(used + 1);
        let exchange = async {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(Conn::open(&addr).await?),
            };
            c.get(config.path, last).await
        };
        match tokio::time::timeout(REQUEST, exchange).await.unwrap_or_else(|_| Err("timed out".into())) {
            Ok(Response { status: 200, pid: Some(pid), close, .. }) => {
                seen.answered(pid, mark).await;
                used += 1;
                if close || last {
                    conn = None;
                    used = 0;
                }
            }
            other => {
                conn = None;
                used = 0;
                seen.failure(format!("{other:?}")).await;
            }
        }
    }
}
