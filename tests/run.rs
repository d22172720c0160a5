//! `tandem run`: the real `tandem` binary running a Python program
//! (`tests/run_support/app.py`, standard library only) as its workers: socket
//! passing by systemd's convention, readiness through NOTIFY_SOCKET or after
//! a delay, a program that cannot start, every bad input, a reload under
//! keep-alive load, a rollback, and `tandem.toml`.
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir), so the
//! cluster names never collide.

mod common;
#[path = "common/http_load.rs"]
mod http_load;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cli::{status_json, stderr, stdout, tandem};
use common::{Proc, field, poll_until, private_dir};
use http_load::{Load, get};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);
/// The keep-alive load of the reload test.
const LOAD: http_load::Config =
    http_load::Config { clients: 4, max_requests: 200_000, path: "/", per_connection: None };

fn tandem_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tandem"))
}

fn app() -> PathBuf {
    assert!(
        std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success()),
        "these tests run a Python program: install python3 (.ci/run does)"
    );
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/run_support/app.py")
}

/// `tandem run ARGS` with this runtime dir and extra environment; its output kept (stderr too).
fn run(xdg: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut all: Vec<(&str, &OsStr)> = vec![("XDG_RUNTIME_DIR", xdg.as_os_str())];
    all.extend(env.iter().map(|(k, v)| (*k, OsStr::new(*v))));
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let _fork = common::cli::forking();
    Proc::spawn_with(tandem_bin(), &full, &all, true)
}

/// Waits for `listening on ADDR (NAME)` and returns ADDR.
async fn listening(proc: &mut Proc) -> String {
    let line = proc.expect_line(STEP, |l| l.starts_with("listening on ")).await;
    line.trim_start_matches("listening on ").split(' ').next().unwrap().to_owned()
}

/// The `app:` start lines of `n` programs.
async fn app_lines(proc: &mut Proc, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    while lines.len() < n {
        lines.push(proc.expect_line(STEP, |l| l.starts_with("app: worker=")).await);
    }
    lines
}

/// A line already seen, or the next one, that matches.
async fn seen_or_next(proc: &mut Proc, matches: impl Fn(&str) -> bool) -> String {
    match proc.seen.iter().find(|l| matches(l)) {
        Some(line) => line.clone(),
        None => proc.expect_line(STEP, matches).await,
    }
}

/// The body of `GET path` on a new connection (`Connection: close`).
async fn http_get(addr: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The RSS of one process, from /proc.
fn own_rss(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap().unwrap() as u64;
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * page
}

/// The pid's parent.
fn parent(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn programs_get_the_sockets_by_systemds_convention_serve_them_and_status_counts_them() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let args = [
            "--name",
            "web",
            "--workers",
            "2",
            "--listen",
            "http=127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--",
            app.to_str().unwrap(),
        ];
        let mut proc = run(xdg.path(), &args, &[]);
        let addr = listening(&mut proc).await;
        let metrics = seen_or_next(&mut proc, |l| l.starts_with("metrics on ")).await;
        let metrics = metrics.trim_start_matches("metrics on ").to_owned();
        let lines = app_lines(&mut proc, 2).await;
        let mut ids = Vec::new();
        let mut programs = HashSet::new();
        for line in &lines {
            // The app itself checked LISTEN_FDS >= 1 and LISTEN_PID == its pid (else it exits 3).
            assert_eq!(field(line, "listen_fds"), Some("1"), "{line}");
            assert_eq!(field(line, "names"), Some("http"), "{line}");
            assert_eq!(field(line, "leader"), Some("yes"), "{line}");
            assert_eq!(field(line, "token"), Some("yes"), "{line}");
            assert_eq!(field(line, "role"), Some("-"), "the cluster's own variables are not passed: {line}");
            ids.push(field(line, "worker").unwrap().to_owned());
            programs.insert(field(line, "pid").unwrap().parse::<u32>().unwrap());
        }
        ids.sort();
        assert_eq!(ids, ["1", "2"]);
        seen_or_next(&mut proc, |l| l.starts_with("ready: 2 workers")).await;
        // Both programs answer on the one port.
        let mut served = HashSet::new();
        for _ in 0..2000 {
            let answer = get(&addr, "/").await.unwrap();
            assert_eq!((answer.status, answer.body.as_str()), (200, "hello"));
            served.insert(answer.pid.expect("x-worker-pid"));
            if served == programs {
                break;
            }
        }
        assert_eq!(served, programs);
        // A worker's row is its shim (the program's parent), and its RSS counts the program too.
        let rows = status_json(xdg.path(), "web").await;
        for program in &programs {
            let shim = parent(*program);
            let row = rows.iter().find(|r| r["pid"].as_u64() == Some(u64::from(shim))).expect("the shim's row");
            assert_eq!(row["role"], "worker");
            let rss = row["rss_bytes"].as_u64().unwrap();
            let floor = (own_rss(shim) + own_rss(*program)) * 9 / 10;
            assert!(rss >= floor, "worker row RSS {rss} counts the shim and the program ({floor} at least)");
        }
        // The metrics count the programs too: each worker's RSS is above its program's own.
        let scrape = http_get(&metrics, "/metrics").await;
        for program in &programs {
            let id = lines.iter().find(|l| field(l, "pid") == Some(&program.to_string()[..])).unwrap();
            let slot = field(id, "worker").unwrap();
            let name =
                format!("tandem_process_resident_memory_bytes{{cluster=\"web\",role=\"worker\",slot=\"{slot}\"}} ");
            let line = scrape.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{name} in {scrape}"));
            let rss: f64 = line[name.len()..].trim().parse().unwrap();
            assert!(rss > own_rss(*program) as f64, "{line}: above the program's own RSS");
        }
        proc.signal(Signal::SIGTERM);
        assert!(proc.finish(STEP).await.success());
        for program in &programs {
            let stopped = format!("app: pid={program} stopped");
            assert!(proc.seen.iter().any(|l| l == &stopped), "{program} stopped on SIGTERM: {:#?}", proc.seen);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_program_that_never_sends_ready_fails_its_start_and_the_run_ends_with_a_clear_error() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let args =
            ["--workers", "1", "--listen", "127.0.0.1:0", "--ready-timeout", "700ms", "--", app.to_str().unwrap()];
        let mut proc = run(xdg.path(), &args, &[("APP_MODE", "silent")]);
        let status = proc.finish(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "{:#?}", proc.seen);
        let text = proc.seen.join("\n");
        assert!(text.contains("did not send READY=1 on NOTIFY_SOCKET within 700ms"), "{text}");
        assert!(text.contains("--ready DELAY"), "the fix is named: {text}");
        assert!(text.contains("exited 4 times in a row") && text.contains("giving up"), "{text}");
        assert!(text.contains("last exit: code 3"), "{text}");
        assert!(!proc.seen.iter().any(|l| l.starts_with("ready: ")), "never counted ready: {text}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_ready_delay_a_program_without_notify_is_ready_after_it() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let args = [
            "--name",
            "delay",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--ready",
            "300ms",
            "--",
            app.to_str().unwrap(),
        ];
        let mut proc = run(xdg.path(), &args, &[("APP_MODE", "silent")]);
        let addr = listening(&mut proc).await;
        seen_or_next(&mut proc, |l| l.starts_with("ready: 1 workers")).await;
        assert!(proc.seen.iter().any(|l| l.contains("program counted ready: running 300ms after its start")));
        assert_eq!(get(&addr, "/").await.unwrap().status, 200);
        let out = tandem(xdg.path(), &["stop", "delay"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_program_that_exits_at_once_ends_the_run_with_its_exit_code_named() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let started = std::time::Instant::now();
        let mut proc = run(xdg.path(), &["--workers", "2", "--", app.to_str().unwrap()], &[("APP_MODE", "exit")]);
        let status = proc.finish(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "{:#?}", proc.seen);
        let text = proc.seen.join("\n");
        assert!(text.contains("exited 4 times in a row before it was ready"), "{text}");
        assert!(text.contains("last exit: code 7") && text.contains("giving up"), "{text}");
        assert!(proc.seen.iter().filter(|l| *l == "app: exiting at once").count() >= 4, "{text}");
        assert!(started.elapsed() < Duration::from_secs(20), "fails fast: {:?}", started.elapsed());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_program_that_exits_with_111_before_ready_is_named_not_read_as_an_ipc_mismatch() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        // 111 is also the code of a tandem worker of another IPC version.
        let mut proc = run(xdg.path(), &["--workers", "1", "--", "/bin/sh", "-c", "exit 111"], &[]);
        let status = proc.finish(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "{:#?}", proc.seen);
        let text = proc.seen.join("\n");
        assert!(text.contains("last exit: code 111") && text.contains("giving up"), "{text}");
        let failed: Vec<&String> = proc.seen.iter().filter(|l| l.starts_with("start failed: worker 1")).collect();
        assert!(failed.len() >= 2, "{text}");
        for line in failed {
            assert!(line.ends_with("exited with code 111 before it was ready"), "{line}");
        }
        assert!(!text.contains("IPC version"), "{text}");
    })
    .await
    .expect("test timed out");
}

/// `tandem run ARGS` in `dir`, which must fail with exit code 2 at once; its stderr.
async fn usage_error(dir: &Path, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(tandem_bin());
    command.arg("run").args(args).current_dir(dir).env("XDG_RUNTIME_DIR", dir).kill_on_drop(true);
    let child = {
        let _fork = common::cli::forking();
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let out = tokio::time::timeout(STEP, child.wait_with_output()).await.expect("exits at once").unwrap();
    assert_eq!(out.status.code(), Some(2), "tandem run {args:?}: {}\n{}", stdout(&out), stderr(&out));
    stderr(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_fails_fast_with_exit_code_2_and_a_message_naming_it() {
    tokio::time::timeout(TIMEOUT, async {
        let dir = private_dir();
        let d = dir.path();
        let text = |path: &str, content: &str| {
            let _fork = common::cli::forking();
            std::fs::write(d.join(path), content).unwrap();
        };
        text("not-executable.sh", "#!/bin/sh\n");
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--", "/nonexistent/app"], "program /nonexistent/app: No such file"),
            (vec!["--", "./not-executable.sh"], "is not executable (mode 644)"),
            (vec!["--", "no-such-program-tandem-test"], "\"no-such-program-tandem-test\" not found in PATH"),
            (vec!["--workers", "0", "--", "true"], "--workers 0"),
            (vec![], "no program to run"),
            (vec!["--listen", "127.0.0.1:notaport", "--", "true"], "listener listen0"),
            (
                vec!["--listen", "a=127.0.0.1:0", "--listen", "a=127.0.0.1:0", "--", "true"],
                "two listeners are named \"a\"",
            ),
            (vec!["--ready", "soon", "--", "true"], "`ready` is `notify`"),
            (vec!["--put", "k=v", "--registry", "127.0.0.1:1", "--", "true"], "seeds the embedded registry"),
            (vec!["--name", "bad/name", "--", "true"], "--name"),
            (vec!["--config", "missing.toml", "--", "true"], "cannot read missing.toml"),
            (vec!["--bogus-flag"], "--bogus-flag"),
        ];
        for (args, expected) in cases {
            let message = usage_error(d, &args).await;
            assert!(message.contains(expected), "tandem run {args:?}: {message:?} lacks {expected:?}");
        }
        text("bad.toml", "workers = [\n");
        assert!(usage_error(d, &["--config", "bad.toml"]).await.contains("bad.toml"));
        text("unknown.toml", "command = [\"true\"]\nworkerz = 2\n");
        let message = usage_error(d, &["--config", "unknown.toml"]).await;
        assert!(message.contains("unknown field `workerz`"), "{message}");
        text("nested.toml", "command = [\"true\"]\n[[listen]]\naddress = \"127.0.0.1:0\"\nmod = \"shared\"\n");
        assert!(usage_error(d, &["--config", "nested.toml"]).await.contains("unknown field `mod`"));
        text("rr.toml", "command = [\"true\"]\n[[listen]]\naddress = \"127.0.0.1:0\"\nmode = \"round-robin\"\n");
        assert!(usage_error(d, &["--config", "rr.toml"]).await.contains("round-robin"));
        text("tandem.toml", "command = [\"true\"]\n[env.staging]\nA = \"1\"\n");
        let message = usage_error(d, &["--env", "production"]).await;
        assert!(message.contains("no [env.production] table") && message.contains("staging"), "{message}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_keep_alive_load_fails_no_request_and_a_broken_one_is_rolled_back() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let flag = xdg.path().join("broken");
        let args = ["--name", "reload", "--workers", "2", "--listen", "127.0.0.1:0", "--", app.to_str().unwrap()];
        let mut proc = run(xdg.path(), &args, &[("APP_FAIL_IF_EXISTS", flag.to_str().unwrap())]);
        let addr = listening(&mut proc).await;
        seen_or_next(&mut proc, |l| l.starts_with("ready: 2 workers")).await;
        let load = Load::start(&addr, LOAD);
        load.more(200).await;
        let before: HashSet<u32> = load.seen.pids.lock().await.clone();
        let out = tandem(xdg.path(), &["reload", "reload"]).await;
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("reloaded 2 workers"), "{}", stdout(&out));
        load.seen.mark().await;
        load.more(200).await;
        let after = load.seen.pids_after_mark.lock().await.clone();
        assert!(after.is_disjoint(&before), "after the reload only new programs answer: {after:?} vs {before:?}");

        // A new version that cannot start: the reload fails, the running programs keep serving.
        {
            let _fork = common::cli::forking();
            std::fs::write(&flag, "").unwrap();
        }
        let rows = status_json(xdg.path(), "reload").await;
        let out = tandem(xdg.path(), &["reload", "reload"]).await;
        assert_eq!(out.status.code(), Some(1), "{}\n{}", stdout(&out), stderr(&out));
        load.more(200).await;
        let still = status_json(xdg.path(), "reload").await;
        let pids = |rows: &[serde_json::Value]| {
            rows.iter().filter(|r| r["role"] == "worker").map(|r| r["pid"].as_u64()).collect::<Vec<_>>()
        };
        assert_eq!(pids(&still), pids(&rows), "rolled back: the same workers run");
        let seen = load.finish().await;
        assert_eq!(seen.failed.load(Ordering::Relaxed), 0, "failed requests: {:?}", seen.errors.lock().await);
        proc.signal(Signal::SIGTERM);
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_come_from_tandem_toml_in_the_working_directory_with_env_and_flags_on_top() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let toml = format!(
            "name = \"fromfile\"\nworkers = 1\ncommand = [{:?}]\nready = \"notify\"\n\
             [[listen]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nmode = \"shared\"\n\
             [env]\nAPP_GREETING = \"from-the-file\"\nAPP_ENV = \"base\"\n\
             [env.production]\nAPP_ENV = \"production\"\n",
            app.to_str().unwrap()
        );
        {
            let _fork = common::cli::forking();
            std::fs::write(xdg.path().join("tandem.toml"), toml).unwrap();
        }
        // `sh -c 'cd DIR && exec tandem run ...'`: the master runs in DIR, with the shell's pid.
        let script = format!("cd {:?} && exec {:?} run --env production --workers 2", xdg.path(), tandem_bin());
        let mut proc = {
            let _fork = common::cli::forking();
            Proc::spawn_with(
                Path::new("/bin/sh"),
                &["-c", &script],
                &[("XDG_RUNTIME_DIR", xdg.path().as_os_str())],
                true,
            )
        };
        let addr = listening(&mut proc).await;
        assert!(proc.seen.iter().any(|l| l.ends_with("(web)")), "{:#?}", proc.seen);
        for line in app_lines(&mut proc, 2).await {
            assert_eq!(field(&line, "env"), Some("production"), "{line}");
            assert_eq!(field(&line, "names"), Some("web"), "{line}");
        }
        assert_eq!(get(&addr, "/").await.unwrap().body, "from-the-file");
        // A scale waits for the cluster's start to be over.
        seen_or_next(&mut proc, |l| l.starts_with("ready: 2 workers")).await;
        let rows = status_json(xdg.path(), "fromfile").await;
        assert_eq!(rows.iter().filter(|r| r["role"] == "worker").count(), 2, "--workers 2 overrides the file's 1");
        // A shared listener lets `tandem scale` add programs (reuseport binds one socket per slot at start).
        let out = tandem(xdg.path(), &["scale", "fromfile", "3"]).await;
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        let third = app_lines(&mut proc, 1).await.remove(0);
        assert_eq!(field(&third, "worker"), Some("3"), "{third}");
        assert_eq!(field(&third, "env"), Some("production"), "the master's settings: {third}");
        let out = tandem(xdg.path(), &["stop", "fromfile"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_program_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        let args = ["--name", "stubborn", "--workers", "1", "--listen", "127.0.0.1:0", "--stop-timeout", "500ms", "--"];
        let mut args = args.to_vec();
        args.push(app.to_str().unwrap());
        let mut proc = run(xdg.path(), &args, &[("APP_IGNORE_SIGTERM", "1")]);
        let line = app_lines(&mut proc, 1).await.remove(0);
        let program: u32 = field(&line, "pid").unwrap().parse().unwrap();
        seen_or_next(&mut proc, |l| l.starts_with("ready: 1 workers")).await;
        let started = std::time::Instant::now();
        let out = tandem(xdg.path(), &["stop", "stubborn"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the stop timeout, not the cluster's: {:?}",
            started.elapsed()
        );
        assert!(!common::alive(program), "the program {program} was killed");
        assert!(proc.finish(STEP).await.success());
        let killed = "the program did not exit within 500ms of SIGTERM: SIGKILL";
        assert!(proc.seen.iter().any(|l| l.contains(killed)), "{:#?}", proc.seen);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_limit_counts_the_program_and_replaces_its_worker() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let app = app();
        // The shim alone is far below 48 MiB; the program holds 64 MiB.
        let args = ["--name", "heavy", "--workers", "1", "--listen", "127.0.0.1:0", "--max-memory", "48", "--"];
        let mut args = args.to_vec();
        args.push(app.to_str().unwrap());
        let mut proc = run(xdg.path(), &args, &[("APP_ALLOC_MIB", "64")]);
        let line = proc.expect_line(STEP, |l| l.starts_with("memory limit: ")).await;
        let rss: f64 = field(&line, "rss_mib").unwrap().parse().unwrap();
        assert!(rss >= 64.0, "the worker's RSS counts its program's 64 MiB: {line}");
        let replaced = proc.expect_line(STEP, |l| l.starts_with("worker replaced:")).await;
        assert!(replaced.contains("reason=max-memory"), "{replaced}");
        let out = tandem(xdg.path(), &["stop", "heavy"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_registry_the_leader_holds_the_one_connection_to_it() {
    tokio::time::timeout(TIMEOUT, async {
        let (_registry, address) = common::serve_registry("127.0.0.1:0", &[]).await;
        let xdg = private_dir();
        let app = app();
        let args = ["--name", "ext", "--workers", "3", "--listen", "127.0.0.1:0", "--registry", &address, "--"];
        let mut args = args.to_vec();
        args.push(app.to_str().unwrap());
        let mut proc = run(xdg.path(), &args, &[]);
        seen_or_next(&mut proc, |l| l.starts_with("ready: 3 workers")).await;
        assert!(!proc.seen.iter().any(|l| l.starts_with("registry on ")), "no embedded registry with --registry");
        let client = tandem::registry::RegistryClient::connect(address.as_str()).await.unwrap();
        poll_until(STEP, "the Leader's registry connection", || async {
            client.stats().await.is_ok_and(|s| s.connections == 1)
        })
        .await;
        let out = tandem(xdg.path(), &["stop", "ext"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(proc.finish(STEP).await.success());
    })
    .await
    .expect("test timed out");
}
