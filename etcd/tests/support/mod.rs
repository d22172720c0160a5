//! A real etcd for tests: one member or a cluster on free loopback ports, with
//! temporary data directories, killed by pid when dropped.
//!
//! Shared by this crate's tests and the root crate's `tests/etcd_*.rs` (through
//! `#[path]`). Tests that need it are `#[ignore = "needs etcd: ..."]`, so a plain
//! `cargo test` without etcd reports them ignored instead of passing them; CI
//! installs etcd and runs them with `--ignored`.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_testkit::{ProcessGuard, free_ports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The etcd binary: `$ETCD_BIN`, or `etcd` on the PATH.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("etcd")).find(|p| p.is_file()));
    found.expect("no etcd binary on the PATH: apt-get install etcd-server (or set ETCD_BIN)")
}

// Tests here log as `RUST_LOG` asks, on the test's output.
#[allow(unused_imports)] // each test binary uses some of them
pub use tandem_testkit::{eventually, within_logged as within};

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-http `/health` (and metrics), when the client URLs are https.
    metrics_port: Option<u16>,
    child: Option<ProcessGuard>,
}

/// A member's TLS settings: its certificate and key, and the CA its clients'
/// certificates must be signed by (`--client-cert-auth`).
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// One etcd member or a cluster of them, on loopback.
pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<ServerTls>,
}

impl Etcd {
    /// One member, healthy.
    pub async fn single() -> Etcd {
        Etcd::cluster(1).await
    }

    /// One member serving its clients over TLS only, and requiring client
    /// certificates signed by `tls.client_ca`; healthy.
    pub async fn single_tls(tls: ServerTls) -> Etcd {
        Etcd::start(1, Some(tls)).await
    }

    /// `n` members forming one cluster, all healthy (a leader elected).
    pub async fn cluster(n: usize) -> Etcd {
        Etcd::start(n, None).await
    }

    async fn start(n: usize, tls: Option<ServerTls>) -> Etcd {
        let dir = tempfile::Builder::new().prefix("tandem-etcd").tempdir().expect("tempdir");
        let ports = free_ports(3 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[3 * i],
                peer_port: ports[3 * i + 1],
                metrics_port: tls.as_ref().map(|_| ports[3 * i + 2]),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("tandem-test-{}", ports[0]);
        let mut etcd = Etcd { dir, members, initial_cluster, token, tls };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_healthy(i).await;
        }
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let data = self.dir.path().join(&member.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).expect("etcd log file");
        let client = self.endpoint(i);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(etcd_binary());
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Fast elections, so a killed leader is replaced within a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]);
        if let (Some(tls), Some(metrics)) = (&self.tls, member.metrics_port) {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca)
                .arg("--client-cert-auth")
                .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{metrics}")]);
        }
        command.stdin(Stdio::null()).stdout(log.try_clone().expect("log fd")).stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent;
        // it makes the kernel kill etcd if this test process dies before the guard runs.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.members[i].child = Some(ProcessGuard::new(command.spawn().expect("spawn etcd")));
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL (`https://` for a TLS member).
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The index of the member with this client URL.
    pub fn index_of(&self, endpoint: &str) -> usize {
        (0..self.members.len()).find(|&i| self.endpoint(i) == endpoint).expect("not one of ours")
    }

    /// Member `i`'s pid, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(ProcessGuard::id)
    }

    /// Kills member `i` (SIGKILL, by pid) and reaps it.
    pub fn kill(&mut self, i: usize) {
        // The guard SIGKILLs it by pid (ours, not reaped yet) and reaps it.
        drop(self.members[i].child.take());
    }

    /// Starts member `i` again with its data, and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Replaces single member `i` by a fresh etcd on the same ports with an empty
    /// data directory (as a restore or a rebuild would): its revision starts at 1
    /// again. Waits until it is healthy.
    pub async fn replace_empty(&mut self, i: usize) {
        self.kill(i);
        let data = self.dir.path().join(&self.members[i].name);
        std::fs::remove_dir_all(&data).expect("remove the member's data directory");
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Waits (at most 20 s) until member `i` answers `/health` with a leader.
    pub async fn wait_healthy(&self, i: usize) {
        let member = &self.members[i];
        let port = member.metrics_port.unwrap_or(member.client_port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if health(port).await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("etcd member {i} not healthy within 20 s; its log:\n{}", tail(&self.log_path(i)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn health(port: u16) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.ok()?;
        Some(reply.contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten().unwrap_or(false)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                eprintln!("--- etcd member {i} log (last lines) ---\n{}", tail(&self.log_path(i)));
            }
        }
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
