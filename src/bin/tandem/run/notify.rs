//! The program's readiness notifications: systemd's `NOTIFY_SOCKET` (a Unix
//! datagram socket, `READY=1`), and the same lines over a Unix stream socket
//! (`TANDEM_NOTIFY_STREAM`) for runtimes that cannot send Unix datagrams
//! (Node.js: `net.connect(path).end('READY=1\n')`).
//!
//! Both live in the cluster's private runtime directory (0700): only this
//! user's processes can reach them, so any of them may notify (systemd's
//! `NotifyAccess=all`: a shell script's `systemd-notify --ready` works).

use std::path::{Path, PathBuf};

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The largest datagram read; a longer one is cut (systemd's limit is 4 KiB too).
const DATAGRAM_MAX: usize = 4096;

/// The longest line read from a stream connection; a longer one ends it.
const LINE_MAX: usize = 4096;

/// Stream connections served at once; more wait in the socket's backlog.
const MAX_STREAMS: usize = 8;

/// Notification lines not yet taken by the shim; when full, the readers wait.
const QUEUE: usize = 64;

/// The two sockets, and the lines read from them, one `KEY=VALUE` each.
pub struct Notifications {
    pub datagram_path: PathBuf,
    pub stream_path: PathBuf,
    lines: mpsc::Receiver<String>,
    stop: CancellationToken,
}

impl Notifications {
    /// Binds `notify-<tag>.sock` and `notify-<tag>.stream` in `dir`.
    pub fn bind(dir: &Path, tag: &str) -> Result<Notifications, String> {
        let datagram_path = dir.join(format!("notify-{tag}.sock"));
        let stream_path = dir.join(format!("notify-{tag}.stream"));
        let datagram = tokio::net::UnixDatagram::bind(&datagram_path)
            .map_err(|e| format!("cannot bind the notification socket {}: {e}", datagram_path.display()))?;
        let stream = tokio::net::UnixListener::bind(&stream_path)
            .map_err(|e| format!("cannot bind the notification socket {}: {e}", stream_path.display()))?;
        let (tx, lines) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        tokio::spawn(read_datagrams(datagram, tx.clone(), stop.clone()));
        tokio::spawn(accept_streams(stream, tx, stop.clone()));
        Ok(Notifications { datagram_path, stream_path, lines, stop })
    }

    /// The next notification line (`READY=1`, `STATUS=...`).
    pub async fn next(&mut self) -> Option<String> {
        self.lines.recv().await
    }

    /// Removes both socket files.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.datagram_path);
        let _ = std::fs::remove_file(&self.stream_path);
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.stop.cancel();
        self.remove();
    }
}

async fn read_datagrams(socket: tokio::net::UnixDatagram, tx: mpsc::Sender<String>, stop: CancellationToken) {
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        let n = tokio::select! {
            received = socket.recv(&mut buf) => match received {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(%error, "the notification socket failed; READY=1 can still come by TANDEM_NOTIFY_STREAM");
                    return;
                }
            },
            () = stop.cancelled() => return,
        };
        for line in String::from_utf8_lossy(&buf[..n]).lines() {
            if tx.send(line.to_owned()).await.is_err() {
                return;
            }
        }
    }
}

async fn accept_streams(listener: tokio::net::UnixListener, tx: mpsc::Sender<String>, stop: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&slots).acquire_owned().await else { return };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "the notification stream socket failed");
                    return;
                }
            },
            () = stop.cancelled() => return,
        };
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut lines = tokio::io::BufReader::new(stream).lines();
            loop {
                let line = tokio::select! {
                    line = lines.next_line() => line,
                    () = stop.cancelled() => return,
                };
                match line {
                    Ok(Some(line)) if line.len() <= LINE_MAX => {
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
    }
}
