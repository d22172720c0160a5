//! The `tandem` CLI's errors, with the real binaries: a cluster that does not
//! answer (its master stopped with SIGSTOP), a cluster of another user
//! (permission denied, whether the kernel or the master refuses), and a
//! `tandem reload` that fails and is rolled back (exit 1 with the reason) or
//! succeeds (exit 0).
//!
//! Each test gets its own `XDG_RUNTIME_DIR` (a private temp dir).

// tests/common re-exports testkit helpers that only some tests use.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cli::{closed_to, copy_for_user, status_json, stderr, stdout, tandem, tandem_as, worker_pids};
use common::{Proc, example, field, private_dir};
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);
/// The CLI's `ANSWER_TIMEOUT` (src/bin/tandem.rs).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The user the CLI runs as in the permission test, when the tests run as root.
const NOBODY: u32 = 65534;

/// Resumes a stopped process when dropped (declared after its [`Proc`], so
/// it is dropped first and the Proc's SIGTERM is handled).
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// Gives a directory back its mode 0700 when dropped, so that its master can
/// clean up and the temp dir can be removed.
struct Reopen<'a>(&'a Path);

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(self.0, std::fs::Permissions::from_mode(0o700));
    }
}

#[tokio::test]
async fn a_stopped_master_is_reported_as_not_answering() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "stuck-it";
        let mut cluster = Proc::spawn_with_env(
            &example("config_center"),
            &["--workers", "1", "--name", name],
            &[("XDG_RUNTIME_DIR", xdg.path())],
        );
        let ready = cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
        let master: i32 = field(&ready, "master").unwrap().parse().unwrap();

        // The socket is there and the kernel accepts connections, but the
        // master does not read them.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), Signal::SIGSTOP).unwrap();
        let resume = Resume(master);
        let socket = xdg.path().join("tandem").join(name).join("control.sock");
        let expected =
            format!("tandem: cluster \"{name}\" is not answering on {}: no answer within 10s\n", socket.display());
        let started = Instant::now();
        // `status` has a deadline per request; `reload` (bounded by the
        // master, not by the CLI) checks first that the master answers.
        let (status_args, reload_args) = (["status", name], ["reload", name]);
        let (status, reload) = tokio::join!(tandem(xdg.path(), &status_args), tandem(xdg.path(), &reload_args));
        let took = started.elapsed();
        for (command, out) in [("status", &status), ("reload", &reload)] {
            assert_eq!(out.status.code(), Some(1), "{command}: {}{}", stdout(out), stderr(out));
            assert_eq!(stderr(out), expected, "{command}");
            assert_eq!(stdout(out), "", "{command}");
        }
        assert!(took >= ANSWER_TIMEOUT && took < ANSWER_TIMEOUT + Duration::from_secs(10), "took {took:?}");

        // Resumed, the same master answers again: it was only not answering.
        drop(resume);
        let rows = status_json(xdg.path(), name).await;
        assert_eq!(rows[0]["pid"].as_u64(), Some(master as u64), "{rows:#?}");
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn another_users_cluster_is_permission_denied() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "theirs-it";
        let mut cluster = Proc::spawn_with(
            &example("config_center"),
            &["--workers", "1", "--name", name],
            &[("XDG_RUNTIME_DIR", xdg.path().as_os_str())],
            true,
        );
        cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;
        let clusters = xdg.path().join("tandem");

        if !nix::unistd::geteuid().is_root() {
            // Without root there is no other user to be: a directory on the
            // way closed to this user gets the same EACCES from connect().
            std::fs::set_permissions(&clusters, std::fs::Permissions::from_mode(0o000)).unwrap();
            let _reopen = Reopen(&clusters);
            let out = tandem(xdg.path(), &["status", name]).await;
            let socket = clusters.join(name).join("control.sock");
            assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
            assert!(
                stderr(&out).starts_with(&format!(
                    "tandem: permission denied on {}: the cluster belongs to another user: ",
                    socket.display()
                )),
                "{}",
                stderr(&out)
            );
            eprintln!("not root: the master's own uid check (SO_PEERCRED) is not exercised");
            return;
        }

        // The CLI runs as nobody, from a copy nobody can execute (the test
        // binary's own may sit in a checkout closed to nobody), with a
        // runtime dir of its own. Both in the temp dir: where nobody cannot
        // reach it either, this part cannot run, and says so.
        let mine = private_dir();
        let bin = tempfile::Builder::new().prefix("tandem-test").tempdir().unwrap();
        let program = match closed_to(mine.path().parent().expect("a temp dir's parent"), NOBODY) {
            Some(closed) => Err(format!("{} is closed to uid {NOBODY}", closed.display())),
            None => copy_for_user(bin.path(), NOBODY),
        };
        let program = match program {
            Ok(program) => program,
            Err(why) => {
                eprintln!("SKIPPED: the CLI cannot run as nobody ({why}): the uid checks are not exercised");
                return;
            }
        };
        std::os::unix::fs::chown(mine.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let my_clusters = mine.path().join("tandem");
        let my_socket = my_clusters.join(name).join("control.sock");

        // 1. Its clusters directory is root's (a symlink to it): the kernel
        // refuses connect() with EACCES (the directory is 0700).
        std::os::unix::fs::symlink(&clusters, &my_clusters).unwrap();
        let out = tandem_as(&program, mine.path(), &["status", name], Some(NOBODY)).await;
        assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "tandem: permission denied on {}: the cluster belongs to another user: Permission denied (os error 13)\n",
                my_socket.display()
            )
        );

        // 2. The socket itself reachable (a hard link in nobody's own
        // directories, the socket file open to all): connect() succeeds and
        // the master's SO_PEERCRED check refuses the connection; the CLI says
        // why instead of "the master closed the connection".
        std::fs::remove_file(&my_clusters).unwrap();
        for dir in [&my_clusters, &my_clusters.join(name)] {
            std::fs::create_dir(dir).unwrap();
            std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::hard_link(clusters.join(name).join("control.sock"), &my_socket).unwrap();
        std::fs::set_permissions(&my_socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        for command in ["status", "reload", "stop"] {
            let out = tandem_as(&program, mine.path(), &[command, name], Some(NOBODY)).await;
            assert_eq!(out.status.code(), Some(1), "{command}: {}{}", stdout(&out), stderr(&out));
            assert_eq!(
                stderr(&out),
                format!(
                    "tandem: permission denied on {}: the cluster belongs to another user: the master runs as uid 0, \
                     this is uid {NOBODY}\n",
                    my_socket.display()
                ),
                "{command}"
            );
        }
        // The master refused each of them itself, and still serves its own user.
        let refused = cluster
            .expect_line(STEP, |l| {
                l.contains("control connection from another user refused") && l.contains(&NOBODY.to_string())
            })
            .await;
        assert!(refused.contains("WARN"), "{refused}");
        let rows = status_json(xdg.path(), name).await;
        assert!(rows.iter().all(|r| r["state"] == "online"), "{rows:#?}");
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn tandem_reload_exits_0_on_success_and_1_with_the_reason_on_rollback() {
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let dir = private_dir();
        let program = dir.path().join("http_config");
        std::fs::copy(example("http_config"), &program).unwrap();
        let name = "reload-cli-it";
        let mut cluster =
            Proc::spawn_with_env(&program, &["--workers", "2", "--name", name], &[("XDG_RUNTIME_DIR", xdg.path())]);
        cluster.expect_line(STEP, |l| l.starts_with("cluster ready:")).await;

        // Success: exit 0, both workers replaced.
        let before = worker_pids(&status_json(xdg.path(), name).await);
        let out = tandem(xdg.path(), &["reload", name]).await;
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).ends_with("reloaded 2 workers\n"), "{}", stdout(&out));
        let reloaded = worker_pids(&status_json(xdg.path(), name).await);
        assert_eq!(reloaded.len(), 2);
        assert!(reloaded.iter().all(|p| !before.contains(p)), "{before:?} -> {reloaded:?}");

        // A broken new version (replaced on disk by rename, as a deploy does):
        // exit 1, the reason and the rollback on stderr, the workers kept.
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&broken, &program).unwrap();
        let out = tandem(xdg.path(), &["reload", name]).await;
        assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
        let why = stderr(&out);
        eprintln!("failed reload: {why}");
        assert!(why.starts_with("tandem: "), "{why}");
        assert!(why.contains("exited with code 3"), "{why}");
        assert!(why.contains("rolled back"), "{why}");
        assert_eq!(stdout(&out), "");
        assert_eq!(worker_pids(&status_json(xdg.path(), name).await), reloaded, "not rolled back");

        // The good version back: exit 0 again.
        let good = dir.path().join("good");
        std::fs::copy(example("http_config"), &good).unwrap();
        std::fs::rename(&good, &program).unwrap();
        let out = tandem(xdg.path(), &["reload", name]).await;
        assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
        let last = worker_pids(&status_json(xdg.path(), name).await);
        assert!(last.iter().all(|p| !reloaded.contains(p)), "{reloaded:?} -> {last:?}");

        let out = tandem(xdg.path(), &["stop", name]).await;
        assert!(out.status.success(), "stop failed: {}", stderr(&out));
        assert!(cluster.wait(STEP).await.success());
    })
    .await
    .expect("test timed out")
}
