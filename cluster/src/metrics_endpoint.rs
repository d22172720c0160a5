//! The HTTP/1 server behind `/metrics`: axum routes served by hyper with the
//! limits a TCP port any local user can reach needs, so that the endpoint
//! can never take the master's descriptor table.
//!
//! ```text
//! accept ──> a slot free? ── no ──> "503", closed at once, counted (refused)
//!                 │ yes
//!                 v
//!          hyper http1 connection ── no complete head within header_timeout ──> closed, counted (timed out)
//!                 │                 ── no byte moved for idle_timeout ──────────> closed, counted (timed out)
//!                 v
//!          the routes (`/metrics`)
//! ```
//!
//! - At most [`Limits::max_connections`] connections are served at once; one
//!   more is accepted, sent a `503` (one non-blocking write, no wait) and
//!   closed: it holds a descriptor for microseconds, not for as long as the
//!   client likes.
//! - A connection must deliver a complete request head within
//!   [`Limits::header_timeout`] of its accept, or of the previous response on a
//!   kept-alive connection (hyper's header-read timer).
//! - A connection that moves no byte either way for [`Limits::idle_timeout`]
//!   (a client that stops reading its response, a body that stalls) is asked
//!   to close, then dropped if it still moves nothing for as long again.
//! - `accept` failing for lack of descriptors or memory (`EMFILE`, `ENFILE`,
//!   `ENOBUFS`, `ENOMEM`) is logged at WARN with its cause (the first time,
//!   then once per [`WARN_EVERY`](tandem_protocol::internal::WARN_EVERY)) and followed by
//!   a growing pause ([`AcceptErrors`]); accepting resumes by itself.
//!
//! [`EndpointStats`] counts all of it for the scrape itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tandem_protocol::internal::{AcceptErrors, Throttle};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The connection cap when the open-file limit does not call for less.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// The endpoint's limits (see [`Config`](crate::Config) for the defaults).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    /// The limits `config` asks for, the connection cap resolved against the
    /// current open-file limit.
    pub(crate) fn from_config(config: &crate::Config) -> Self {
        Limits {
            max_connections: config.metrics_max_connections.unwrap_or_else(default_max_connections).max(1),
            header_timeout: config.metrics_header_timeout,
            idle_timeout: config.metrics_idle_timeout,
        }
    }
}

/// [`DEFAULT_MAX_CONNECTIONS`], or a quarter of the soft `RLIMIT_NOFILE` when
/// that is lower (at least 1): the endpoint alone never takes more than a
/// quarter of the master's descriptors.
pub(crate) fn default_max_connections() -> usize {
    match open_file_limit() {
        Some(limit) => usize::try_from(limit / 4).unwrap_or(usize::MAX).clamp(1, DEFAULT_MAX_CONNECTIONS),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// The soft `RLIMIT_NOFILE`, `None` when unlimited or unknown.
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable `rlimit`; RLIMIT_NOFILE is a valid resource.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The endpoint's own counters, rendered in every scrape.
#[derive(Debug, Default)]
pub(crate) struct EndpointStats {
    accepted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
    open: AtomicU64,
}

impl EndpointStats {
    /// Registers the counters in `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let counter = |n: &AtomicU64| {
            let c = Counter::<u64>::default();
            c.inc_by(n.load(Ordering::Relaxed));
            c
        };
        let open = Gauge::<i64>::default();
        open.set(i64::try_from(self.open.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        registry.register(
            "tandem_metrics_connections_accepted",
            "Connections to the metrics endpoint it served (refused ones excluded)",
            counter(&self.accepted),
        );
        registry.register(
            "tandem_metrics_connections_refused",
            "Connections to the metrics endpoint refused because it was serving its limit",
            counter(&self.refused),
        );
        registry.register(
            "tandem_metrics_connections_timed_out",
            "Connections to the metrics endpoint closed by its header or idle timeout",
            counter(&self.timed_out),
        );
        registry.register(
            "tandem_metrics_accept_errors",
            "Failed accepts on the metrics endpoint (out of descriptors or memory, say)",
            counter(&self.accept_errors),
        );
        registry.register("tandem_metrics_connections_open", "Connections the metrics endpoint is serving", open);
    }

    #[cfg(test)]
    fn get(&self) -> [u64; 5] {
        [&self.accepted, &self.refused, &self.timed_out, &self.accept_errors, &self.open]
            .map(|n| n.load(Ordering::Relaxed))
    }
}

/// Serves `router` on `listener` within `limits` until `cancel`; the accept
/// loop and every connection run on `tracker`.
pub(crate) fn spawn(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    stats: Arc<EndpointStats>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let server = Server {
        router,
        limits,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        refusal: refusal(limits.max_connections),
        refusals: Mutex::new(Throttle::default()),
        stats,
        tracker: tracker.clone(),
        cancel,
    };
    tracker.spawn(server.accept_loop(listener).in_current_span());
}

struct Server {
    router: axum::Router,
    limits: Limits,
    slots: Arc<Semaphore>,
    /// The whole `503` response a refused connection is sent.
    refusal: Vec<u8>,
    refusals: Mutex<Throttle>,
    stats: Arc<EndpointStats>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Server {
    async fn accept_loop(self, listener: TcpListener) {
        let Limits { max_connections, header_timeout, idle_timeout } = self.limits;
        tracing::debug!(
            max_connections,
            header_timeout_ms = header_timeout.as_millis() as u64,
            idle_timeout_ms = idle_timeout.as_millis() as u64,
            "metrics endpoint serving"
        );
        let mut errors = AcceptErrors::new("metrics");
        loop {
            let accepted = tokio::select! {
                () = self.cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    errors.succeeded();
                    match Arc::clone(&self.slots).try_acquire_owned() {
                        Ok(slot) => {
                            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                            let connection = serve_connection(
                                stream,
                                self.router.clone(),
                                self.limits,
                                Arc::clone(&self.stats),
                                slot,
                                self.cancel.clone(),
                            );
                            let span = tracing::debug_span!("metrics_connection", peer = %peer);
                            self.tracker.spawn(connection.instrument(span));
                        }
                        Err(_) => self.refuse(stream, peer),
                    }
                }
                Err(e) => {
                    let pause = errors.failed(&e);
                    if pause.is_zero() {
                        continue; // that connection only (reset before we took it)
                    }
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = self.cancel.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Sends the `503` if the socket takes it at once, and closes the connection.
    fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        let refused = self.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.refusals.lock().unwrap_or_else(PoisonError::into_inner).hit() {
            tracing::warn!(
                %peer,
                max_connections = self.limits.max_connections,
                refused,
                suppressed,
                "the metrics endpoint is serving its limit of connections; refusing new ones (503) until some close"
            );
        }
        // A std socket writes without waiting for the reactor to report it writable.
        match stream.into_std() {
            Ok(stream) => {
                // What the client already sent is read first: closing a socket
                // with unread bytes resets it, and the reset can overtake the 503.
                let mut request = [0u8; 1024];
                let _ = io::Read::read(&mut &stream, &mut request);
                if let Err(e) = io::Write::write(&mut &stream, &self.refusal) {
                    tracing::debug!(error = %e, "cannot tell a refused connection why");
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            Err(e) => tracing::debug!(error = %e, "cannot tell a refused connection why"),
        }
    }
}

fn refusal(max_connections: usize) -> Vec<u8> {
    let body = format!("the metrics endpoint is serving its limit of {max_connections} connections; try again\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves one connection until it closes, times out, or `cancel` (then the
/// request in progress is finished first).
async fn serve_connection(
    stream: TcpStream,
    router: axum::Router,
    limits: Limits,
    stats: Arc<EndpointStats>,
    _slot: OwnedSemaphorePermit,
    cancel: CancellationToken,
) {
    let _open = Open::new(&stats);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: stream, activity: Arc::clone(&activity) });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let connection = builder.serve_connection(io, TowerToHyperService::new(router));
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let result = loop {
        let idle_at = activity.last() + limits.idle_timeout;
        tokio::select! {
            result = connection.as_mut() => break result,
            () = tokio::time::sleep_until(idle_at) => {
                if activity.last() + limits.idle_timeout > Instant::now() {
                    continue; // bytes moved meanwhile
                }
                if closing {
                    tracing::debug!("still no byte moved after the close was asked for; dropping the connection");
                    return;
                }
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(idle_timeout_ms = limits.idle_timeout.as_millis() as u64, "idle connection closed");
                connection.as_mut().graceful_shutdown();
                closing = true;
                activity.touch();
            }
            () = cancel.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
                activity.touch();
            }
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                header_timeout_ms = limits.header_timeout.as_millis() as u64,
                "no complete request head in time; connection closed"
            );
        }
        Err(e) => tracing::debug!(error = %e, "metrics connection ended with an error"),
    }
}

/// Counts a connection as open while it lives.
struct Open<'a>(&'a EndpointStats);

impl<'a> Open<'a> {
    fn new(stats: &'a EndpointStats) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        Open(stats)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a connection last moved a byte (either way).
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Nanoseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// A socket that records its progress in an [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::StreamExt;
    use tandem_testkit::{eventually, within};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const ACCEPTED: usize = 0;
    const REFUSED: usize = 1;
    const TIMED_OUT: usize = 2;
    const OPEN: usize = 4;

    struct Running {
        addr: SocketAddr,
        stats: Arc<EndpointStats>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.cancel.cancel();
            self.tracker.close();
        }
    }

    /// The endpoint on 127.0.0.1:0 with `/metrics` showing its own counters
    /// (the master's part needs a master) and `/big`, a 64 MiB body.
    async fn start(limits: Limits) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(EndpointStats::default());
        let counters = Arc::clone(&stats);
        let router = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let counters = Arc::clone(&counters);
                    async move {
                        let mut registry = Registry::default();
                        counters.register(&mut registry);
                        let mut text = String::new();
                        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
                        text
                    }
                }),
            )
            .route(
                "/big",
                axum::routing::get(|| async {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let chunks = futures::stream::repeat(chunk).take(1024).map(Ok::<_, io::Error>);
                    axum::body::Body::from_stream(chunks)
                }),
            );
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        spawn(listener, router, limits, Arc::clone(&stats), &tracker, cancel.clone());
        Running { addr, stats, cancel, tracker }
    }

    /// Sends `request` and reads until the server closes.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8_lossy(&response).into_owned()
    }

    /// The value of a sample line `name value` in a scrape.
    fn sample(text: &str, name: &str) -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits for the server to close `stream` (EOF or reset), reading what comes.
    async fn closed(stream: &mut TcpStream) {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_counted_and_a_scrape_gets_in_once_idle_ones_time_out() {
        within(Duration::from_secs(30), async {
            let limits = Limits {
                max_connections: 4,
                header_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(60),
            };
            let server = start(limits).await;
            let mut idle = Vec::new();
            for _ in 0..4 {
                idle.push(TcpStream::connect(server.addr).await.unwrap());
            }
            eventually(Duration::from_secs(2), "4 connections open", || async { server.stats.get()[OPEN] == 4 }).await;

            // Over the cap: a 503 at once, then the close, whatever the client sends.
            for _ in 0..3 {
                let mut extra = TcpStream::connect(server.addr).await.unwrap();
                let mut response = String::new();
                extra.read_to_string(&mut response).await.unwrap();
                assert!(response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{response}");
                assert!(response.ends_with("serving its limit of 4 connections; try again\n"), "{response}");
            }
            let refused = exchange(server.addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
            assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
            assert_eq!(server.stats.get()[REFUSED], 4);
            assert_eq!(server.stats.get()[ACCEPTED], 4);

            // The idle ones send no request head: closed by the header timeout.
            for stream in &mut idle {
                closed(stream).await;
            }
            eventually(Duration::from_secs(2), "the idle connections gone", || async { server.stats.get()[OPEN] == 0 })
                .await;

            let scrape = exchange(server.addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
            assert!(scrape.starts_with("HTTP/1.0 200 OK\r\n"), "{scrape}");
            assert_eq!(sample(&scrape, "tandem_metrics_connections_refused_total"), Some(4), "{scrape}");
            assert_eq!(sample(&scrape, "tandem_metrics_connections_timed_out_total"), Some(4), "{scrape}");
            assert_eq!(sample(&scrape, "tandem_metrics_connections_accepted_total"), Some(5), "{scrape}");
            assert_eq!(sample(&scrape, "tandem_metrics_connections_open"), Some(1), "{scrape}");
            assert_eq!(sample(&scrape, "tandem_metrics_accept_errors_total"), Some(0), "{scrape}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_head_never_completed_is_closed_after_the_header_timeout() {
        within(Duration::from_secs(30), async {
            let header_timeout = Duration::from_millis(500);
            let limits = Limits { max_connections: 4, header_timeout, idle_timeout: Duration::from_secs(60) };
            let server = start(limits).await;
            let started = Instant::now();
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n").await.unwrap();
            // One more header line every 50 ms: never idle, never complete.
            let mut buf = [0u8; 1024];
            let mut trickle = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => panic!("an answer to a request never completed: {:?}", String::from_utf8_lossy(&buf[..n])),
                    },
                    _ = trickle.tick() => {
                        if stream.write_all(b"x-slow: 1\r\n").await.is_err() {
                            closed(&mut stream).await;
                            break;
                        }
                    }
                }
            }
            let elapsed = started.elapsed();
            assert!(elapsed >= header_timeout, "closed after {elapsed:?}");
            assert!(elapsed < Duration::from_secs(10), "closed after {elapsed:?}");
            eventually(Duration::from_secs(2), "the connection counted", || async {
                server.stats.get()[TIMED_OUT] == 1 && server.stats.get()[OPEN] == 0
            })
            .await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_kept_alive_connection_waiting_for_its_next_request_is_closed_after_the_header_timeout() {
        within(Duration::from_secs(30), async {
            let limits = Limits {
                max_connections: 4,
                header_timeout: Duration::from_millis(300),
                idle_timeout: Duration::from_secs(60),
            };
            let server = start(limits).await;
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut response = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&response).contains("# EOF") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the whole response");
                response.extend_from_slice(&buf[..n]);
            }
            assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
            assert_eq!(server.stats.get()[OPEN], 1, "kept alive after the response");
            closed(&mut stream).await;
            eventually(Duration::from_secs(2), "the connection counted", || async {
                server.stats.get()[TIMED_OUT] == 1 && server.stats.get()[OPEN] == 0
            })
            .await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_its_response_is_dropped_after_the_idle_timeout() {
        within(Duration::from_secs(30), async {
            let limits = Limits {
                max_connections: 4,
                header_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_millis(300),
            };
            let server = start(limits).await;
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut head = [0u8; 16];
            stream.read_exact(&mut head).await.unwrap();
            assert_eq!(&head, b"HTTP/1.1 200 OK\r");
            // Reads nothing more: the server's writes stall once the socket
            // buffers are full, and the connection is dropped.
            eventually(Duration::from_secs(5), "the stalled connection dropped", || async {
                server.stats.get()[OPEN] == 0
            })
            .await;
            assert_eq!(server.stats.get()[TIMED_OUT], 1);
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            assert!(rest.len() < 64 << 20, "the whole body arrived: {} bytes", rest.len());
        })
        .await;
    }

    #[test]
    fn the_default_cap_is_64_or_a_quarter_of_the_open_file_limit() {
        let cap = default_max_connections();
        match open_file_limit() {
            Some(limit) if limit / 4 < 64 => assert_eq!(cap as u64, (limit / 4).max(1)),
            _ => assert_eq!(cap, DEFAULT_MAX_CONNECTIONS),
        }
        assert!(refusal(7).ends_with(b"serving its limit of 7 connections; try again\n"));
    }
}
