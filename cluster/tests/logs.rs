//! The log capture on the real `log_flood` example (built by `cargo test -p
//! tandem-cluster` into `target/<profile>/examples/`): a file per process
//! with that process's lines, rotation at the size, a quota the files never
//! pass while a child floods (sampled all along), drops counted in the
//! metrics when the files cannot be written, log directories that are not
//! ours refused, and more than `MAX_WORKERS` workers refused at start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_testkit::{Lines, ProcessGuard, eventually, private_dir, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
const STEP: Duration = Duration::from_secs(30);
const KIB: u64 = 1024;

fn fixture() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = profile_dir.join("examples").join("log_flood");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test -p tandem-cluster`, which builds the examples",
        path.display()
    );
    path
}

/// The fixture's master, its stdout and its stderr.
struct Flood {
    guard: ProcessGuard,
    out: Lines,
    err: Lines,
}

impl Flood {
    fn start(xdg: &Path, args: &[&str]) -> Flood {
        let mut child = Command::new(fixture())
            .args(args)
            .env("XDG_RUNTIME_DIR", xdg)
            .env_remove("RUST_LOG")
            .env_remove("TANDEM_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn log_flood");
        let (mut out, mut err) = (Lines::new("master stdout"), Lines::new("master stderr"));
        out.read_blocking(child.stdout.take().expect("stdout"));
        err.read_blocking(child.stderr.take().expect("stderr"));
        Flood { guard: ProcessGuard::with_grace(child, Duration::from_secs(5)), out, err }
    }

    fn stop(&self) {
        let pid = nix::unistd::Pid::from_raw(self.guard.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the master");
    }

    /// Waits for the master's exit; its status.
    async fn exit(&mut self) -> std::process::ExitStatus {
        let mut status = None;
        let guard = &mut self.guard;
        eventually(STEP, "the master to exit", || {
            status = guard.child().try_wait().expect("wait");
            std::future::ready(status.is_some())
        })
        .await;
        self.out.rest(STEP).await;
        self.err.rest(STEP).await;
        status.expect("exited")
    }
}

/// (name, size) of every file in `dir`, sorted; empty when `dir` is gone.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    files
}

fn total(dir: &Path) -> u64 {
    files(dir).iter().map(|(_, size)| size).sum()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// GET /metrics; the body.
async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The sum of the samples of `metric` whose labels contain every one of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn each_process_writes_its_own_file_and_the_masters_output_stays_its_own() {
    within(TEST_TIMEOUT, async {
        let xdg = private_dir();
        let logs = xdg.path().join("logs");
        let name = "files-it";
        let mut flood = Flood::start(
            xdg.path(),
            &["--name", name, "--workers", "2", "--tick-ms", "20", "--log-dir", logs.to_str().unwrap()],
        );
        flood.out.expect_line(STEP, |l| l == "ready").await;
        let dir = logs.join(name);
        eventually(STEP, "ticks in both workers' files", || {
            let ok =
                (1..=2).all(|k| read(&dir.join(format!("worker-{k}.log"))).contains(&format!("worker {k} tick 3\n")));
            std::future::ready(ok)
        })
        .await;
        for k in 1..=2 {
            let text = read(&dir.join(format!("worker-{k}.log")));
            // stdout and stderr are two pipes: their lines interleave whole, in no set order.
            assert!(text.lines().any(|l| l == format!("worker {k} started")), "{text}");
            // stderr too (the tracing line), and only this worker's lines.
            assert!(text.contains(&format!("worker {k} up")), "{text}");
            let other = 3 - k;
            assert!(!text.contains(&format!("worker {other} ")), "worker {other}'s line in worker {k}'s file:\n{text}");
        }
        assert!(std::fs::metadata(&logs).unwrap().permissions().mode() & 0o777 == 0o700);
        assert!(std::fs::metadata(dir.join("worker-1.log")).unwrap().permissions().mode() & 0o777 == 0o600);
        flood.stop();
        assert!(flood.exit().await.success());
        // The master's own output: its lines, none of its children's.
        for line in flood.out.seen.iter().chain(flood.err.seen.iter()) {
            assert!(
                !line.contains("worker 1 ") && !line.contains("worker 2 "),
                "a child's line on the master's output: {line}"
            );
        }
        // The last ticks were written before the master exited.
        let last = read(&dir.join("worker-1.log"));
        assert!(last.ends_with('\n'), "whole lines only");
    })
    .await;
}

#[tokio::test]
async fn files_rotate_at_their_size_and_a_flood_never_passes_the_quota() {
    within(TEST_TIMEOUT, async {
        let xdg = private_dir();
        let logs = xdg.path().join("logs");
        let report = xdg.path().join("report");
        std::fs::create_dir(&report).unwrap();
        let (file_size, quota) = (64 * KIB, 256 * KIB);
        let name = "quota-it";
        // 20k lines/s of 100 bytes for 3 s: 6 MB through a 256 KiB quota.
        let mut flood = Flood::start(
            xdg.path(),
            &[
                "--name",
                name,
                "--rate",
                "20000",
                "--secs",
                "3",
                "--line-bytes",
                "100",
                "--log-dir",
                logs.to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
                "--log-file-size",
                &file_size.to_string(),
                "--log-quota",
                &quota.to_string(),
            ],
        );
        let dir = logs.join(name);
        let done = report.join("worker-1.json");
        let mut samples = 0u64;
        let mut interval = tokio::time::interval(Duration::from_millis(5));
        let deadline = tokio::time::Instant::now() + STEP;
        while !done.exists() {
            let now = total(&dir);
            assert!(now <= quota, "{now} bytes in the log files, over the quota of {quota}: {:?}", files(&dir));
            samples += 1;
            assert!(tokio::time::Instant::now() < deadline, "the flood did not end");
            interval.tick().await;
        }
        assert!(samples > 100, "{samples} samples");
        let report: serde_json::Value = serde_json::from_str(&read(&done)).unwrap();
        assert_eq!(report["lines"], 60_000, "the child wrote every line it was asked to: {report}");
        // The newest lines are kept: the flood's last line reaches the active file.
        let active = dir.join("worker-1.log");
        eventually(STEP, "the flood's last line in the active file", || {
            std::future::ready(read(&active).contains("worker 1 line 59999 "))
        })
        .await;
        let names: Vec<String> = files(&dir).into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"worker-1.log".to_owned()) && names.contains(&"worker-1.log.1".to_owned()),
            "{names:?}"
        );
        for (name, size) in files(&dir) {
            assert!(size <= file_size + 1024, "{name}: {size} bytes, rotated at {file_size}");
        }
        // The oldest went, and a line says so.
        let said = names
            .iter()
            .any(|n| read(&dir.join(n)).lines().any(|l| l.contains("tandem_cluster::logs: deleted worker-1.log.")));
        assert!(said, "no line says a file was deleted: {names:?}");
        flood.stop();
        assert!(flood.exit().await.success());
        assert!(total(&dir) <= quota);
    })
    .await;
}

#[tokio::test]
async fn lines_that_cannot_be_written_are_dropped_counted_and_warned_about_once() {
    within(TEST_TIMEOUT, async {
        let xdg = private_dir();
        let logs = xdg.path().join("logs");
        let report = xdg.path().join("report");
        std::fs::create_dir(&report).unwrap();
        let name = "drops-it";
        let mut flood = Flood::start(
            xdg.path(),
            &[
                "--name",
                name,
                "--rate",
                "10000",
                "--secs",
                "4",
                "--metrics",
                "127.0.0.1:0",
                "--log-dir",
                logs.to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
                "--log-file-size",
                "65536",
                "--log-quota",
                "131072",
            ],
        );
        let line = flood.out.expect_line(STEP, |l| l.starts_with("metrics on ")).await;
        let addr = line.trim_start_matches("metrics on ").to_owned();
        let dir = logs.join(name);
        eventually(STEP, "the first lines on disk", || std::future::ready(total(&dir) > 0)).await;
        // The directory goes (as a disk that fails would): rotating, then opening, fails.
        std::fs::remove_dir_all(&dir).unwrap();
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        eventually(STEP, "drops counted in the metrics", || {
            let (addr, last) = (addr.clone(), std::sync::Arc::clone(&last));
            async move {
                let text = scrape(&addr).await;
                let dropped = sample(
                    &text,
                    "tandem_log_lines_dropped_total",
                    &["process=\"worker-1\"", "reason=\"write_failed\""],
                );
                *last.lock().unwrap() = text;
                dropped > 0
            }
        })
        .await;
        let text = last.lock().unwrap().clone();
        assert!(sample(&text, "tandem_log_bytes_written_total", &[]) > 0, "{text}");
        // The child was never held up: every line written, in time.
        eventually(STEP, "the flood's report", || std::future::ready(report.join("worker-1.json").exists())).await;
        let done: serde_json::Value = serde_json::from_str(&read(&report.join("worker-1.json"))).unwrap();
        assert_eq!(done["lines"], 40_000, "{done}");
        assert!(done["secs"].as_f64().unwrap() < 6.0, "{done}");
        flood.stop();
        assert!(flood.exit().await.success(), "the master neither crashed nor stalled");
        let warns: Vec<&String> =
            flood.err.seen.iter().filter(|l| l.contains("could not write the log files")).collect();
        assert_eq!(warns.len(), 1, "one WARN: {warns:#?}");
        assert!(warns[0].contains(" WARN "), "{}", warns[0]);
    })
    .await;
}

/// Starts the fixture with `--log-dir dir`; it must fail at start saying `why`.
async fn refused(xdg: &Path, dir: &Path, why: &str) {
    let mut flood = Flood::start(xdg, &["--name", "refused-it", "--log-dir", dir.to_str().unwrap()]);
    let status = flood.exit().await;
    assert!(!status.success(), "started with the log directory {}", dir.display());
    let err = flood.err.seen.join("\n");
    assert!(err.contains("cannot keep the logs in"), "{err}");
    assert!(err.contains(why), "{err}");
    assert!(flood.out.seen.iter().all(|l| l != "ready"), "{:?}", flood.out.seen);
}

#[tokio::test]
async fn a_log_directory_others_may_write_is_refused() {
    within(TEST_TIMEOUT, async {
        let xdg = private_dir();
        for mode in [0o777, 0o770, 0o702] {
            let dir = xdg.path().join(format!("logs-{mode:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            refused(xdg.path(), &dir, &format!("is writable by other users (mode {mode:o})")).await;
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, mode, "refused, not changed");
        }
        // Readable by others is fine (a log directory of group adm, say).
        let dir = xdg.path().join("logs-755");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut flood = Flood::start(xdg.path(), &["--name", "readable-it", "--log-dir", dir.to_str().unwrap()]);
        flood.out.expect_line(STEP, |l| l == "ready").await;
        flood.stop();
        assert!(flood.exit().await.success());
    })
    .await;
}

#[tokio::test]
async fn another_users_log_directory_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can give a directory to another user");
        return;
    }
    within(TEST_TIMEOUT, async {
        let xdg = private_dir();
        let dir = xdg.path().join("theirs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&dir, Some(nobody), None).unwrap();
        refused(xdg.path(), &dir, "belongs to uid 65534, not to this user").await;
    })
    .await;
}

#[tokio::test]
async fn more_workers_than_the_limit_are_refused_at_start() {
    within(TEST_TIMEOUT, async {
        let xdg = private_dir();
        let mut flood = Flood::start(xdg.path(), &["--name", "too-many-it", "--workers", "1025"]);
        let status = flood.exit().await;
        assert!(!status.success());
        let err = flood.err.seen.join("\n");
        assert!(err.contains("1025 workers asked for; a cluster runs at most 1024"), "{err}");
        assert!(!xdg.path().join("tandem").join("too-many-it").exists(), "nothing started: {err}");
    })
    .await;
}
