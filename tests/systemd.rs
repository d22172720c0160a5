//! The master under systemd, with the real example binaries: readiness,
//! reloads, the stop and the watchdog as `sd_notify` datagrams on a socket
//! standing in for systemd's `NOTIFY_SOCKET`; one WARN for an unusable
//! `NOTIFY_SOCKET`; and a listener handed over by socket activation through
//! the real `systemd-socket-activate` (skipped, and said so, where the
//! package does not provide it).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cli::{status_json, stderr, stdout, tandem};
use common::{Proc, example, free_port, private_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixDatagram;

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);

/// The datagrams systemd would receive, read until one satisfies `done`.
struct Systemd {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Systemd {
    fn bind(dir: &Path) -> (Systemd, PathBuf) {
        let path = dir.join("notify");
        (Systemd { socket: UnixDatagram::bind(&path).expect("bind the notify socket"), seen: Vec::new() }, path)
    }

    async fn until(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + STEP;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {what} within {STEP:?}; got {:#?}", self.seen))
                .expect("recv");
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(message.clone());
            if done(&message) {
                return message;
            }
        }
    }
}

fn environ(pid: u64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).expect("read environ")).replace('\0', "\n")
}

#[tokio::test]
async fn notify_socket_hears_ready_reloading_stopping_and_the_watchdog() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let (mut systemd, path) = Systemd::bind(xdg.path());
        let name = "sd-it";
        let mut cluster = Proc::spawn_with(
            &example("config_center"),
            &["--workers", "2", "--name", name],
            &[
                ("XDG_RUNTIME_DIR", xdg.path().as_os_str()),
                ("NOTIFY_SOCKET", path.as_os_str()),
                ("WATCHDOG_USEC", "400000".as_ref()),
            ],
            false,
        );
        systemd.until("MAINPID", |m| m == format!("MAINPID={}", cluster.pid)).await;
        let ready = systemd.until("READY=1", |m| m.starts_with("READY=1")).await;
        assert!(ready.contains("\nSTATUS=ready: agent ") && ready.contains(", 2 workers"), "{ready}");
        // Fed every WATCHDOG_USEC / 2 while the master answers.
        for _ in 0..2 {
            systemd.until("WATCHDOG=1", |m| m == "WATCHDOG=1").await;
        }

        // The children are not the service's main process: none of systemd's variables reach them.
        let rows = status_json(xdg.path(), name).await;
        for row in rows.iter().filter(|r| r["role"] != "master") {
            let env = environ(row["pid"].as_u64().expect("pid"));
            assert!(env.contains("TANDEM_ROLE="), "not a child's environment: {env}");
            for key in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "LISTEN_FDS="] {
                assert!(!env.lines().any(|l| l.starts_with(key)), "{key} reached {}: {env}", row["pid"]);
            }
        }

        let out = tandem(xdg.path(), &["reload", name]).await;
        assert!(out.status.success(), "reload: {}{}", stdout(&out), stderr(&out));
        let reloading = systemd.until("RELOADING=1", |m| m.starts_with("RELOADING=1")).await;
        assert!(reloading.contains("\nMONOTONIC_USEC=") && reloading.contains("STATUS=reloading 2 workers"));
        let done = systemd.until("READY=1 after the reload", |m| m.starts_with("READY=1")).await;
        assert!(done.contains("STATUS=reloaded: 2 workers"), "{done}");

        cluster.signal(nix::sys::signal::Signal::SIGTERM);
        systemd.until("STOPPING=1", |m| m.starts_with("STOPPING=1")).await;
        assert!(cluster.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn an_unusable_notify_socket_is_one_warn_and_the_cluster_runs() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "sd-bad";
        let mut cluster = Proc::spawn_with(
            &example("config_center"),
            &["--workers", "1", "--name", name],
            &[("XDG_RUNTIME_DIR", xdg.path().as_os_str()), ("NOTIFY_SOCKET", "relative/notify".as_ref())],
            true,
        );
        common::poll_until(STEP, "the cluster's control socket", || async {
            tandem(xdg.path(), &["status", name]).await.status.success()
        })
        .await;
        let rows = common::cli::status_until(xdg.path(), name, STEP, "the cluster online", |rows| {
            rows.len() == 3 && rows.iter().all(|r| r["state"] == "online")
        })
        .await;
        assert_eq!(rows.len(), 3);
        let out = tandem(xdg.path(), &["stop", name]).await;
        assert!(out.status.success(), "stop: {}", stderr(&out));
        assert!(cluster.finish(STEP).await.success());
        let warnings = cluster.seen.iter().filter(|l| l.contains("NOTIFY_SOCKET is not a socket")).count();
        assert_eq!(warnings, 1, "{:#?}", cluster.seen);
    })
    .await
    .expect("test timed out")
}

fn socket_activate() -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|dir| dir.join("systemd-socket-activate")).find(|p| p.is_file())
}

#[tokio::test]
async fn socket_activation_hands_the_master_its_listener() {
    let Some(activate) = socket_activate() else {
        eprintln!("SKIPPED: systemd-socket-activate is not on the PATH (apt-get install systemd)");
        return;
    };
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "sd-sock";
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let http_config = example("http_config");
        let xdg_env = format!("XDG_RUNTIME_DIR={}", xdg.path().display());
        // systemd-socket-activate binds the port, and on the first connection
        // execs the master in its own place, passing the socket as "http".
        let mut cluster = Proc::spawn_with(
            &activate,
            &[
                "-l",
                &address,
                "--fdname=http",
                "-E",
                &xdg_env,
                "--",
                http_config.to_str().expect("UTF-8 path"),
                "--workers",
                "2",
                "--name",
                name,
                // Ignored for the activated listener: a listener named "http" was passed.
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
            true,
        );
        // The first connection starts the cluster and is served once a worker is ready.
        common::poll_until(STEP, "systemd-socket-activate listening", || async {
            tokio::net::TcpStream::connect(&address).await.is_ok()
        })
        .await;
        let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
        stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut response)).await.expect("an answer").unwrap();
        assert!(response.starts_with("HTTP/1.0 200") && response.ends_with("ok\n"), "{response}");

        let rows = status_json(xdg.path(), name).await;
        assert_eq!(rows[0]["pid"].as_u64(), Some(cluster.pid as u64), "the master is the activated process");
        let listening = cluster.expect_line(STEP, |l| l.contains("listening") && l.contains("listener=http")).await;
        assert!(listening.contains(&address) && listening.contains("mode=shared"), "{listening}");
        let out = tandem(xdg.path(), &["stop", name]).await;
        assert!(out.status.success(), "stop: {}", stderr(&out));
        assert!(cluster.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}
