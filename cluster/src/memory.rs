//! The memory limits ([`Config::worker_max_memory`](crate::Config::worker_max_memory),
//! [`Config::agent_max_memory`](crate::Config::agent_max_memory)), as a state
//! machine without I/O: at each sample the master hands it the slots and a
//! way to read a process's RSS, and carries out the [`Action`]s it returns.
//!
//! ```text
//! agent over its limit:  Stop{agent grace} (SIGKILL after it); restarted as after a crash
//!                        (or replaced by its ready standby)
//! standby over the agent's limit (an agent-in-waiting has the agent's limit):
//!                        Stop{agent grace} (SIGKILL after it), never promoted meanwhile;
//!                        restarted under its own crash-loop policy, the agent untouched
//! worker over its limit: replaced gracefully (a reload of that one slot), at once the
//!                        first time, after the slot's crash-loop backoff delay when it
//!                        is over its limit again soon after its start
//! ```

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::identity::SlotId;
use crate::lifecycle::{Action, Timer};
use crate::restart::Restart;
use crate::status::ProcessState;
use crate::supervisor::Slots;
use crate::{ClusterEvent, ProcessRole, WorkerId};

/// The limits, and what else runs that a sample must not disturb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub now: Instant,
    pub agent_limit: Option<u64>,
    pub worker_limit: Option<u64>,
    /// How long the agent has to stop.
    pub agent_grace: Duration,
    /// The cluster is stopping: nothing is judged.
    pub stopping: bool,
    /// The first cluster-ready was announced.
    pub announced: bool,
    /// A replacement of the workers runs.
    pub replacing: bool,
    /// A reload of the agent runs.
    pub agent_reloading: bool,
}

/// The memory limits' state.
#[derive(Debug, Default)]
pub(crate) struct MemoryLimits {
    /// When a worker over its limit may be replaced (crash-loop backoff).
    due: HashMap<WorkerId, Instant>,
    /// The agent was asked to stop for exceeding its limit (until it exits).
    agent_stopping: bool,
}

impl MemoryLimits {
    /// Whether the agent was asked to stop for its limit and has not exited yet
    /// (its stop deadline applies, not the hang detection's).
    pub(crate) fn agent_stopping(&self) -> bool {
        self.agent_stopping
    }

    /// The agent exited.
    pub(crate) fn agent_exited(&mut self) {
        self.agent_stopping = false;
    }

    /// Compares every ready child's RSS (`rss(pid)`) with its limit. A worker
    /// over its limit is counted against the slot's crash-loop backoff.
    pub(crate) fn on_sample(
        &mut self,
        slots: &mut Slots,
        sample: Sample,
        rss: impl Fn(u32) -> Option<u64>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if sample.stopping {
            return actions;
        }
        if let (Some(limit), Some(agent)) = (sample.agent_limit, slots.agent())
            && agent.state == ProcessState::Ready
            && !self.agent_stopping
            && !sample.agent_reloading
            && let Some(proc) = agent.proc.as_ref()
            && let Some(rss) = rss(proc.pid)
            && rss > limit
        {
            let (pid, key) = (proc.pid, proc.key);
            tracing::debug!(pid, rss, limit, "agent over its memory limit; stopping it (it will be restarted)");
            actions.push(Action::Stop { to: key, grace: sample.agent_grace });
            self.agent_stopping = true;
            actions.push(Action::Emit(ClusterEvent::MemoryLimit {
                role: ProcessRole::Agent,
                worker_id: None,
                pid,
                rss,
                limit,
            }));
            actions.push(Action::After(sample.agent_grace, Timer::AgentStopDeadline(key)));
        }
        actions.extend(standby_over(slots, sample, &rss));
        let Some(limit) = sample.worker_limit else { return actions };
        if sample.replacing || sample.agent_reloading || !sample.announced {
            return actions;
        }
        let now = sample.now;
        for w in slots.iter_mut().filter(|s| s.id.role() == ProcessRole::Worker) {
            let SlotId::Worker(id) = w.id else { continue };
            let Some(proc) = w.proc.as_ref().filter(|_| w.state == ProcessState::Ready && w.previous.is_none()) else {
                continue;
            };
            let pid = proc.pid;
            let Some(rss) = rss(pid) else { continue };
            if rss <= limit {
                self.due.remove(&id);
                continue;
            }
            if let Some(due) = self.due.get(&id) {
                if now < *due {
                    continue;
                }
                self.due.remove(&id);
            } else {
                let (delay, failures) = match w.crash_loop.exited() {
                    Restart::After { failures, .. } if failures <= 1 => (Duration::ZERO, failures),
                    Restart::After { delay, failures } => (delay, failures),
                    Restart::Failed { retry_after, failures } => (retry_after, failures),
                };
                actions.push(Action::Emit(ClusterEvent::MemoryLimit {
                    role: ProcessRole::Worker,
                    worker_id: Some(id),
                    pid,
                    rss,
                    limit,
                }));
                if !delay.is_zero() {
                    tracing::debug!(
                        worker.id = id,
                        pid,
                        rss,
                        limit,
                        ?delay,
                        "over the memory limit again soon after start; replacing after a backoff delay"
                    );
                    actions.push(Action::Emit(ClusterEvent::RestartScheduled {
                        role: ProcessRole::Worker,
                        worker_id: Some(id),
                        after: delay,
                        failures,
                    }));
                    self.due.insert(id, now + delay);
                    continue;
                }
            }
            tracing::debug!(worker.id = id, pid, rss, limit, "over the memory limit; replacing it gracefully");
            actions.push(Action::ReplaceOverMemory(id));
            return actions;
        }
        actions
    }
}

/// A ready standby over the agent's limit: stopped (`Stopping`, so it is not
/// promoted meanwhile), killed at the agent's stop grace if still there; its
/// exit is a crash to its slot (`Standby::on_exited`): restarted under its
/// crash-loop policy. Not during an agent reload (it stops the standby itself).
fn standby_over(slots: &Slots, sample: Sample, rss: &impl Fn(u32) -> Option<u64>) -> Vec<Action> {
    if let (Some(limit), Some(standby)) = (sample.agent_limit, slots.standby())
        && standby.state == ProcessState::Ready
        && !sample.agent_reloading
        && let Some(proc) = standby.proc.as_ref()
        && let Some(rss) = rss(proc.pid)
        && rss > limit
    {
        let (pid, key) = (proc.pid, proc.key);
        tracing::debug!(pid, rss, limit, "standby over the agent's memory limit; stopping it (it will be restarted)");
        return vec![
            Action::Emit(ClusterEvent::MemoryLimit { role: ProcessRole::Standby, worker_id: None, pid, rss, limit }),
            Action::Stop { to: key, grace: sample.agent_grace },
            Action::SetState(SlotId::Standby, ProcessState::Stopping),
            Action::After(sample.agent_grace, Timer::StandbyStopDeadline(key)),
        ];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::testing::{Fixture, kinds};

    fn sample(now: Instant) -> Sample {
        Sample {
            now,
            agent_limit: Some(100),
            worker_limit: Some(100),
            agent_grace: Duration::from_secs(5),
            stopping: false,
            announced: true,
            replacing: false,
            agent_reloading: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_over_its_limit_is_stopped_once_with_a_deadline() {
        let mut f = Fixture::ready(1);
        let mut memory = MemoryLimits::default();
        let agent = f.key(SlotId::Agent);
        let agent_pid = f.pid(agent);
        let rss = |pid: u32| Some(if pid == agent_pid { 500 } else { 10 });
        let actions = memory.on_sample(&mut f.slots, sample(Instant::now()), rss);
        assert_eq!(
            kinds(&actions),
            [format!("stop {agent:?} 5s"), "emit MemoryLimit".into(), format!("after 5s AgentStopDeadline({agent:?})")]
        );
        assert!(memory.agent_stopping());
        assert!(memory.on_sample(&mut f.slots, sample(Instant::now()), rss).is_empty(), "asked once");
        memory.agent_exited();
        assert!(!memory.agent_stopping());
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_over_the_agents_limit_is_stopped_and_not_promoted_meanwhile() {
        let mut f = Fixture::ready(1);
        assert!(f.slots.add_standby(&crate::RestartPolicy::default()));
        let standby = f.spawn(SlotId::Standby, 8);
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Ready;
        let mut memory = MemoryLimits::default();
        let standby_pid = f.pid(standby);
        let rss = |pid: u32| Some(if pid == standby_pid { 500 } else { 10 });
        let actions = memory.on_sample(&mut f.slots, sample(Instant::now()), rss);
        assert_eq!(
            kinds(&actions),
            [
                "emit MemoryLimit".to_owned(),
                format!("stop {standby:?} 5s"),
                "state standby stopping".into(),
                format!("after 5s StandbyStopDeadline({standby:?})")
            ]
        );
        assert!(!memory.agent_stopping(), "the agent is untouched");
        // Stopping: asked once, and the agent's death does not promote it.
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Stopping;
        assert!(memory.on_sample(&mut f.slots, sample(Instant::now()), rss).is_empty(), "asked once");
        let gate = crate::standby::Gate { stopping: false, agent_reloading: false };
        assert!(crate::standby::Standby::new(true).on_agent_exited(&f.slots, gate).is_none());
        // Under its limit, or no agent limit, or during an agent reload: nothing.
        f.slots.get_mut(SlotId::Standby).unwrap().state = ProcessState::Ready;
        let under = |_| Some(100);
        assert!(memory.on_sample(&mut f.slots, sample(Instant::now()), under).is_empty());
        let no_limit = Sample { agent_limit: None, ..sample(Instant::now()) };
        assert!(memory.on_sample(&mut f.slots, no_limit, rss).is_empty());
        let reloading = Sample { agent_reloading: true, ..sample(Instant::now()) };
        assert!(memory.on_sample(&mut f.slots, reloading, rss).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_over_its_limit_is_replaced_at_once_then_after_its_backoff_delay() {
        let mut f = Fixture::ready(2);
        let mut memory = MemoryLimits::default();
        let w2 = f.pid(f.key(SlotId::Worker(2)));
        let rss = |pid: u32| Some(if pid == w2 { 500 } else { 10 });
        let now = Instant::now();
        assert_eq!(
            kinds(&memory.on_sample(&mut f.slots, sample(now), rss)),
            ["emit MemoryLimit", "replace over memory 2"]
        );
        // Replaced, and over its limit again soon after start: the backoff delay first.
        let new = f.spawn(SlotId::Worker(2), 8);
        f.slots.get_mut(SlotId::Worker(2)).unwrap().state = ProcessState::Ready;
        let w2 = f.pid(new);
        let rss = |pid: u32| Some(if pid == w2 { 500 } else { 10 });
        assert_eq!(
            kinds(&memory.on_sample(&mut f.slots, sample(now), rss)),
            ["emit MemoryLimit", "emit RestartScheduled"]
        );
        assert!(memory.on_sample(&mut f.slots, sample(now), rss).is_empty(), "not due yet");
        let later = now + Duration::from_secs(60);
        assert_eq!(kinds(&memory.on_sample(&mut f.slots, sample(later), rss)), ["replace over memory 2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_judged_while_stopping_replacing_or_before_cluster_ready() {
        let mut f = Fixture::ready(1);
        let mut memory = MemoryLimits::default();
        let over = |_| Some(500);
        let now = Instant::now();
        assert!(memory.on_sample(&mut f.slots, Sample { stopping: true, ..sample(now) }, over).is_empty());
        let workers_only = Sample { agent_limit: None, ..sample(now) };
        assert!(memory.on_sample(&mut f.slots, Sample { replacing: true, ..workers_only }, over).is_empty());
        assert!(memory.on_sample(&mut f.slots, Sample { announced: false, ..workers_only }, over).is_empty());
    }
}
