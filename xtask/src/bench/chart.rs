//! The chart of docs/benchmarks.md: per scenario, peak RSS and step time of every record.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::Record;

const ROW_HEIGHT: u32 = 28;
const WIDTH: u32 = 1400;

/// Bars of `value` per record, one panel.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    records: &[&Record],
    value: impl Fn(&Record) -> f64,
    color: RGBColor,
) -> Result<()> {
    // Bars run top-down in report order.
    let records: Vec<&Record> = records.iter().rev().copied().collect();
    let max = records
        .iter()
        .map(|r| value(r))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let n = records.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(190)
        .build_cartesian_2d(0.0..max, (0..n).into_segmented())
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < n => records[*i].label(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .draw_series(records.iter().enumerate().map(|(i, r)| {
            let fill = if r.implementation == "diffusers" {
                RGBColor(150, 150, 150)
            } else {
                color
            };
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (value(r), SegmentValue::Exact(i + 1)),
                ],
                fill.filled(),
            );
            bar.set_margin(3, 3, 0, 0);
            bar
        }))
        .map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

/// Write the chart as PNG: one row of two panels (memory, time) per scenario.
pub fn draw(path: &Path, scenarios: &[(String, Vec<&Record>)]) -> Result<()> {
    // The bitmap backend renders text with a bundled font, so no system fonts are needed.
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the bundled DejaVu Sans font did not load"))?;
    let heights: Vec<u32> = scenarios
        .iter()
        .map(|(_, r)| 80 + ROW_HEIGHT * r.len() as u32)
        .collect();
    let root = BitMapBackend::new(path, (WIDTH, heights.iter().sum())).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let mut rest = root;
    for ((name, records), h) in scenarios.iter().zip(&heights) {
        let (row, below) = rest.split_vertically(*h);
        rest = below;
        let (left, right) = row.split_horizontally(WIDTH / 2);
        panel(
            &left,
            &format!("{name}: peak RSS above baseline (MiB)"),
            records,
            |r| r.peak_rss_above_baseline_bytes as f64 / (1u64 << 20) as f64,
            RGBColor(52, 101, 164),
        )?;
        panel(
            &right,
            &format!("{name}: step time (s, median)"),
            records,
            |r| r.step_seconds_median,
            RGBColor(204, 102, 0),
        )?;
    }
    rest.present().map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}
