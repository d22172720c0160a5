//! The follower under test: a child process spoken to through the driver
//! protocol (one JSON object per line on its stdin, one per line on its stdout).

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How many of the child's last stderr lines a failure shows.
const STDERR_TAIL: usize = 12;

/// A line of the child's stdout: a JSON value, or the text that was not JSON.
type Line = Result<Value, String>;

/// The running follower under test. Killed (SIGKILL, by its pid) when dropped.
#[derive(Debug)]
pub(crate) struct Child {
    process: tokio::process::Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Line>,
    /// Lines read but not yet matched by a wait.
    unread: VecDeque<Value>,
    next_id: u64,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Child {
    /// Starts `command` with `TANDEM_LEADER_SOCKET` and `TANDEM_TOKEN` in its environment.
    pub(crate) fn spawn(command: &[String], socket: &Path, token: &str) -> Result<Child, String> {
        let (program, args) = command.split_first().ok_or("no follower command given")?;
        let mut process = Command::new(program)
            .args(args)
            .env("TANDEM_LEADER_SOCKET", socket)
            .env("TANDEM_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let stdin = process.stdin.take().ok_or("no stdin")?;
        let stdout = process.stdout.take().ok_or("no stdout")?;
        let stderr = process.stderr.take().ok_or("no stderr")?;
        // Bounded: a driver that floods stdout waits for the harness to read.
        let (tx, lines) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let parsed = serde_json::from_str::<Value>(&line).map_err(|_| line);
                if tx.send(parsed).await.is_err() {
                    return;
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let keep = tail.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut tail = keep.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        Ok(Child { process, stdin, lines, unread: VecDeque::new(), next_id: 1, stderr: tail })
    }

    /// The child's last stderr lines, for a failure report.
    pub(crate) fn stderr_tail(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Whether the child still runs.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }

    /// Sends a command (`op` and its fields); returns its id.
    pub(crate) async fn send(&mut self, mut command: Value) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.map_err(|e| format!("cannot write to the driver's stdin: {e}"))?;
        self.stdin.flush().await.map_err(|e| format!("cannot write to the driver's stdin: {e}"))?;
        Ok(id)
    }

    /// The first line (read now or earlier, not yet taken) that `matches`, within `timeout`.
    pub(crate) async fn wait(
        &mut self,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        if let Some(i) = self.unread.iter().position(&matches) {
            return Ok(self.unread.remove(i).unwrap_or_default());
        }
        let until = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(until, self.lines.recv()).await {
                Err(_) => return Err(format!("no {what} from the driver within {} ms", timeout.as_millis())),
                Ok(None) => {
                    let status = self.process.try_wait().ok().flatten();
                    return Err(format!("the driver's stdout ended while waiting for {what} (exit: {status:?})"));
                }
                Ok(Some(Err(text))) => return Err(format!("the driver printed a line that is not JSON: {text:?}")),
                Ok(Some(Ok(value))) if matches(&value) => return Ok(value),
                Ok(Some(Ok(value))) => self.unread.push_back(value),
            }
        }
    }

    /// Whether a line that `matches` has arrived (no waiting beyond what is already read).
    pub(crate) fn seen(&mut self, matches: impl Fn(&Value) -> bool) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            if let Ok(value) = line {
                self.unread.push_back(value);
            }
        }
        self.unread.iter().any(matches)
    }

    /// The reply to command `id`.
    pub(crate) async fn reply(&mut self, id: u64, timeout: Duration) -> Result<Value, String> {
        let what = format!("reply to command {id}");
        self.wait(timeout, &what, |v| v.get("id") == Some(&json!(id)) && v.get("ok").is_some()).await
    }

    /// The reply to command `id`, which must succeed.
    pub(crate) async fn ok(&mut self, id: u64, timeout: Duration) -> Result<Value, String> {
        let reply = self.reply(id, timeout).await?;
        if reply["ok"] != json!(true) {
            return Err(format!("command {id} failed: {}", reply["error"]));
        }
        Ok(reply)
    }

    /// The reply to command `id`, which must fail: its `error` object.
    pub(crate) async fn err(&mut self, id: u64, timeout: Duration) -> Result<Value, String> {
        let reply = self.reply(id, timeout).await?;
        if reply["ok"] != json!(false) {
            return Err(format!("command {id} succeeded ({reply}) where it must fail"));
        }
        Ok(reply["error"].clone())
    }

    /// The next `{"event": "value", "sub": sub}` line.
    pub(crate) async fn value(&mut self, sub: u64, timeout: Duration) -> Result<Value, String> {
        let what = format!("value of subscription {sub}");
        self.wait(timeout, &what, |v| v["event"] == json!("value") && v["sub"] == json!(sub)).await
    }

    /// Kills the child and reaps it.
    pub(crate) async fn kill(mut self) {
        let _ = self.process.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.process.wait()).await;
    }
}
