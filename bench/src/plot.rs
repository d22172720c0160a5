//! The chart: calls/s and p50 latency by number of followers, one line per
//! transport (floor, direct, messenger and the peers tonic and tarpc) and concurrency.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::placement::Placement;
use crate::results::{InvokeResult, Results};
use crate::transport::Transport;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// 1 call in flight per follower, processes wherever the OS puts them.
    PingPong,
    /// 64 in flight per follower.
    Pipelined,
    /// 1 in flight, every process on CPU 0.
    OneCpu,
}

struct Series {
    transport: Transport,
    label: String,
    color: RGBColor,
    kind: Kind,
    /// (N, calls/s, p50 us)
    points: Vec<(f64, f64, f64)>,
}

fn color(transport: Transport, kind: Kind) -> RGBColor {
    match (transport, kind) {
        (Transport::Floor, Kind::PingPong) => RGBColor(150, 150, 150),
        (Transport::Floor, Kind::Pipelined) => RGBColor(30, 30, 30),
        (Transport::Floor, Kind::OneCpu) => RGBColor(110, 110, 110),
        (Transport::Direct, Kind::PingPong) => RGBColor(100, 170, 235),
        (Transport::Direct, Kind::Pipelined) => RGBColor(20, 70, 170),
        (Transport::Direct, Kind::OneCpu) => RGBColor(60, 120, 210),
        (Transport::DirectQueue | Transport::DirectSlots, Kind::PingPong) => RGBColor(120, 210, 220),
        (Transport::DirectQueue | Transport::DirectSlots, Kind::Pipelined) => RGBColor(20, 130, 150),
        (Transport::DirectQueue | Transport::DirectSlots, Kind::OneCpu) => RGBColor(70, 170, 185),
        (Transport::Messenger, Kind::PingPong) => RGBColor(245, 160, 80),
        (Transport::Messenger, Kind::Pipelined) => RGBColor(190, 60, 20),
        (Transport::Messenger, Kind::OneCpu) => RGBColor(220, 110, 50),
        (Transport::Tonic, Kind::PingPong) => RGBColor(120, 200, 120),
        (Transport::Tonic, Kind::Pipelined) => RGBColor(20, 120, 40),
        (Transport::Tonic, Kind::OneCpu) => RGBColor(70, 160, 80),
        (Transport::Tarpc, Kind::PingPong) => RGBColor(200, 140, 220),
        (Transport::Tarpc, Kind::Pipelined) => RGBColor(110, 40, 140),
        (Transport::Tarpc, Kind::OneCpu) => RGBColor(160, 90, 180),
    }
}

fn series(results: &Results) -> Vec<Series> {
    let mut all = Vec::new();
    let in_flight = results.config.in_flight;
    for transport in crate::transport::ALL {
        let kinds = [
            (Kind::PingPong, 1, Placement::Os, "1 in flight per follower".to_string()),
            (Kind::Pipelined, in_flight, Placement::Os, format!("{in_flight} in flight per follower")),
            (Kind::OneCpu, 1, Placement::OneCpu, "1 in flight, every process on CPU 0".to_string()),
        ];
        for (kind, concurrency, placement, what) in kinds {
            let mut rows: Vec<&InvokeResult> = results
                .invoke
                .iter()
                .filter(|r| r.transport == transport && r.concurrency == concurrency && r.placement == placement)
                .collect();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by_key(|r| r.followers);
            all.push(Series {
                transport,
                label: format!("{transport}, {what}"),
                color: color(transport, kind),
                kind,
                points: rows.iter().map(|r| (r.followers as f64, r.calls_per_sec, r.p50_us)).collect(),
            });
        }
    }
    all
}

pub fn draw(path: &Path, results: &Results) -> Result<()> {
    let all = series(results);
    let err = |e| anyhow!("{e:?}");
    let width = chart_width(&all);
    let root = SVGBackend::new(path, (width, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "tandem invoke, direct and messenger, vs the raw Unix-socket floor and its peers: payload {} B, {} s phases, \
         {} ({} cores)",
        results.config.payload_bytes, results.config.seconds, results.machine.cpu_model, results.machine.cores
    );
    let root = root.titled(&title, ("sans-serif", 18)).map_err(err)?;
    let (charts, legend_area) = root.split_vertically(560);
    let panels = charts.split_evenly((1, 2));
    let ns: Vec<f64> = results.config.followers.iter().map(|&n| n as f64).collect();
    panel(&panels[0], "Throughput (all followers together, higher is better)", "calls/s", &ns, &all, |p| p.1, si)?;
    panel(
        &panels[1],
        "Latency p50 per call (lower is better)",
        "p50 latency (µs)",
        &ns,
        &all,
        |p| p.2,
        |v| {
            if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") }
        },
    )?;
    legend(&legend_area, &all, width)?;
    root.present().map_err(err)?;
    Ok(())
}

/// The legend's columns: one per transport with a series, in order.
fn columns(all: &[Series]) -> Vec<Transport> {
    let mut columns: Vec<Transport> = all.iter().map(|s| s.transport).collect();
    columns.dedup();
    columns
}

/// 1280 px, or wider so that each legend column keeps 400 px (its longest label).
fn chart_width(all: &[Series]) -> u32 {
    (columns(all).len() as u32 * 400).max(1280)
}

/// One column per transport under the panels: a line and marker, then the label.
fn legend(area: &DrawingArea<SVGBackend<'_>, Shift>, all: &[Series], width: u32) -> Result<()> {
    let err = |e| anyhow!("{e:?}");
    let columns = columns(all);
    let width = width as i32 / columns.len().max(1) as i32;
    for (column, transport) in columns.iter().enumerate() {
        let rows = all.iter().filter(|s| s.transport == *transport);
        for (row, s) in rows.enumerate() {
            let (x, y) = (40 + column as i32 * width, 20 + row as i32 * 30);
            let color = s.color;
            area.draw(&PathElement::new(vec![(x, y), (x + 34, y)], ShapeStyle::from(&color).stroke_width(3)))
                .map_err(err)?;
            match s.kind {
                Kind::Pipelined => area.draw(&TriangleMarker::new((x + 17, y), 6, color.filled())).map_err(err)?,
                Kind::PingPong => area.draw(&Circle::new((x + 17, y), 4, color.filled())).map_err(err)?,
                Kind::OneCpu => area.draw(&Cross::new((x + 17, y), 5, color.stroke_width(2))).map_err(err)?,
            }
            area.draw(&Text::new(s.label.clone(), (x + 44, y - 8), ("sans-serif", 14))).map_err(err)?;
        }
    }
    Ok(())
}

/// 12000 -> "12k", 3.3e6 -> "3.3M".
fn si(v: &f64) -> String {
    let v = *v;
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    ns: &[f64],
    all: &[Series],
    value: impl Fn(&(f64, f64, f64)) -> f64,
    y_format: impl Fn(&f64) -> String,
) -> Result<()> {
    let values: Vec<f64> = all.iter().flat_map(|s| s.points.iter().map(&value)).filter(|v| *v > 0.0).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min).min(1e9) / 2.0;
    let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 4.0) * 2.0;
    let x_lo = ns.iter().copied().fold(f64::INFINITY, f64::min) / 1.3;
    let x_hi = ns.iter().copied().fold(0.0, f64::max) * 1.3;
    let err = |e| anyhow!("{e:?}");
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x_lo..x_hi).log_scale().with_key_points(ns.to_vec()), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("follower processes (N, log scale)")
        .y_desc(format!("{y_desc} (log scale)"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&y_format)
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 13))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    for s in all {
        let width = match s.kind {
            Kind::Pipelined => 3,
            Kind::PingPong => 2,
            Kind::OneCpu => 1,
        };
        let points: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, value(p))).filter(|p| p.1 > 0.0).collect();
        let color = s.color;
        chart
            .draw_series(LineSeries::new(points.clone(), ShapeStyle::from(&color).stroke_width(width)))
            .map_err(err)?;
        match s.kind {
            Kind::Pipelined => {
                chart.draw_series(points.iter().map(|&p| TriangleMarker::new(p, 6, color.filled()))).map_err(err)?;
            }
            Kind::PingPong => {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(err)?;
            }
            Kind::OneCpu => {
                chart.draw_series(points.iter().map(|&p| Cross::new(p, 5, color.stroke_width(2)))).map_err(err)?;
            }
        }
    }
    Ok(())
}
