//! Who is who in a cluster: where a message goes ([`Target`]), which process
//! it came from ([`Origin`]), the current agent as workers see it, and the
//! names the master gives its slots, processes and links. A leaf: it imports
//! no other module of the crate but the roles and worker ids.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::process::{ProcessRole, WorkerId};

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Target {
    /// The master process.
    Master,
    /// The agent.
    Agent,
    /// One worker, by id.
    Worker(WorkerId),
    /// Every ready worker except the sender.
    Workers,
    /// One ready worker picked at random (not the sender, when it is a worker).
    RandomWorker,
    /// Every process (master, agent, workers) except the sender.
    All,
}

impl Target {
    /// Whether the target is a single process (requests need one).
    pub fn is_single(&self) -> bool {
        matches!(self, Target::Master | Target::Agent | Target::Worker(_) | Target::RandomWorker)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Master => f.write_str("master"),
            Target::Agent => f.write_str("agent"),
            Target::Worker(id) => write!(f, "worker {id}"),
            Target::Workers => f.write_str("all workers"),
            Target::RandomWorker => f.write_str("a random worker"),
            Target::All => f.write_str("every process"),
        }
    }
}

/// Who sent a message, as stamped by the master (a child cannot choose it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Origin {
    /// The master.
    Master {
        /// Its pid.
        pid: u32,
    },
    /// The agent.
    Agent {
        /// Its pid.
        pid: u32,
        /// Its epoch.
        epoch: u64,
    },
    /// A worker.
    Worker {
        /// Its id.
        id: WorkerId,
        /// Its pid.
        pid: u32,
    },
}

impl Origin {
    /// The sender's pid.
    pub fn pid(&self) -> u32 {
        match *self {
            Origin::Master { pid } | Origin::Agent { pid, .. } | Origin::Worker { pid, .. } => pid,
        }
    }

    /// The sender's role.
    pub fn role(&self) -> ProcessRole {
        match self {
            Origin::Master { .. } => ProcessRole::Master,
            Origin::Agent { .. } => ProcessRole::Agent,
            Origin::Worker { .. } => ProcessRole::Worker,
        }
    }

    /// The sender's worker id, when it is a worker.
    pub fn worker_id(&self) -> Option<WorkerId> {
        match *self {
            Origin::Worker { id, .. } => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Master { pid } => write!(f, "master (pid {pid})"),
            Origin::Agent { pid, epoch } => write!(f, "agent (pid {pid}, epoch {epoch})"),
            Origin::Worker { id, pid } => write!(f, "worker {id} (pid {pid})"),
        }
    }
}

/// The current agent, as workers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its pid.
    pub pid: u32,
    /// Its epoch: strictly higher for every agent the master starts.
    pub epoch: u64,
    /// Its Leader's socket.
    pub socket: PathBuf,
    /// Whether it is up. False between its death and its successor's readiness;
    /// the other fields then still describe the dead one.
    pub up: bool,
}

/// A supervised position: the agent, or worker `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SlotId {
    Agent,
    Worker(WorkerId),
    /// The agent's hot standby (an agent process; see `standby`).
    Standby,
}

impl SlotId {
    pub(crate) fn role(self) -> ProcessRole {
        match self {
            SlotId::Agent => ProcessRole::Agent,
            SlotId::Worker(_) => ProcessRole::Worker,
            SlotId::Standby => ProcessRole::Standby,
        }
    }

    /// The role the process is started in (`TANDEM_ROLE`, `Init::role`): a
    /// standby is an agent process.
    pub(crate) fn spawn_role(self) -> ProcessRole {
        match self {
            SlotId::Standby => ProcessRole::Agent,
            other => other.role(),
        }
    }

    pub(crate) fn worker_id(self) -> Option<WorkerId> {
        match self {
            SlotId::Agent | SlotId::Standby => None,
            SlotId::Worker(id) => Some(id),
        }
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotId::Agent => f.write_str("agent"),
            SlotId::Standby => f.write_str("standby"),
            SlotId::Worker(id) => write!(f, "worker {id}"),
        }
    }
}

/// One process of a slot: the slot plus a generation unique in the master's life
/// (pids are reused; generations are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ProcKey {
    pub slot: SlotId,
    pub generation: u64,
}

/// A link's id, unique within one master's life.
pub(crate) type LinkId = u64;
