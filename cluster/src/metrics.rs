//! `/metrics`: the master serves the cluster's metrics in the Prometheus text
//! format on an address the user opts into
//! ([`Builder::metrics`](crate::Builder::metrics)). Each scrape takes a fresh
//! snapshot: the status table (RSS and CPU from `/proc`, restarts), the
//! master's own counters (reloads, routed messages) and the agent's report
//! (for a tandem agent, the Leader's stats, asked over the messenger; absent
//! when the agent does not answer within 2 seconds). The text is written by
//! the `prometheus-client` crate.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tandem_process_resident_memory_bytes` | gauge | `role`, `slot` |
//! | `tandem_process_cpu_seconds_total` | counter | `role`, `slot` |
//! | `tandem_process_up` | gauge (1 = online) | `role`, `slot` |
//! | `tandem_restarts_total` | counter | `role`, `slot` |
//! | `tandem_reloads_total` | counter (workers' and agent's reloads) | `result` (`ok`, `failed`) |
//! | `tandem_workers_desired` | gauge (the worker count asked for: configuration, then the last scale) | |
//! | `tandem_scale_total` | counter (scales that changed the worker count) | `direction` (`up`, `down`) |
//! | `tandem_restarts_requested_total` | counter (graceful restarts asked for, `tandem restart`) | `role` (`worker`, `agent`) |
//! | `tandem_standby_promotions_total` | counter (hot standbys promoted to agent, see `Config::standby`) | |
//! | `tandem_messenger_messages_total` | counter | `kind` (`send`, `request`, `reply`, `link_frame`) |
//! | `tandem_leader_epoch` | gauge | |
//! | `tandem_leader_followers` | gauge | |
//! | `tandem_leader_subscriptions` | gauge | |
//! | `tandem_leader_calls_in_flight` | gauge | |
//! | `tandem_leader_events_total` | counter (upstream events fanned out) | |
//! | `tandem_leader_conflated_total` | counter | |
//! | `tandem_upstream_up` | gauge (1 = ready) | `channel` |
//! | `tandem_leader_call_duration_seconds` | histogram | |
//! | `tandem_metrics_connections_accepted_total` | counter (served by this endpoint) | |
//! | `tandem_metrics_connections_refused_total` | counter (over its connection cap: `503`, closed) | |
//! | `tandem_metrics_connections_timed_out_total` | counter (header or idle timeout) | |
//! | `tandem_metrics_connections_open` | gauge | |
//! | `tandem_metrics_accept_errors_total` | counter (`EMFILE` and the like) | |
//! | `tandem_round_robin_lost_total` | counter (handed-off connections a worker could not receive; closed) | |
//! | `tandem_log_lines_dropped_total`, `tandem_log_bytes_written_total`, ... | with a log directory: see [`logs`](crate::logs) | |
//!
//! Every sample also carries `cluster`, the cluster's name as `tandem ls`
//! shows it ([`Builder::name`](crate::Builder::name), the executable's name by
//! default), so that the clusters of one host (or of one binary) are told
//! apart: `tandem_process_up{cluster="shop",role="worker",slot="1"} 1`.
//!
//! `slot` is `master`, `agent`, `standby` (with role `standby`, when
//! [`Config::standby`](crate::Config::standby) is on) or the worker id. The `tandem_leader_*`,
//! `tandem_upstream_up` and the histogram are absent while the agent is down.
//! The endpoint's own limits (connection cap, header and idle timeouts) are
//! [`Config::metrics_max_connections`](crate::Config::metrics_max_connections) and the two after it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::MasterHandle;
use crate::metrics_endpoint::{EndpointStats, Limits};
use crate::round_robin::RoundRobinStats;
use crate::{Error, ProcessRole};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    role: String,
    slot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

/// A histogram read from the agent's report: `buckets` are (upper bound in
/// seconds, count in that bucket only), the last bound `+Inf`.
#[derive(Debug)]
struct HistogramSnapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl HistogramSnapshot {
    /// From `{"sum_seconds": f, "count": n, "buckets": [[le, n], ...]}`.
    fn from_json(value: &Value) -> Option<Self> {
        let buckets = value
            .get("buckets")?
            .as_array()?
            .iter()
            .map(|b| Some((b.get(0)?.as_f64().unwrap_or(f64::INFINITY), b.get(1)?.as_u64()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(HistogramSnapshot {
            sum: value.get("sum_seconds")?.as_f64()?,
            count: value.get("count")?.as_u64()?,
            buckets,
        })
    }
}

type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Renders one scrape.
pub(crate) async fn render(
    handle: &MasterHandle,
    endpoint: &EndpointStats,
    round_robin: Option<&RoundRobinStats>,
) -> Result<String, String> {
    let leader = handle.agent_stats().await;
    let snapshot = handle.snapshot().await?;
    let processes = handle.processes(&snapshot, None);
    // Every sample carries the cluster's name, as `tandem ls` shows it.
    let cluster = (Cow::Borrowed("cluster"), Cow::Owned(snapshot.name.clone()));
    let mut registry = Registry::with_labels(std::iter::once(cluster));

    let rss = Family::<ProcessLabels, Gauge>::default();
    let cpu = Family::<ProcessLabels, FloatCounter>::default();
    let up = Family::<ProcessLabels, Gauge>::default();
    let restarts = Family::<ProcessLabels, Counter>::default();
    for p in &processes {
        let slot = match p.slot {
            Some(id) => id.to_string(),
            None => p.role.clone(),
        };
        let labels = ProcessLabels { role: p.role.clone(), slot };
        up.get_or_create(&labels).set(i64::from(p.state == "online"));
        if p.role != ProcessRole::Master.to_string() {
            restarts.get_or_create(&labels).inc_by(u64::from(p.restarts));
        }
        if let Some(bytes) = p.rss_bytes {
            rss.get_or_create(&labels).set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Some(seconds) = p.cpu_seconds {
            cpu.get_or_create(&labels).inc_by(seconds);
        }
    }
    registry.register("tandem_process_resident_memory_bytes", "Resident set size of each process", rss);
    registry.register("tandem_process_cpu_seconds", "CPU time (user + system) of each process", cpu);
    registry.register("tandem_process_up", "1 when the slot's process is online", up);
    registry.register("tandem_restarts", "Processes started in a slot after its first one", restarts);

    let reloads = Family::<ResultLabels, Counter>::default();
    reloads
        .get_or_create(&ResultLabels { result: "ok".into() })
        .inc_by(handle.stats.reloads_ok.load(Ordering::Relaxed));
    reloads
        .get_or_create(&ResultLabels { result: "failed".into() })
        .inc_by(handle.stats.reloads_failed.load(Ordering::Relaxed));
    registry.register("tandem_reloads", "Reloads (of the workers or the agent) by outcome", reloads);

    let desired = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    desired.set(i64::from(snapshot.workers_desired));
    registry.register(
        "tandem_workers_desired",
        "The worker count asked for (configuration or the last scale)",
        desired,
    );
    let scales = Family::<DirectionLabels, Counter>::default();
    for (direction, n) in [("up", &handle.stats.scales_up), ("down", &handle.stats.scales_down)] {
        scales.get_or_create(&DirectionLabels { direction: direction.into() }).inc_by(n.load(Ordering::Relaxed));
    }
    registry.register("tandem_scale", "Scales that changed the worker count, by direction", scales);
    let restarts_requested = Family::<RoleLabels, Counter>::default();
    for (role, n) in [("worker", &handle.stats.restarts_worker), ("agent", &handle.stats.restarts_agent)] {
        restarts_requested.get_or_create(&RoleLabels { role: role.into() }).inc_by(n.load(Ordering::Relaxed));
    }
    registry.register(
        "tandem_restarts_requested",
        "Graceful restarts of one process asked for (tandem restart), by role",
        restarts_requested,
    );

    let promotions = Counter::<u64>::default();
    promotions.inc_by(handle.stats.standby_promotions.load(Ordering::Relaxed));
    registry.register("tandem_standby_promotions", "Hot standbys promoted to agent when the agent died", promotions);

    let messages = Family::<KindLabels, Counter>::default();
    let m = snapshot.messages;
    for (kind, n) in [("send", m.send), ("request", m.request), ("reply", m.reply), ("link_frame", m.link_frame)] {
        messages.get_or_create(&KindLabels { kind: kind.into() }).inc_by(n);
    }
    registry.register("tandem_messenger_messages", "Messages the master routed, by kind", messages);

    if let Some(stats) = leader {
        let int = |field: &str| stats.get(field).and_then(Value::as_u64).unwrap_or(0);
        let gauge = |n: u64| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
            g
        };
        let counter = |n: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(n);
            c
        };
        let channels = stats.get("channels").and_then(Value::as_array).cloned().unwrap_or_default();
        let subscriptions: u64 = channels.iter().filter_map(|c| c.get("subscriptions").and_then(Value::as_u64)).sum();
        registry.register("tandem_leader_epoch", "The Leader's epoch", gauge(int("epoch")));
        registry.register("tandem_leader_followers", "Followers connected to the Leader", gauge(int("followers")));
        registry.register(
            "tandem_leader_subscriptions",
            "Upstream subscriptions (keys with a subscriber)",
            gauge(subscriptions),
        );
        registry.register("tandem_leader_calls_in_flight", "Calls running in the Leader", gauge(int("in_flight")));
        registry.register(
            "tandem_leader_events",
            "Upstream events the Leader received and fanned out to its subscribers",
            counter(int("events_sent")),
        );
        registry.register(
            "tandem_leader_conflated",
            "Events replaced before a slow follower read them",
            counter(int("conflated_events")),
        );
        let upstream = Family::<ChannelLabels, Gauge>::default();
        for c in &channels {
            let Some(name) = c.get("name").and_then(Value::as_str) else { continue };
            let ready = c.get("upstream").and_then(Value::as_str) == Some("Ready");
            upstream.get_or_create(&ChannelLabels { channel: name.to_owned() }).set(i64::from(ready));
        }
        registry.register("tandem_upstream_up", "1 when the channel's upstream client is ready", upstream);
        if let Some(h) = stats.get("call_latency").and_then(HistogramSnapshot::from_json) {
            registry.register("tandem_leader_call_duration_seconds", "Time from a call's arrival to its answer", h);
        }
    }
    endpoint.register(&mut registry);
    if let Some(logs) = &handle.stats.logs {
        logs.stats().register(&mut registry);
    }
    if let Some(round_robin) = round_robin {
        round_robin.register(&mut registry);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| e.to_string())?;
    Ok(text)
}

/// Binds `addr` and serves `/metrics` until `cancel`, within `limits` (see
/// [`metrics_endpoint`](crate::metrics_endpoint)). Returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    limits: Limits,
    handle: MasterHandle,
    round_robin: Option<Arc<RoundRobinStats>>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<SocketAddr, Error> {
    let setup = |source| Error::Control { what: "metrics endpoint", path: addr.to_string(), source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(setup)?;
    let bound = listener.local_addr().map_err(setup)?;
    let endpoint = Arc::new(EndpointStats::default());
    let stats = Arc::clone(&endpoint);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            let stats = Arc::clone(&stats);
            let round_robin = round_robin.clone();
            async move {
                match render(&handle, &stats, round_robin.as_deref()).await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        text,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
                }
            }
        }),
    );
    crate::metrics_endpoint::spawn(listener, app, limits, endpoint, tracker, cancel);
    Ok(bound)
}
