//! The table printed on stdout.

use std::fmt::Write;

use crate::placement::Placement;
use crate::results::Results;
use crate::transport::Transport;

pub fn render(r: &Results) -> String {
    let mut out = String::new();
    let c = &r.config;
    let _ = writeln!(
        out,
        "tandem bench: {} ({} cores), {}\npayload {} B, {} s phases, server runtime {} threads, {}\n",
        r.machine.cpu_model,
        r.machine.cores,
        r.machine.kernel,
        c.payload_bytes,
        c.seconds,
        c.server_threads,
        if c.quick { "--quick" } else { "full run" }
    );
    invoke(&mut out, r);
    fanout(&mut out, r);
    deliver_one(&mut out, r);
    failover(&mut out, r);
    memory(&mut out, r);
    targets(&mut out, r);
    out
}

fn invoke(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "INVOKE (echo upstream; calls/s summed over the followers; lost: times followers lost their link to the leader)"
    );
    let _ = writeln!(
        out,
        "  {:<9} {:>3} {:>9} {:>8} {:>12} {:>9} {:>9} {:>9} {:>7} {:>5}   vs floor (calls/s, p50)",
        "transport", "N", "in flight", "cpus", "calls/s", "p50 us", "p99 us", "p999 us", "errors", "lost"
    );
    let mut rows: Vec<_> = r.invoke.iter().collect();
    rows.sort_by_key(|x| (x.placement as u8, x.concurrency, x.followers, x.transport as u8));
    for x in rows {
        let floor = r.invoke_placed(Transport::Floor, x.followers, x.concurrency, x.placement);
        let mut versus = match (x.transport, floor) {
            (Transport::Floor, _) | (_, None) => String::new(),
            (_, Some(f)) => format!("{:.2}x, {:.2}x", x.calls_per_sec / f.calls_per_sec, x.p50_us / f.p50_us),
        };
        let direct = r.invoke_placed(Transport::Direct, x.followers, x.concurrency, x.placement);
        if let (Transport::Messenger | Transport::Tonic | Transport::Tarpc, Some(d)) = (x.transport, direct) {
            let _ = write!(
                versus,
                "{}vs direct {:.2}x, {:.2}x",
                if versus.is_empty() { "" } else { "; " },
                x.calls_per_sec / d.calls_per_sec,
                x.p50_us / d.p50_us
            );
        }
        let _ = writeln!(
            out,
            "  {:<9} {:>3} {:>9} {:>8} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>5}   {}",
            x.transport.to_string(),
            x.followers,
            x.concurrency,
            match x.placement {
                Placement::Os => "any",
                Placement::OneCpu => "cpu 0",
            },
            x.calls_per_sec,
            x.p50_us,
            x.p99_us,
            x.p999_us,
            x.errors,
            x.links_lost,
            versus
        );
    }
    out.push('\n');
}

fn fanout(out: &mut String, r: &Results) {
    let c = &r.config;
    let _ = writeln!(
        out,
        "FAN-OUT (one stream over {} keys; flat out: events/s; paced: one event per {} ms, publish-to-receipt)",
        c.fanout_keys, c.fanout_interval_ms
    );
    let _ = writeln!(
        out,
        "  {:<9} {:>3} {:>13} {:>15} {:>13} {:>9} {:>5} {:>10} | {:>10} {:>10} {:>10} {:>5}",
        "transport",
        "N",
        "published/s",
        "to every foll./s",
        "mean foll./s",
        "missed %",
        "lost",
        "vs floor",
        "paced p50",
        "p99 us",
        "p999 us",
        "lost"
    );
    let mut rows: Vec<_> = r.fanout.iter().filter(|x| x.mode == "max_rate").collect();
    rows.sort_by_key(|x| (x.followers, x.transport as u8));
    for x in rows {
        let paced = r.fanout_at(x.transport, x.followers, "paced");
        let versus = match (x.transport, r.fanout_at(Transport::Floor, x.followers, "max_rate")) {
            (Transport::Floor, _) | (_, None) => String::new(),
            (_, Some(f)) => format!("{:.2}x", x.delivered_per_sec_min / f.delivered_per_sec_min),
        };
        // A peer's rows also compare with direct, after the table's columns.
        let direct = r.fanout_at(Transport::Direct, x.followers, "max_rate");
        let beside = match (x.transport.is_peer(), direct) {
            (true, Some(d)) => format!("   vs direct {:.2}x", x.delivered_per_sec_min / d.delivered_per_sec_min),
            _ => String::new(),
        };

        let _ = writeln!(
            out,
            "  {:<9} {:>3} {:>13.0} {:>15.0} {:>13.0} {:>9.1} {:>5} {:>10} | {:>10.1} {:>10.1} {:>10.1} {:>5}{}",
            x.transport.to_string(),
            x.followers,
            x.published_per_sec,
            x.delivered_per_sec_min,
            x.delivered_per_sec_mean,
            x.missed_ratio * 100.0,
            x.links_lost,
            versus,
            paced.map_or(0.0, |p| p.p50_us),
            paced.map_or(0.0, |p| p.p99_us),
            paced.map_or(0.0, |p| p.p999_us),
            paced.map_or(0, |p| p.links_lost),
            beside,
        );
    }
    out.push('\n');
}

fn deliver_one(out: &mut String, r: &Results) {
    let Some(o) = &r.deliver_one else { return };
    let _ = writeln!(
        out,
        "DELIVER-TO-ONE (one key, {} followers, SIGKILL one every {} ms and start a replacement; {:.0} s, {} kills)",
        o.followers, o.kill_interval_ms, o.seconds, o.kills
    );
    let _ = writeln!(
        out,
        "  {:>10} {:>12} {:>10} {:>10} {:>6} {:>11} {:>8} {:>9} {:>9} {:>12}",
        "offered/s",
        "published/s",
        "published",
        "received",
        "lost",
        "duplicates",
        "dup %",
        "unmarked",
        "waited ms",
        "processed/s"
    );
    let _ = writeln!(
        out,
        "  {:>10} {:>12.0} {:>10} {:>10} {:>6} {:>11} {:>8.4} {:>9} {:>9.0} {:>12.0}",
        if o.offered_rate == 0 { "flat out".to_string() } else { o.offered_rate.to_string() },
        o.published_per_sec,
        o.published,
        o.received_total,
        o.lost,
        o.duplicates,
        o.duplicates_ratio * 100.0,
        o.unmarked_duplicates,
        o.publisher_waited_ms,
        o.throughput_per_sec
    );
    let _ = writeln!(
        out,
        "  marked redelivered {}; copies with another position {}; fewest subscribed at a kill {}; \
         {} {:.0} ms after the window; leader dropped {}",
        o.marked_redelivered,
        o.position_changed,
        o.min_subscribed_at_kill,
        if o.lost == 0 { "every seq in" } else { "the wait for the rest gave up" },
        o.drained_after_window_ms,
        o.leader_undelivered_dropped
    );
    match r.broadcast_beside_one() {
        Some(b) => {
            let _ = writeln!(
                out,
                "  beside broadcast (direct, N={}, flat out): {:.0} events/s to every follower, {:.0} deliveries/s \
                 in all{}",
                b.followers,
                b.delivered_per_sec_min,
                b.delivered_total as f64 / b.seconds,
                if o.offered_rate == 0 {
                    ""
                } else {
                    "; deliver-to-one ran paced at the offered rate (--one-rate 0: flat out)"
                }
            );
        }
        None => {
            let _ = writeln!(out, "  (no direct fan-out in this run to compare with: add --phases fanout)");
        }
    }
    out.push('\n');
}

fn failover(out: &mut String, r: &Results) {
    if let Some(f) = &r.failover.standalone {
        let _ = writeln!(
            out,
            "FAILOVER standalone ({} processes, kill -9 of the elected leader x{}): \
             p50 {:.1} ms, max {:.1} ms, min {:.1} ms\n  samples ms: {}\n",
            f.processes,
            f.repeats,
            f.p50_ms,
            f.max_ms,
            f.min_ms,
            samples(&f.samples_ms)
        );
    }
    if let Some(f) = &r.failover.cluster_agent {
        let _ = writeln!(
            out,
            "FAILOVER cluster agent ({} workers over the {}, kill -9 of the agent x{}, master restarts it after \
             {} ms): p50 {:.1} ms, max {:.1} ms, min {:.1} ms\n  samples ms: {}\n  new Leader serving, ms: {}\n",
            f.processes,
            f.link.unwrap_or("?"),
            f.repeats,
            f.restart_delay_ms.unwrap_or(0),
            f.p50_ms,
            f.max_ms,
            f.min_ms,
            samples(&f.samples_ms),
            samples(f.agent_serving_ms.as_deref().unwrap_or_default())
        );
    }
    if let Some(f) = &r.failover.cluster_standby {
        let after = f.upstream_connections_after.as_deref().unwrap_or_default();
        let _ = writeln!(
            out,
            "FAILOVER cluster agent with a hot standby ({} workers over the {}, puts every {} ms, kill -9 of the \
             agent x{}, {} promotions): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, min {:.1} ms; upstream \
             connections after each takeover: {} of {} were 1 (at most {} at once); {} delivered twice or \
             backwards\n  samples ms: {}\n  promoted Leader serving, ms: {}\n",
            f.processes,
            f.link.unwrap_or("?"),
            f.put_every_ms.unwrap_or(0),
            f.repeats,
            f.promotions.unwrap_or(0),
            f.p50_ms,
            f.p99_ms.unwrap_or(0.0),
            f.max_ms,
            f.min_ms,
            after.iter().filter(|&&n| n == 1).count(),
            after.len(),
            f.upstream_connections_max.unwrap_or(0),
            f.duplicates_or_backwards.unwrap_or(0),
            samples(&f.samples_ms),
            samples(f.agent_serving_ms.as_deref().unwrap_or_default())
        );
    }
}

fn samples(ms: &[f64]) -> String {
    ms.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>().join(" ")
}

fn memory(out: &mut String, r: &Results) {
    let _ = writeln!(out, "MEMORY (RSS MiB, mean per process: idle / invoke 64 in flight / fan-out flat out)");
    let mut keys: Vec<(usize, Transport, &str)> =
        r.memory.samples.iter().map(|s| (s.followers, s.transport, s.process)).collect();
    keys.sort_by_key(|(n, t, p)| (*n, *t as u8, *p));
    keys.dedup();
    for (n, transport, process) in keys {
        let at = |state: &str| {
            r.memory
                .samples
                .iter()
                .find(|s| s.followers == n && s.transport == transport && s.process == process && s.state == state)
                .map_or("-".to_string(), |s| format!("{:.1}", s.rss_kib_mean as f64 / 1024.0))
        };
        let _ = writeln!(
            out,
            "  N={n:<2} {:<13} {:>6} {:>6} {:>6}",
            process,
            at("idle"),
            at("invoke_load"),
            at("fanout_load")
        );
    }
    if let Some(k) = r.memory.follower_overhead_kib {
        let _ = writeln!(
            out,
            "  follower overhead vs floor client: {:.2} MiB ({})",
            k as f64 / 1024.0,
            r.memory.follower_overhead_basis
        );
    }
    if let Some(s) = &r.memory.leader_at_scale {
        let _ = writeln!(
            out,
            "  leader with {} followers ({} processes): {:.1} MiB (idle {:.1} MiB, {:.1} KiB per follower); \
             follower processes {:.1} MiB each{}",
            s.followers_connected,
            s.processes,
            s.leader_rss_kib as f64 / 1024.0,
            s.leader_rss_idle_kib as f64 / 1024.0,
            s.leader_kib_per_follower,
            s.follower_process_rss_kib_mean as f64 / 1024.0,
            s.follower_kib_per_connection.map_or(String::new(), |k| format!(", {k:.1} KiB per connection"))
        );
    }
    out.push('\n');
}

fn targets(out: &mut String, r: &Results) {
    let _ = writeln!(out, "TARGETS");
    for t in &r.targets {
        let status = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let measured = t.measured.map_or("-".to_string(), |m| format!("{m:.2} {}", t.unit));
        let _ = writeln!(out, "  [{status:^6}] {:<32} {:>12}  goal {}; {}", t.name, measured, t.goal, t.detail);
    }
    let _ = writeln!(out, "\nwall time {:.1} s", r.wall_seconds);
}
