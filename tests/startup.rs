//! Start-up mistakes fail fast with a clear message instead of looping
//! silently (issue 9 §4): the real example binaries, and the library under them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{Proc, example, field, poll_until, private_dir};
use tandem::follower::{Config, LinkState, StartupError, UnixConnector};
use tandem::registry::Server;
use tandem::registry_upstream::{ConfigApi, RegistryUpstream};
use tandem::{Api, Connection, Error, Leader, LocalConnector, Standalone, State};

const TIMEOUT: Duration = Duration::from_secs(60);
const LINE: Duration = Duration::from_secs(10);

/// Runs a binary that must fail: returns how long it ran and what it wrote.
async fn run_failing(bin: &str, args: &[&str]) -> (Duration, Vec<String>) {
    let started = Instant::now();
    let mut proc = Proc::spawn_with(&example(bin), args, &[("RUST_BACKTRACE", "0".as_ref())], true);
    let status = proc.finish(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "{bin} {args:?} should exit 1; wrote {:#?}", proc.seen);
    (took, proc.seen.clone())
}

fn assert_said(lines: &[String], needles: &[&str]) {
    assert!(
        lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
        "expected one line with {needles:?} in {lines:#?}"
    );
}

#[tokio::test]
async fn standalone_refuses_a_directory_other_users_may_enter() {
    tokio::time::timeout(TIMEOUT, async {
        let base = private_dir();
        let dir = base.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = dir.to_str().unwrap();
        // A registry nobody listens on: the mistake must be reported before any upstream matters.
        let (took, lines) =
            run_failing("standalone", &["--dir", dir, "--registry", "127.0.0.1:9", "--subscribe", "k"]).await;
        assert_said(&lines, &[dir, "0755", "chmod 700"]);
        eprintln!("standalone with a 0755 --dir exited 1 after {took:?}");
        // Refused, not changed: the directory keeps its mode.
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn standalone_refuses_a_socket_path_over_the_unix_limit_and_a_name_with_a_slash() {
    tokio::time::timeout(TIMEOUT, async {
        let base = private_dir();
        let long = base.path().join("d".repeat(110));
        let long = long.to_str().unwrap();
        let (_, lines) = run_failing("standalone", &["--dir", long, "--registry", "127.0.0.1:9"]).await;
        assert_said(&lines, &["socket path", "107-byte limit"]);

        let dir = base.path().join("run");
        let dir = dir.to_str().unwrap();
        let (_, lines) = run_failing("standalone", &["--dir", dir, "--name", "a/b", "--registry", "127.0.0.1:9"]).await;
        assert_said(&lines, &["invalid name \"a/b\"", "may not contain `/`"]);
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn invalid_arguments_are_refused_before_anything_starts() {
    tokio::time::timeout(TIMEOUT, async {
        let base = private_dir();
        let dir = base.path().join("run");
        let dir = dir.to_str().unwrap();
        let (_, lines) = run_failing("standalone", &["--dir", dir, "--subscribe", ""]).await;
        assert_said(&lines, &["--subscribe", "the key is empty"]);
        let (_, lines) = run_failing("standalone", &["--dir", dir, "--spawn", "0"]).await;
        assert_said(&lines, &["--spawn 0"]);

        let (took, lines) = run_failing("config_center", &["--workers", "0", "--registry", "127.0.0.1:9"]).await;
        assert_said(&lines, &["--workers 0", "at least one worker"]);
        eprintln!("config_center --workers 0 exited 1 after {took:?}");
        let (_, lines) = run_failing("config_center", &["--workers", "1", "--subscribe", ""]).await;
        assert_said(&lines, &["--subscribe", "the key is empty"]);
        // Nothing started: no worker line, no cluster line.
        assert!(!lines.iter().any(|l| l.starts_with("cluster ready") || l.starts_with("worker=")), "{lines:#?}");
    })
    .await
    .expect("test timed out")
}

/// The library under the examples: the driver stops at the first start-up
/// error and every call fails with it, at once.
#[tokio::test]
async fn a_standalone_connection_fails_fast_with_a_typed_error() {
    tokio::time::timeout(TIMEOUT, async {
        let base = private_dir();
        let loose = base.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        let connector = Standalone::new("app", &loose, |builder| builder);
        let connection = Connection::builder().channel::<ConfigApi>().connect(connector).spawn();
        let client = connection.client::<ConfigApi>();
        let started = Instant::now();
        let error = client.ready().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        let Error::Startup(failure) = &error else { panic!("{error:?}") };
        assert!(matches!(failure.error(), StartupError::InsecureDirectory { mode: 0o755, .. }), "{failure:?}");
        assert!(matches!(client.state(), State::Failed(_)));
        // Calls fail with the same reason, at once.
        let error = client.subscribe("k".into()).await.unwrap_err();
        assert!(matches!(error, Error::Startup(_)), "{error:?}");

        // The elected leader cannot bind (a directory sits where its socket goes): fatal too.
        let dir = base.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::create_dir(dir.join("app.sock")).unwrap();
        let connector = Standalone::new("app", &dir, |builder| builder);
        let connection = Connection::builder().channel::<ConfigApi>().connect(connector).spawn();
        let error = connection.client::<ConfigApi>().ready().await.unwrap_err();
        let Error::Startup(failure) = &error else { panic!("{error:?}") };
        assert!(matches!(failure.error(), StartupError::Bind { .. }), "{failure:?}");
        assert!(error.to_string().contains("app.sock"), "{error}");
        // The state says so too.
        assert!(matches!(&connection.status().borrow().link, LinkState::Failed(_)));
    })
    .await
    .expect("test timed out")
}

/// A follower with the wrong token is rejected once, says so, and does not
/// send the same hello again.
#[tokio::test]
async fn a_rejected_follower_stops_retrying_and_fails_calls_with_the_reason() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = private_dir();
        let socket = dir.path().join("leader.sock");
        let leader = Leader::builder().token(Some("right".into())).start();
        leader.bind_unix(&socket).unwrap();

        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = attempts.clone();
        let inner = UnixConnector::new(&socket);
        let connector = tandem::follower::FnConnector(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut inner = inner.clone();
            async move { tandem::follower::Connector::connect(&mut inner).await }
        });
        let mut config = Config::default();
        config.token = Some("wrong".into());
        config.reconnect_initial = Duration::from_millis(10);
        config.reconnect_max = Duration::from_millis(20);
        let connection = Connection::builder().config(config).channel::<ConfigApi>().connect(connector).spawn();
        let client = connection.client::<ConfigApi>();
        let error = client.ready().await.unwrap_err();
        let Error::Rejected(reason) = &error else { panic!("{error:?}") };
        assert!(!reason.message.is_empty());
        assert!(matches!(client.state(), State::Rejected(_)));
        let error = client.subscribe("k".into()).await.unwrap_err();
        assert!(matches!(error, Error::Rejected(_)), "{error:?}");
        // With a 10 ms backoff, a retrying driver would have tried ~50 times by now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 1, "the same hello was sent again");
        leader.shutdown().await;
    })
    .await
    .expect("test timed out")
}

/// The leader's reason reaches the caller in the error's own message.
#[tokio::test]
async fn a_refused_subscribe_says_why_in_one_line() {
    tokio::time::timeout(TIMEOUT, async {
        let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
        let addr = server.local_addr().to_string();
        let leader = Leader::builder()
            .channel_from::<ConfigApi, _>(async move { RegistryUpstream::connect(addr).await })
            .start();
        let connection =
            Connection::builder().channel::<ConfigApi>().connect(LocalConnector::new(leader.clone())).spawn();
        let client = connection.client::<ConfigApi>();
        client.ready().await.unwrap();
        let error = client.subscribe(String::new()).await.unwrap_err();
        assert!(error.to_string().contains("the key is empty"), "{error}");
        assert_eq!(ConfigApi::NAME, "config");
        leader.shutdown().await;
    })
    .await
    .expect("test timed out")
}

/// In standalone mode a process with the wrong token does not lock correct
/// processes out: it is rejected while a correct leader runs, and the ones it
/// rejects while it leads take over when it goes.
#[tokio::test]
async fn a_wrong_token_in_standalone_is_reported_and_never_locks_correct_processes_out() {
    tokio::time::timeout(TIMEOUT, async {
        let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
        let addr = server.local_addr().to_string();
        let dir = private_dir();
        let run = dir.path().join("run");
        let run = run.to_str().unwrap();
        let bin = example("standalone");
        let args = |token: &'static str| {
            vec!["--name", "t", "--dir", run, "--registry", &addr, "--subscribe", "k", "--token", token]
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let spawn = |token: &'static str| {
            let args = args(token);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Proc::spawn_with(&bin, &args, &[], true)
        };
        let is_role = |role: &'static str| move |l: &str| field(l, "role") == Some(role) && field(l, "key").is_none();

        let mut right = spawn("right");
        right.expect_line(LINE, is_role("leader")).await;
        let mut wrong = spawn("wrong");
        // Reported once, at ERROR, with the reason; the process keeps running.
        wrong.expect_line(LINE, |l| l.contains("ERROR") && l.contains("rejected this follower")).await;
        assert!(common::alive(wrong.pid));

        // The correct leader goes: the wrong-token process takes over (nobody else is there).
        right.signal(nix::sys::signal::Signal::SIGKILL);
        drop(right);
        wrong.expect_line(LINE, is_role("leader")).await;

        // Correct processes now are rejected by it, say so, and wait...
        let mut late = spawn("right");
        late.expect_line(LINE, |l| l.contains("ERROR") && l.contains("rejected this follower")).await;
        let mut later = spawn("right");
        later.expect_line(LINE, |l| l.contains("ERROR") && l.contains("rejected this follower")).await;
        // ...and as soon as the wrong-token process is gone, one takes over and
        // the other follows it (the socket is bound anew, maybe on the same
        // inode: the waiting ones tell a new leader by the stored epoch).
        wrong.signal(nix::sys::signal::Signal::SIGKILL);
        drop(wrong);
        let roles = |l: &str| field(l, "key").is_none() && matches!(field(l, "role"), Some("leader" | "follower"));
        let first = field(&late.expect_line(LINE, roles).await, "role").map(str::to_owned);
        let second = field(&later.expect_line(LINE, roles).await, "role").map(str::to_owned);
        let mut both = [first.as_deref(), second.as_deref()];
        both.sort();
        assert_eq!(both, [Some("follower"), Some("leader")], "one leads, the other follows");
        let errors = late.seen.iter().filter(|l| l.contains("ERROR")).count();
        assert_eq!(errors, 1, "the rejection is logged once: {:#?}", late.seen);
        poll_until(LINE, "one registry connection", || async {
            let admin = tandem::registry::RegistryClient::connect(server.local_addr().to_string().as_str()).await;
            match admin {
                Ok(admin) => admin.stats().await.map(|s| s.connections == 1).unwrap_or(false),
                Err(_) => false,
            }
        })
        .await;
    })
    .await
    .expect("test timed out")
}

/// The runtime directories in `base`.
fn runtime_dirs(base: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("tandem-"))
        .collect();
    names.sort();
    names
}

/// A master killed with SIGKILL leaves its runtime directory; the next master
/// of the same user removes it; a master stopped with SIGTERM leaves nothing.
#[tokio::test]
async fn a_starting_master_removes_the_directory_a_killed_master_left() {
    tokio::time::timeout(TIMEOUT, async {
        let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
        let addr = server.local_addr().to_string();
        let base = private_dir();
        let env = [("XDG_RUNTIME_DIR", base.path().as_os_str())];
        let args = ["--workers", "1", "--registry", &addr, "--subscribe", "k", "--write-every", "0"];
        let bin = example("config_center");

        let mut first = Proc::spawn_with(&bin, &args, &env, false);
        let ready = first.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let children: Vec<i32> = std::iter::once(field(&ready, "agent").unwrap())
            .chain(field(&ready, "workers").unwrap().split(','))
            .map(|p| p.parse().unwrap())
            .collect();
        let left = runtime_dirs(base.path());
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with(&format!("tandem-config_center-{}-", first.pid)), "{left:?}");
        first.signal(nix::sys::signal::Signal::SIGKILL);
        first.wait(LINE).await;
        poll_until(LINE, "the killed master's children to exit", || async {
            children.iter().all(|pid| !common::alive(*pid))
        })
        .await;
        assert_eq!(runtime_dirs(base.path()), left, "SIGKILL leaves the directory behind");

        let mut second = Proc::spawn_with(&bin, &args, &env, false);
        second.expect_line(LINE, |l| l.starts_with("cluster ready:")).await;
        let now = runtime_dirs(base.path());
        assert_eq!(now.len(), 1, "the dead master's directory is gone, the live one's is there: {now:?}");
        assert!(now[0].starts_with(&format!("tandem-config_center-{}-", second.pid)), "{now:?}");

        second.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(second.wait(LINE).await.success());
        assert_eq!(runtime_dirs(base.path()), Vec::<String>::new(), "a stopped master leaves nothing");
    })
    .await
    .expect("test timed out")
}
