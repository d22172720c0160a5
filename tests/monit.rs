//! `tandem monit` in a real terminal: the real `config_center` cluster, the
//! real `tandem` binary in a tmux session of the test's own (its own server
//! socket), driven with `send-keys` and read with `capture-pane`: the view
//! shows every process and the Leader, `r` then `y` reloads the workers, `R`
//! then `y` restarts the selected worker, `q` leaves. Skipped, and said so, where tmux is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::{status_until, stderr, tandem};
use common::{Proc, example, poll_until, private_dir};

const TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(20);

/// A tmux server of the test's own, killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-S").arg(&self.socket).args(args).stdin(Stdio::null()).output().expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "monit"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "monit"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn tmux_installed() -> bool {
    Command::new("tmux").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

async fn screen_until(tmux: &Tmux, what: &str, done: impl Fn(&str) -> bool) -> String {
    poll_until(STEP, what, || async { done(&tmux.screen()) }).await;
    tmux.screen()
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[tokio::test]
async fn monit_shows_the_cluster_reloads_restarts_the_selected_worker_and_quits() {
    if !tmux_installed() {
        eprintln!("SKIPPED: tmux is not installed (apt-get install tmux)");
        return;
    }
    tokio::time::timeout(TIMEOUT, async {
        let xdg = private_dir();
        let name = "monit-it";
        let _cluster = Proc::spawn_with_env(
            &example("config_center"),
            &["--workers", "2", "--name", name],
            &[("XDG_RUNTIME_DIR", xdg.path())],
        );
        poll_until(STEP, "the cluster answering", || async {
            tandem(xdg.path(), &["status", name]).await.status.success()
        })
        .await;
        status_until(xdg.path(), name, STEP, "every process online", |rows| {
            rows.len() == 4 && rows.iter().all(|r| r["state"] == "online")
        })
        .await;

        let tmux = Tmux { socket: xdg.path().join("tmux.sock") };
        let command = format!(
            "env XDG_RUNTIME_DIR={} {} monit {name}",
            quote(xdg.path()),
            quote(Path::new(env!("CARGO_BIN_EXE_tandem")))
        );
        let started = tmux.run(&["new-session", "-d", "-s", "monit", "-x", "110", "-y", "20", &command]);
        assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));

        let screen = screen_until(&tmux, "the view with both workers and the Leader's rates", |s| {
            s.contains("tandem monit monit-it")
                && s.matches("worker").count() >= 2
                && s.contains("master")
                && s.contains("leader: epoch 1, 2 followers")
                && s.contains("events/s")
        })
        .await;
        println!("{screen}");

        // r asks; y confirms; the reload runs and is reported.
        assert!(tmux.run(&["send-keys", "-t", "monit", "r"]).status.success());
        screen_until(&tmux, "the confirmation question", |s| s.contains("Reload every worker")).await;
        assert!(tmux.run(&["send-keys", "-t", "monit", "y"]).status.success());
        screen_until(&tmux, "the reload reported", |s| s.contains("reload done")).await;
        status_until(xdg.path(), name, STEP, "both workers replaced", |rows| {
            rows.iter().filter(|r| r["role"] == "worker").all(|r| r["restarts"] == 1 && r["state"] == "online")
        })
        .await;

        // R restarts the selected process: down twice (master, agent) to worker 1.
        for key in ["Down", "Down", "R"] {
            assert!(tmux.run(&["send-keys", "-t", "monit", key]).status.success());
        }
        screen_until(&tmux, "the restart question", |s| s.contains("Restart worker 1")).await;
        assert!(tmux.run(&["send-keys", "-t", "monit", "y"]).status.success());
        screen_until(&tmux, "the restart reported", |s| s.contains("restart of worker 1 done")).await;
        status_until(xdg.path(), name, STEP, "worker 1 restarted once more", |rows| {
            rows.iter().any(|r| r["role"] == "worker" && r["slot"] == 1 && r["restarts"] == 2 && r["state"] == "online")
        })
        .await;

        // q leaves, and the terminal session with it.
        assert!(tmux.run(&["send-keys", "-t", "monit", "q"]).status.success());
        poll_until(STEP, "monit gone", || async { !tmux.alive() }).await;

        let out = tandem(xdg.path(), &["stop", name]).await;
        assert!(out.status.success(), "stop: {}", stderr(&out));
    })
    .await
    .expect("test timed out")
}

#[tokio::test]
async fn monit_of_a_cluster_that_is_not_running_fails_before_touching_the_terminal() {
    let xdg = private_dir();
    let out = tandem(xdg.path(), &["monit", "nothing-here"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no running cluster named \"nothing-here\""), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "the terminal was touched: {:?}", String::from_utf8_lossy(&out.stdout));
}
