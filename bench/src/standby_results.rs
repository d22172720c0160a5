//! The hot standby's failover row ([`failover::cluster_standby`](crate::failover::cluster_standby)):
//! its result and its targets (p50 <= 15 ms, p99 <= 30 ms, issue 26).

use crate::results::{FailoverResult, Results, Target};

impl FailoverResult {
    /// The cluster's agent with a hot standby: like [`cluster_agent`](Self::cluster_agent),
    /// the dead agent replaced by its promoted standby instead of a restart.
    pub fn cluster_standby(
        workers: usize,
        link: &'static str,
        samples_ms: Vec<f64>,
        serving_ms: Vec<f64>,
        connections_after: Vec<usize>,
        connections_max: usize,
        promotions: usize,
    ) -> Self {
        let mut sorted = samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((sorted.len() as f64) * 0.99).ceil() as usize;
        let p99 = sorted.get(rank.saturating_sub(1)).copied().unwrap_or(0.0);
        FailoverResult {
            mode: "cluster_standby",
            measures: "SIGKILL of the cluster's agent (the Leader) once its hot standby mirrors it, until every \
                       worker holds a value delivered by the promoted standby's Leader (max over workers, \
                       CLOCK_MONOTONIC); the upstream puts every 5 ms",
            restart_delay_ms: None,
            p99_ms: Some(p99),
            put_every_ms: Some(5),
            promotions: Some(promotions),
            upstream_connections_after: Some(connections_after),
            upstream_connections_max: Some(connections_max),
            duplicates_or_backwards: Some(0),
            ..FailoverResult::cluster_agent(workers, link, 0, samples_ms, serving_ms)
        }
    }
}

impl Results {
    /// The hot standby's takeover: p50 <= 15 ms and p99 <= 30 ms, over kills
    /// that were all promotions, with one upstream connection after each and
    /// nothing delivered twice or backwards.
    pub(crate) fn standby_targets(&self) -> Vec<Target> {
        let standby = self.failover.cluster_standby.as_ref();
        // Judged over 50 kills at least (a full run); fewer (--quick) are shown, not judged.
        let judged = standby.filter(|f| f.repeats >= 50);
        let sound = |f: &FailoverResult| {
            f.promotions == Some(f.repeats)
                && f.upstream_connections_max == Some(1)
                && f.upstream_connections_after.as_ref().is_some_and(|c| c.iter().all(|&n| n == 1))
                && f.duplicates_or_backwards == Some(0)
        };
        let detail = |f: &FailoverResult| {
            let judged = if f.repeats >= 50 { "" } else { " (under 50 kills: not judged)" };
            let after = f.upstream_connections_after.as_deref().unwrap_or_default();
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} kills ({} promotions), {} workers over the {}, \
                 puts every {} ms; promoted Leader serving at p50 {:.1} ms; upstream connections after each \
                 takeover: {} of {} were 1, at most {} at once; {} twice or backwards{}",
                f.p50_ms,
                f.p99_ms.unwrap_or(0.0),
                f.max_ms,
                f.repeats,
                f.promotions.unwrap_or(0),
                f.processes,
                f.link.unwrap_or("?"),
                f.put_every_ms.unwrap_or(0),
                f.agent_serving_p50_ms.unwrap_or(0.0),
                after.iter().filter(|&&n| n == 1).count(),
                after.len(),
                f.upstream_connections_max.unwrap_or(0),
                f.duplicates_or_backwards.unwrap_or(0),
                judged
            )
        };
        vec![
            Target {
                name: "standby_failover_p50",
                goal: "<= 15 ms, agent kill -9 with a hot standby, N=4 workers, >= 50 kills, all promotions, 1 \
                       upstream connection after each, 0 duplicates/backwards",
                measured: standby.map(|f| f.p50_ms),
                unit: "ms",
                met: judged.map(|f| f.p50_ms <= 15.0 && sound(f)),
                detail: standby.map_or("not measured".into(), detail),
            },
            Target {
                name: "standby_failover_p99",
                goal: "<= 30 ms, the same kills",
                measured: standby.and_then(|f| f.p99_ms),
                unit: "ms",
                met: judged.map(|f| f.p99_ms.is_some_and(|p| p <= 30.0) && sound(f)),
                detail: standby.map_or("not measured".into(), |f| {
                    let judged = if f.repeats >= 50 { "" } else { " (under 50: not judged)" };
                    format!("over {} kills{judged}", f.repeats)
                }),
            },
        ]
    }
}
