//! Where a group's processes may run during a phase (the `cpus` of an invoke row).

use serde::Serialize;

/// Where the scheduler may run a group's processes during a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Wherever the OS puts them (the usual figures).
    Os,
    /// Every thread of every process of the group on CPU 0: no cross-CPU
    /// wake-ups, which on a VM can cost more than the software being measured.
    OneCpu,
}
