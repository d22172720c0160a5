//! What the control socket, the metrics and SIGUSR1 ask of the master: a
//! snapshot, a stop, the status table.

use super::Master;
use crate::ProcessRole;
use crate::control::{OpsCall, Snapshot};
use crate::status::{ProcessState, StatusRow, StatusTable, rss_bytes};

impl Master {
    // ---- control (the `tandem` CLI and the metrics) -------------------------

    pub(super) fn on_ops(&mut self, call: OpsCall) {
        match call {
            OpsCall::Snapshot(reply) => {
                let snapshot = Snapshot {
                    name: self.setup.control_name.clone(),
                    pid: self.setup.pid,
                    uptime: self.setup.started_at.elapsed(),
                    stopping: self.machines.stop.is_stopping(),
                    announced: self.progress.announced,
                    table: self.status_table(),
                    workers_desired: self.machines.scale.desired(),
                    messages: self.router.counts(),
                };
                let _ = reply.send(snapshot);
            }
            OpsCall::Stop(reply) => {
                let mut pids = vec![self.setup.pid];
                pids.extend(self.slots.iter().filter_map(|s| s.proc.as_ref()).map(|p| p.pid));
                if !self.machines.stop.is_stopping() {
                    tracing::info!("stop requested on the control socket");
                    self.begin_stop();
                }
                let _ = reply.send(pids);
            }
        }
    }

    // ---- status ------------------------------------------------------------

    /// The status table on stderr (SIGUSR1, every stop), in the format `tandem
    /// status` prints too ([`ProcessInfo::table`](crate::control::ProcessInfo::table));
    /// one JSON log event with `TANDEM_LOG=json`.
    pub(super) fn print_status(&self) {
        let table = self.status_table();
        if crate::trace::json_logs() {
            let rows = serde_json::to_string(&table.rows).unwrap_or_default();
            tracing::info!(status = %rows, "status");
        } else {
            // One write, so that no other line lands inside the table.
            let text = table.to_string();
            eprint!("{text}");
        }
    }

    pub(super) fn status_table(&self) -> StatusTable {
        let master = StatusRow {
            role: ProcessRole::Master,
            worker_id: None,
            pid: Some(self.setup.pid),
            state: if self.machines.stop.is_stopping() { ProcessState::Stopping } else { ProcessState::Ready },
            restarts: 0,
            uptime: Some(self.setup.started_at.elapsed()),
            rss_bytes: rss_bytes(self.setup.pid),
            epoch: None,
            last_exit: None,
        };
        let mut rows = vec![master];
        rows.extend(self.slots.iter().map(|s| {
            let mut row = s.status_row();
            row.last_exit = self.progress.last_exits.get(&s.id).copied();
            row
        }));
        StatusTable { rows }
    }
}
