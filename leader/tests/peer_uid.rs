//! The Leader's own peer check on its Unix socket (PROTOCOL.md "Peer uid"):
//! it reads the peer's credentials (`SO_PEERCRED`) when it accepts, and a
//! peer of another user is disconnected at once, without a `Reject` and
//! before a byte of it is read, and logged at WARN with its uid and pid.
//!
//! A peer of another uid needs root: the test re-runs this test binary as
//! `nobody` (uid 65534), whose one test, [`peer_child`], connects and reports
//! what the Leader answered. Run as another user, the test says it skipped.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tandem_leader::{CallContext, Events, Leader, Upstream};
use tandem_protocol::{Api, Frame, FrameCodec, Hello, PROTOCOL_VERSION, RemoteError, uuid::Uuid};
use tandem_testkit::{Lines, ProcessGuard, field, private_dir, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder};

const TIMEOUT: Duration = Duration::from_secs(20);
/// The user the refused peer runs as.
const NOBODY: u32 = 65534;
/// Where [`peer_child`] connects, when it runs as the test's child.
const PEER_SOCKET: &str = "TANDEM_TEST_PEER_SOCKET";

struct Echo;
impl Api for Echo {
    const NAME: &'static str = "echo";
    type Key = String;
    type Event = String;
    type Request = String;
    type Response = String;
}

struct EchoUpstream;
impl Upstream<Echo> for EchoUpstream {
    async fn invoke(&self, request: String, _ctx: CallContext) -> Result<String, RemoteError> {
        Ok(request)
    }
    async fn subscribe(&self, _key: String) -> Result<Events<String>, RemoteError> {
        Err(RemoteError::bad_request("no keys"))
    }
}

/// Sends a `Hello` on `path` and says what came back: `frame=<kind>` (the
/// first frame) or `closed bytes=0` (the Leader closed without a word).
async fn knock(path: &Path) -> String {
    let mut stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(error) => return format!("connect-failed error={}", error.kind()),
    };
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        peer_id: Uuid::new_v4(),
        pid: std::process::id(),
        channels: vec![Echo::NAME.into()],
        token: None,
    });
    let mut out = BytesMut::new();
    FrameCodec::new().encode(hello, &mut out).expect("encode Hello");
    // A peer closed before it was read may refuse the write: the answer is in the read.
    let _ = stream.write_all(&out).await;
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Some(frame)) = codec.decode(&mut buf) {
            return format!("frame={}", frame.kind());
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return format!("closed bytes={}", buf.len()),
            Ok(_) => {}
        }
    }
}

/// A `MakeWriter` into a shared buffer: the Leader's log, for the test to read.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;
    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

#[tokio::test]
async fn a_peer_of_another_uid_is_disconnected_without_a_word_and_logged() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED: connecting as another uid needs root (this runs as uid {}); the Leader's peer uid check did not run",
            nix::unistd::geteuid()
        );
        return;
    }
    let log = Log::default();
    let subscriber = tracing_subscriber::fmt().with_writer(log.clone()).with_ansi(false).finish();
    // This test's runtime has one thread: the Leader's tasks log here.
    let _logging = tracing::subscriber::set_default(subscriber);
    within(TIMEOUT, async {
        let dir = private_dir();
        let leader = Leader::builder().channel::<Echo, _>(EchoUpstream).start();
        // The Leader's checks hold at bind: its directory is ours and 0700.
        let path = leader.bind_unix(dir.path().join("leader.sock")).expect("bind");
        // Only then, for this test, let `nobody` reach the socket: search on the
        // directory, write on the socket (connect needs both).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();

        // The same user is welcome with the very same Hello.
        assert_eq!(knock(&path).await, "frame=Welcome");

        // The test binary may sit where `nobody` cannot run it (a checkout in
        // a 0700 directory, a target directory closed to others): run a copy
        // from a directory `nobody` can search.
        let runnable = tempfile::Builder::new().prefix("tandem-peer-uid").tempdir().unwrap();
        std::fs::set_permissions(runnable.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(closed) = closed_to_nobody(runnable.path()).or_else(|| closed_to_nobody(dir.path())) {
            println!(
                "SKIPPED: {} is closed to uid {NOBODY}, so no process of that user can reach the Leader here; \
                 the Leader's peer uid check did not run",
                closed.display()
            );
            return;
        }
        let program = runnable.path().join("peer_uid");
        std::fs::copy(std::env::current_exe().unwrap(), &program).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = Command::new(&program);
        command
            .args(["peer_child", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(PEER_SOCKET, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .uid(NOBODY)
            .gid(NOBODY);
        // Killed (by pid) and reaped on drop, pass or fail.
        let mut child = ProcessGuard::new(command.spawn().expect("spawn the test binary as nobody"));
        let mut lines = Lines::new("the peer run as nobody");
        lines.read_blocking(child.child().stdout.take().unwrap());
        // libtest prints `test peer_child ... ` first, on the same line.
        let line = lines.expect_line(Duration::from_secs(15), |l| l.contains("peer uid=")).await;
        assert_eq!(field(&line, "uid"), Some(NOBODY.to_string().as_str()), "{line}");
        assert!(line.ends_with("outcome: closed bytes=0"), "the Leader must close at once, without a Reject: {line}");
        let peer_pid = field(&line, "pid").expect("pid").to_owned();

        // Logged at WARN, naming the peer; and never a follower.
        tandem_testkit::eventually(Duration::from_secs(5), "the refusal in the Leader's log", || async {
            log.text().contains("connection from another user refused")
        })
        .await;
        let text = log.text();
        let refusal = text.lines().find(|l| l.contains("connection from another user refused")).unwrap();
        assert!(refusal.contains("WARN"), "{refusal}");
        assert!(refusal.contains(&format!("peer.uid={NOBODY}")), "{refusal}");
        assert!(refusal.contains(&format!("peer.pid={peer_pid}")), "{refusal}");
        assert_eq!(text.matches("connection from another user refused").count(), 1, "{text}");
        let stats = leader.stats();
        let nobody_pid = peer_pid.parse::<i32>().ok();
        assert!(stats.follower_list.iter().all(|f| f.pid != nobody_pid), "never a follower: {stats:?}");
        leader.shutdown().await;
    })
    .await
}

/// The refused peer: run by the test above as `nobody`; on its own it does nothing.
#[tokio::test]
#[ignore = "run as a child process (as nobody) by a_peer_of_another_uid_is_disconnected_without_a_word_and_logged"]
async fn peer_child() {
    let Ok(path) = std::env::var(PEER_SOCKET) else { return };
    let outcome = within(TIMEOUT, knock(Path::new(&path))).await;
    println!("peer uid={} pid={} outcome: {outcome}", nix::unistd::geteuid(), std::process::id());
}

/// The first directory at or above `path` that `nobody` cannot search, if any
/// (`nobody` owns none of them and is in none of their groups).
fn closed_to_nobody(path: &Path) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut at = Some(path);
    while let Some(dir) = at {
        let meta = std::fs::metadata(dir).ok()?;
        let searchable = if meta.uid() == NOBODY { meta.mode() & 0o100 != 0 } else { meta.mode() & 0o001 != 0 };
        if !searchable {
            return Some(dir.to_owned());
        }
        at = dir.parent();
    }
    None
}
