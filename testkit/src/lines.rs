//! A child's output, line by line, awaited with deadlines.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

/// The lines a child writes (stdout, stderr, or both), read to the end in the
/// background, and every line looked at so far.
///
/// Attach every source ([`read`](Self::read), [`read_with`](Self::read_with),
/// [`read_blocking`](Self::read_blocking)) right after the spawn: the first
/// [`expect_line`](Self::expect_line) or [`rest`](Self::rest) closes the list,
/// so the end of the output can be seen.
#[derive(Debug)]
pub struct Lines {
    name: String,
    tx: Option<mpsc::UnboundedSender<String>>,
    rx: mpsc::UnboundedReceiver<String>,
    /// Every line looked at so far, in order.
    pub seen: Vec<String>,
}

impl Lines {
    /// No source yet; `name` (`pid 123`, `the fixture`) names it in panics.
    pub fn new(name: impl Into<String>) -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        Lines { name: name.into(), tx: Some(tx), rx, seen: Vec::new() }
    }

    /// Reads `source` in a tokio task.
    pub fn read(&mut self, source: impl AsyncRead + Unpin + Send + 'static) {
        self.read_with(source, |line| line);
    }

    /// Reads `source` in a tokio task, each line passed through `map` (to tag or echo it).
    pub fn read_with(
        &mut self,
        source: impl AsyncRead + Unpin + Send + 'static,
        mut map: impl FnMut(String) -> String + Send + 'static,
    ) {
        let tx = self.sender();
        tokio::spawn(async move {
            let mut reader = BufReader::new(source).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                // Read to the end even once nobody listens: a closed pipe would
                // make the child's own printing fail.
                let _ = tx.send(map(line));
            }
        });
    }

    /// Reads a blocking `source` (a `std::process` pipe) in a thread.
    pub fn read_blocking(&mut self, source: impl std::io::Read + Send + 'static) {
        use std::io::BufRead;
        let tx = self.sender();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(source).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }

    fn sender(&self) -> mpsc::UnboundedSender<String> {
        self.tx.clone().expect("attach the sources before the first read")
    }

    /// Waits (at most `within`) for a line matching `predicate` and returns it;
    /// panics with every line seen so far if the output ends or time runs out.
    pub async fn expect_line(&mut self, within: Duration, predicate: impl Fn(&str) -> bool) -> String {
        self.tx = None;
        let deadline = Instant::now() + within;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if predicate(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!("{}: output ended (exited?); lines so far: {:#?}", self.name, self.seen),
                Err(_) => panic!("{}: no matching line within {within:?}; lines so far: {:#?}", self.name, self.seen),
            }
        }
    }

    /// Collects the lines until the output ends, for at most `within`.
    pub async fn rest(&mut self, within: Duration) {
        self.tx = None;
        let deadline = Instant::now() + within;
        while let Ok(Some(line)) = timeout_at(deadline, self.rx.recv()).await {
            self.seen.push(line);
        }
    }

    /// Moves every line already read into `seen`, without waiting; returns those lines.
    pub fn drain(&mut self) -> &[String] {
        let from = self.seen.len();
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        &self.seen[from..]
    }
}

/// The value of a `name=value` field of a line (fields split at whitespace).
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_whole_names() {
        let line = "cluster ready: master=1 agent=22 workers=3,4 master_pid=9";
        assert_eq!(field(line, "agent"), Some("22"));
        assert_eq!(field(line, "workers"), Some("3,4"));
        assert_eq!(field(line, "pid"), None);
        assert_eq!(field(line, "ready:"), None);
    }

    #[tokio::test]
    async fn lines_are_awaited_in_order_and_the_end_is_seen() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "echo one; echo two >&2; echo three"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut lines = Lines::new("sh");
        lines.read(child.stdout.take().expect("stdout"));
        lines.read_with(child.stderr.take().expect("stderr"), |l| format!("stderr: {l}"));
        assert_eq!(lines.expect_line(Duration::from_secs(10), |l| l == "three").await, "three");
        lines.rest(Duration::from_secs(10)).await;
        child.wait().await.expect("wait");
        let mut seen = lines.seen.clone();
        seen.sort();
        assert_eq!(seen, ["one", "stderr: two", "three"]);
        assert!(lines.drain().is_empty());
    }

    #[tokio::test]
    async fn a_blocking_pipe_is_read_too() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo ready port=7"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut lines = Lines::new("sh");
        lines.read_blocking(child.stdout.take().expect("stdout"));
        let line = lines.expect_line(Duration::from_secs(10), |l| l.starts_with("ready")).await;
        assert_eq!(field(&line, "port"), Some("7"));
        child.wait().expect("wait");
    }
}
