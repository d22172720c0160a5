//! Every figure the bench produces, the machine it ran on, and the targets
//! checked against them. This is what `--json` writes.

use std::time::Duration;

use serde::Serialize;

use crate::cli::Config;
use crate::placement::Placement;
use crate::transport::Transport;

/// One invoke phase: all followers of one group, one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct InvokeResult {
    pub transport: Transport,
    pub followers: usize,
    /// Calls in flight per follower.
    pub concurrency: usize,
    /// `os` (wherever the scheduler puts the processes) or `one_cpu` (all on CPU 0).
    pub placement: Placement,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub calls: u64,
    pub errors: u64,
    /// Times followers lost their link to the leader during the phase (at least; the floor: 0).
    pub links_lost: u64,
    /// Calls completed per second, all followers together.
    pub calls_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// One fan-out phase: one stream of events from the server to every follower.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub transport: Transport,
    pub followers: usize,
    /// `max_rate` (the publisher runs flat out) or `paced` (one event per `interval_ms`).
    pub mode: &'static str,
    pub interval_ms: Option<u64>,
    pub keys: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    /// Events the publisher emitted during the window.
    pub published: u64,
    pub published_per_sec: f64,
    /// Events/s delivered to every follower: the slowest follower's rate.
    pub delivered_per_sec_min: f64,
    pub delivered_per_sec_mean: f64,
    pub delivered_total: u64,
    /// published × followers − delivered: conflated by the leader (or skipped locally, or late).
    pub missed_total: u64,
    pub missed_ratio: f64,
    /// Per-key index gaps the followers saw (the conflated or skipped values they can name).
    pub gaps_total: u64,
    /// Times followers lost their link to the leader during the phase (at least; the floor: 0).
    pub links_lost: u64,
    /// Publish-to-receipt latency (CLOCK_MONOTONIC across processes).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// One failover mode: kill -9 of whoever leads until every subscriber has a value from its successor.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    /// `standalone` or `cluster_agent`.
    pub mode: &'static str,
    /// Processes in the group: standalone processes (the leader among them), or cluster workers.
    pub processes: usize,
    pub repeats: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
    pub samples_ms: Vec<f64>,
    pub measures: &'static str,
    /// cluster_agent: how the workers reach the agent (`messenger` or `direct`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<&'static str>,
    /// cluster_agent: the master's configured delay before restarting the agent (±10 % jitter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_delay_ms: Option<u64>,
    /// cluster_agent: kill until the new agent's Leader was serving, per repeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_serving_ms: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_serving_p50_ms: Option<f64>,
    /// cluster_agent: from the new Leader serving until the last worker held its value, per repeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_after_serving_p50_ms: Option<f64>,
    /// cluster_standby: the 99th percentile (nearest rank) of `samples_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// cluster_standby: the period of the upstream's puts, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub put_every_ms: Option<u64>,
    /// cluster_standby: takeovers by the standby that mirrored the killed agent (the rest: cold restarts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotions: Option<usize>,
    /// cluster_standby: the host's upstream connections once each takeover settled (2 s at most).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_connections_after: Option<Vec<usize>>,
    /// cluster_standby: the most upstream connections ever open at once (a standby holds none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_connections_max: Option<usize>,
    /// cluster_standby: (epoch, seq) delivered twice or backwards (any one fails the run, so 0 when reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates_or_backwards: Option<u64>,
}

/// The median (the lower middle) and the extremes of `samples`.
fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p50 = if sorted.is_empty() { 0.0 } else { sorted[(sorted.len() - 1) / 2] };
    (p50, sorted.first().copied().unwrap_or(0.0), sorted.last().copied().unwrap_or(0.0))
}

impl FailoverResult {
    pub fn new(processes: usize, samples_ms: Vec<f64>) -> Self {
        let (p50_ms, min_ms, max_ms) = summary(&samples_ms);
        FailoverResult {
            mode: "standalone",
            processes,
            repeats: samples_ms.len(),
            p50_ms,
            max_ms,
            min_ms,
            samples_ms,
            measures: "SIGKILL of the elected leader until every surviving process holds a value \
                       delivered by the next leader (max over survivors, CLOCK_MONOTONIC)",
            link: None,
            restart_delay_ms: None,
            agent_serving_ms: None,
            agent_serving_p50_ms: None,
            workers_after_serving_p50_ms: None,
            p99_ms: None,
            put_every_ms: None,
            promotions: None,
            upstream_connections_after: None,
            upstream_connections_max: None,
            duplicates_or_backwards: None,
        }
    }

    /// The cluster's agent: `samples_ms[i]` kill to last worker's value, `serving_ms[i]` kill to new Leader serving.
    pub fn cluster_agent(
        workers: usize,
        link: &'static str,
        restart_delay_ms: u64,
        samples_ms: Vec<f64>,
        serving_ms: Vec<f64>,
    ) -> Self {
        let after: Vec<f64> = samples_ms.iter().zip(&serving_ms).map(|(all, serving)| all - serving).collect();
        FailoverResult {
            mode: "cluster_agent",
            measures: "SIGKILL of the cluster's agent (the Leader) until every worker holds a value delivered \
                       by the agent the master restarts (max over workers, CLOCK_MONOTONIC); includes the \
                       master's restart delay",
            link: Some(link),
            restart_delay_ms: Some(restart_delay_ms),
            agent_serving_p50_ms: Some(summary(&serving_ms).0),
            agent_serving_ms: Some(serving_ms),
            workers_after_serving_p50_ms: Some(summary(&after).0),
            ..FailoverResult::new(workers, samples_ms)
        }
    }
}

/// Deliver-to-one on one key, followers killed and replaced during the window.
#[derive(Debug, Clone, Serialize)]
pub struct DeliverOneResult {
    /// Follower processes subscribed with `subscribe_one` (one of them being replaced after each kill).
    pub followers: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    /// The rate asked of the publisher, events/s (0: flat out).
    pub offered_rate: u64,
    /// Events the publisher sent (numbered 0..published).
    pub published: u64,
    /// The rate achieved: published / seconds (below `offered_rate` when the
    /// publisher waited in `EventSender::ready` or fell behind its schedule).
    pub published_per_sec: f64,
    /// Time the publisher spent in `EventSender::ready` (the leader's queue for the key full).
    pub publisher_waited_ms: f64,
    /// Sends the leader refused (the key dropped: nobody subscribed); each is also lost.
    pub publisher_refused: u64,
    /// Deliveries reported by the followers, copies included.
    pub received_total: u64,
    /// Distinct seqs reported.
    pub received_unique: u64,
    /// Published seqs never reported.
    pub lost: u64,
    /// The first lost seqs (at most 20).
    pub lost_first: Vec<u64>,
    /// received_total − received_unique.
    pub duplicates: u64,
    /// duplicates / published.
    pub duplicates_ratio: f64,
    /// Deliveries reported with `redelivered()` true.
    pub marked_redelivered: u64,
    /// Copies of a seq beyond the first that were not marked redelivered.
    pub unmarked_duplicates: u64,
    /// Copies whose `position()` differed from the first copy's (a redelivery keeps its position).
    pub position_changed: u64,
    /// Followers killed (SIGKILL), each replaced at once.
    pub kills: usize,
    pub kill_interval_ms: u64,
    /// The fewest live followers subscribed at a kill (the victim included).
    pub min_subscribed_at_kill: usize,
    /// From the window's end until every published seq was received (or the drain gave up).
    pub drained_after_window_ms: f64,
    /// The leader's `Stats::undelivered_dropped` at the end (queue full, or no subscriber left).
    pub leader_undelivered_dropped: u64,
    /// Distinct published seqs received per second of the window.
    pub throughput_per_sec: f64,
    pub measures: &'static str,
}

/// Both failover modes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failover {
    pub standalone: Option<FailoverResult>,
    pub cluster_agent: Option<FailoverResult>,
    /// The cluster's agent with a hot standby (`Config::standby`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_standby: Option<FailoverResult>,
}

/// Resident memory of one kind of process in one group and state.
#[derive(Debug, Clone, Serialize)]
pub struct RssSample {
    pub transport: Transport,
    pub followers: usize,
    /// `leader`, `follower`, `floor_server` or `floor_client`.
    pub process: &'static str,
    /// `idle` (connected, nothing flowing), `invoke_load` (middle of the 64-in-flight phase)
    /// or `fanout_load` (middle of the flat-out fan-out).
    pub state: &'static str,
    pub processes: usize,
    pub rss_kib_mean: u64,
    pub rss_kib_max: u64,
}

impl RssSample {
    pub fn of(
        transport: Transport,
        followers: usize,
        process: &'static str,
        state: &'static str,
        kib: &[u64],
    ) -> RssSample {
        RssSample {
            transport,
            followers,
            process,
            state,
            processes: kib.len(),
            rss_kib_mean: kib.iter().sum::<u64>() / kib.len().max(1) as u64,
            rss_kib_max: kib.iter().copied().max().unwrap_or(0),
        }
    }
}

/// One leader with many follower connections.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderAtScale {
    pub followers_target: usize,
    /// As the leader counts them (`Leader::stats().followers`).
    pub followers_connected: usize,
    pub subscribers: usize,
    pub processes: usize,
    pub leader_rss_idle_kib: u64,
    pub leader_rss_kib: u64,
    pub leader_kib_per_follower: f64,
    pub follower_process_rss_kib_mean: u64,
    pub connections_per_process: f64,
    /// (mass process RSS − a one-connection follower's idle RSS) / (connections − 1).
    pub follower_kib_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub samples: Vec<RssSample>,
    /// tandem follower RSS − floor client RSS, same N and state; the largest difference.
    pub follower_overhead_kib: Option<i64>,
    pub follower_overhead_basis: String,
    pub leader_at_scale: Option<LeaderAtScale>,
}

/// A goal from the benchmark issue, and where this run stands.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub goal: &'static str,
    pub measured: Option<f64>,
    pub unit: &'static str,
    /// None when this run could not measure it.
    pub met: Option<bool>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub memory_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub bench: &'static str,
    pub command: Vec<String>,
    pub wall_seconds: f64,
    pub machine: Machine,
    pub config: Config,
    pub invoke: Vec<InvokeResult>,
    pub fanout: Vec<FanoutResult>,
    /// `standalone` (kill -9 of the elected Leader) and `cluster_agent` (of the cluster's agent).
    pub failover: Failover,
    /// Deliver-to-one with follower kills (phase `one`).
    pub deliver_one: Option<DeliverOneResult>,
    pub memory: Memory,
    pub targets: Vec<Target>,
}

impl Results {
    pub fn new(config: Config) -> Results {
        Results {
            bench: "tandem bench/ (tandem-bench)",
            command: std::env::args().collect(),
            wall_seconds: 0.0,
            machine: Machine::current(),
            config,
            invoke: Vec::new(),
            fanout: Vec::new(),
            failover: Failover::default(),
            deliver_one: None,
            memory: Memory::default(),
            targets: Vec::new(),
        }
    }

    /// Derived figures and targets, once everything is measured.
    pub fn finish(&mut self, wall: Duration) {
        self.wall_seconds = wall.as_secs_f64();
        self.follower_overhead();
        self.per_connection();
        self.targets = self.check_targets();
    }

    /// An invoke phase with the processes where the OS put them.
    pub fn invoke_at(&self, transport: Transport, followers: usize, concurrency: usize) -> Option<&InvokeResult> {
        self.invoke_placed(transport, followers, concurrency, Placement::Os)
    }

    pub fn invoke_placed(
        &self,
        transport: Transport,
        followers: usize,
        concurrency: usize,
        placement: Placement,
    ) -> Option<&InvokeResult> {
        self.invoke.iter().find(|r| {
            r.transport == transport
                && r.followers == followers
                && r.concurrency == concurrency
                && r.placement == placement
        })
    }

    pub fn fanout_at(&self, transport: Transport, followers: usize, mode: &str) -> Option<&FanoutResult> {
        self.fanout.iter().find(|r| r.transport == transport && r.followers == followers && r.mode == mode)
    }

    pub(crate) fn rss(&self, transport: Transport, followers: usize, process: &str, state: &str) -> Option<u64> {
        self.memory
            .samples
            .iter()
            .find(|s| s.transport == transport && s.followers == followers && s.process == process && s.state == state)
            .map(|s| s.rss_kib_mean)
    }

    fn follower_overhead(&mut self) {
        let mut worst: Option<(i64, usize, &str)> = None;
        for &n in &self.config.followers {
            for state in ["idle", "invoke_load", "fanout_load"] {
                let direct = self.rss(Transport::Direct, n, "follower", state);
                let floor = self.rss(Transport::Floor, n, "floor_client", state);
                if let (Some(direct), Some(floor)) = (direct, floor) {
                    let overhead = direct as i64 - floor as i64;
                    if worst.is_none_or(|(w, _, _)| overhead > w) {
                        worst = Some((overhead, n, state));
                    }
                }
            }
        }
        if let Some((overhead, n, state)) = worst {
            self.memory.follower_overhead_kib = Some(overhead);
            self.memory.follower_overhead_basis = format!(
                "mean RSS of a tandem follower process minus that of a floor client process \
                 (same binary, runtime and load); largest over N and states: N={n}, {state}"
            );
        }
    }

    fn per_connection(&mut self) {
        let one = self.config.followers.iter().find_map(|&n| self.rss(Transport::Direct, n, "follower", "idle"));
        if let (Some(one), Some(scale)) = (one, self.memory.leader_at_scale.as_mut())
            && scale.connections_per_process > 1.0
        {
            let extra = scale.follower_process_rss_kib_mean.saturating_sub(one) as f64;
            scale.follower_kib_per_connection = Some(extra / (scale.connections_per_process - 1.0));
        }
    }

    /// The N a target is stated at, or the nearest measured one.
    pub(crate) fn nearest(&self, wanted: usize) -> usize {
        self.config.followers.iter().copied().min_by_key(|&n| n.abs_diff(wanted)).unwrap_or(wanted)
    }
}

impl Machine {
    fn current() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: uname(),
            cpu_model,
            memory_kib,
        }
    }
}

/// `uname -srvm`.
fn uname() -> String {
    // SAFETY: utsname is plain old data; all-zero bytes are a valid value.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname; uname(2) fills it with NUL-terminated strings.
    if unsafe { libc::uname(&mut name) } != 0 {
        return "unknown".into();
    }
    let field = |f: &[libc::c_char]| {
        // SAFETY: uname(2) NUL-terminates every field within its array.
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }.to_string_lossy().into_owned()
    };
    format!("{} {} {} {}", field(&name.sysname), field(&name.release), field(&name.version), field(&name.machine))
}
