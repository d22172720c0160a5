//! The program's readiness notifications: systemd's `NOTIFY_SOCKET` (a Unix
//! datagram socket, `READY=1`), and the same lines over a Unix stream socket
//! (`TANDEM_NOTIFY_STREAM`) for runtimes that cannot send Unix datagrams
//! (Node.js: `net.connect(path).end('READY=1\n')`).
//!
//! Both live in the cluster's private runtime directory (0700): only this
//! user's processes can reach them, so any of them may notify (systemd's
//! `NotifyAccess=all`: a shell script's `systemd-notify --ready` works).

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

/// The largest datagram read; a longer one is cut (systemd's limit is 4 KiB too).
const DATAGRAM_MAX: usize = 4096;

/// The longest line read from a stream connection; a longer one ends it, with a WARN.
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
            // Bounded: a line is never buffered past LINE_MAX bytes.
            let mut lines = FramedRead::new(stream, LinesCodec::new_with_max_length(LINE_MAX));
            loop {
                let line = tokio::select! {
                    line = lines.next() => line,
                    () = stop.cancelled() => return,
                };
                match line {
                    Some(Ok(line)) => {
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                    Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                        tracing::warn!("a TANDEM_NOTIFY_STREAM line over {LINE_MAX} bytes: connection closed");
                        return;
                    }
                    Some(Err(LinesCodecError::Io(error))) => {
                        tracing::warn!(%error, "a TANDEM_NOTIFY_STREAM connection failed (lines must be UTF-8): closed");
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn hostile_stream_lines_end_their_connection_and_later_ones_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut notify = Notifications::bind(dir.path(), "t").unwrap();

        // A line that never ends: cut at LINE_MAX, the connection closed.
        let mut long = tokio::net::UnixStream::connect(&notify.stream_path).await.unwrap();
        let flood = vec![b'x'; 4 * LINE_MAX];
        let _ = long.write_all(&flood).await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, long.read_to_end(&mut rest)).await.expect("closed in time");
        assert!(read.is_err() || rest.is_empty(), "the shim answers nothing: {read:?} {rest:?}");

        // Bytes that are not UTF-8: closed too.
        let mut bad = tokio::net::UnixStream::connect(&notify.stream_path).await.unwrap();
        bad.write_all(b"\xff\xfe\n").await.unwrap();
        let read = tokio::time::timeout(WAIT, bad.read_to_end(&mut rest)).await.expect("closed in time");
        assert!(read.is_err() || rest.is_empty());

        // Garbage datagrams are passed on as lines the shim ignores.
        let datagram = tokio::net::UnixDatagram::unbound().unwrap();
        datagram.send_to(b"\x80\x81\nX=1", &notify.datagram_path).await.unwrap();
        let mut good = tokio::net::UnixStream::connect(&notify.stream_path).await.unwrap();
        good.write_all(b"READY=1\n").await.unwrap();
        let mut seen = Vec::new();
        while !seen.iter().any(|l| l == "READY=1") {
            let line = tokio::time::timeout(WAIT, notify.next()).await.expect("a line in time").expect("open");
            seen.push(line);
        }
        assert!(seen.iter().all(|l| !l.contains('x')), "nothing of the long line got through: {seen:?}");
        assert!(seen.iter().any(|l| l == "X=1"), "{seen:?}");
    }
}
