//! The stored epoch, `<name>.epoch`: read by every process, bumped by each new leader.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use super::*;

impl Standalone {
    /// The epoch the current leader stored (0 when none is, or it cannot be read).
    pub(super) fn stored_epoch(&self) -> u64 {
        read_epoch(&self.dir.join(format!("{}.epoch", self.name))).unwrap_or(0)
    }
}

/// The stored epoch (0 when none was stored yet).
pub(super) fn read_epoch(path: &Path) -> io::Result<u64> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if text.trim().is_empty() {
        return Ok(0);
    }
    text.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

/// Stores `epoch` atomically (write, fsync, rename; the temporary file is this
/// process's own).
pub(super) fn store_epoch(path: &Path, epoch: u64) -> io::Result<()> {
    let tmp = path.with_extension(format!("epoch.{}.tmp", std::process::id()));
    let mut file = File::create(&tmp)?;
    writeln!(file, "{epoch}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
