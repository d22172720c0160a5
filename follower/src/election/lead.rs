//! Winning the election: the leader this process starts (warm from the
//! standby's mirror), bound to the socket, its epoch stored.

use std::fs::File;

use nix::fcntl::Flock;

use super::epoch::{read_epoch, store_epoch};
use super::lock::{FileId, still_leader};
use super::*;

impl Standalone {
    pub(super) async fn become_leader(&mut self, lock: Flock<File>, lock_id: FileId) -> Result<Leader, StartupError> {
        let epoch_file = self.dir.join(format!("{}.epoch", self.name));
        let epoch_error = |source| StartupError::Io { path: epoch_file.clone(), source };
        let succeeded = read_epoch(&epoch_file).map_err(epoch_error)?;
        let epoch = succeeded + 1;
        // The standby starts warm: its mirror's values are served at once.
        // Released at once: the followers elect a new standby (at their next
        // connect or heartbeat).
        let was_standby = self.standby.take().is_some();
        let seed = match &self.mirror {
            Some(mirror) if was_standby => warm_seed(mirror, succeeded),
            _ => Vec::new(),
        };
        let seeded = seed.len();
        let builder = Leader::builder()
            .epoch(epoch)
            .token(self.token.clone())
            .config(self.config.clone())
            .fence(still_leader(self.lock_path(), lock_id, epoch_file.clone(), epoch))
            .seed(seed);
        let leader = (self.setup)(builder).start();
        let socket = self.socket_path();
        if let Err(source) = leader.bind_unix(&socket) {
            // Leave no half-started leader (and no upstream connection) behind.
            leader.shutdown().await;
            return Err(StartupError::Bind { path: socket, source });
        }
        // Stored only once the leader serves, so failed attempts burn no epochs.
        if let Err(source) = store_epoch(&epoch_file, epoch) {
            leader.shutdown().await;
            return Err(epoch_error(source));
        }
        if was_standby && self.mirror.is_some() {
            tracing::info!(epoch, name = %self.name, keys = seeded, "the standby took over: this process is the leader, serving its mirrored values");
        } else {
            tracing::info!(epoch, name = %self.name, "won the election: this process is the leader");
        }
        self.elected = Some(Elected { leader: leader.clone(), _lock: lock });
        self.hung = None;
        Ok(leader)
    }
}

/// The entries a standby seeds its leader with, succeeding the leader of
/// epoch `succeeded`: its mirror's, if its last complete snapshot came from
/// that leader; none (a cold start) if it never had one, or had one of an
/// older leader only (it missed everything the dead leader followed).
pub(super) fn warm_seed(mirror: &crate::Mirror, succeeded: u64) -> Vec<tandem_protocol::MirrorEntry> {
    let status = mirror.status();
    match status.synced_epoch {
        Some(epoch) if epoch == succeeded => mirror.entries(),
        Some(epoch) => {
            tracing::warn!(
                mirrored = epoch,
                succeeded,
                "the standby's last complete mirror is of another leader's epoch; leading cold"
            );
            Vec::new()
        }
        None => {
            tracing::warn!(succeeded, "the standby's mirror never completed a snapshot; leading cold");
            Vec::new()
        }
    }
}
