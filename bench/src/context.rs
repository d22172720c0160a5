//! What every phase works with: the private directory, the control channel,
//! the child processes and the configuration.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cli::Config;
use crate::control::{Control, Report};
use crate::procs::Procs;

/// How long a process may take to say hello and get ready.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Everything a phase needs. Fields drop in order: children are killed before
/// the control channel closes and the directory is removed.
pub struct Ctx {
    pub procs: Procs,
    pub control: Control,
    pub config: Config,
    control_path: PathBuf,
    dir: tempfile::TempDir,
    next_group: u32,
    started: Instant,
}

impl Ctx {
    /// Makes the private directory (0700) and binds the control channel in it.
    pub fn new(config: Config, started: Instant) -> Result<Ctx> {
        let dir = tempfile::Builder::new().prefix("tandem-bench").tempdir().context("temp dir")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let control_path = dir.path().join("control.sock");
        let control = Control::bind(&control_path)?;
        Ok(Ctx { procs: Procs::default(), control, config, control_path, dir, next_group: 0, started })
    }

    /// Starts the bench itself with `args` (a role subcommand).
    pub fn spawn(&mut self, args: Vec<OsString>) -> Result<u32> {
        self.procs.spawn(&self.control_path, &args)
    }

    /// A new group number (names the group's socket, tags its processes' hellos).
    pub fn next_group(&mut self) -> u32 {
        self.next_group += 1;
        self.next_group
    }

    /// A path inside the private directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn progress(&self, message: impl std::fmt::Display) {
        eprintln!("[{:6.1} s] {message}", self.started.elapsed().as_secs_f64());
    }

    /// The pids of `count` processes of `group` in `role`, as they say hello.
    pub async fn hellos(&mut self, group: u32, role: &str, count: usize) -> Result<Vec<u32>> {
        let mut pids = Vec::with_capacity(count);
        while pids.len() < count {
            let pid = self
                .control
                .wait(STARTUP, &format!("{role} processes of group {group} to say hello"), |m| match &m.report {
                    Report::Hello { group: g, role: r, .. } if *g == group && r == role => Some(m.pid),
                    _ => None,
                })
                .await?;
            pids.push(pid);
        }
        Ok(pids)
    }

    /// Waits for `Ready` from each of `pids`.
    pub async fn ready(&mut self, pids: &[u32], what: &str) -> Result<()> {
        self.control.collect(pids, STARTUP, what, |r| matches!(r, Report::Ready).then_some(())).await?;
        Ok(())
    }
}
