//! Section 3: the training loss of every variant as an SVG line plot (`loss.svg`: each
//! variant's raw loss, thin and faint, and its trailing moving average, bold, in the variant's
//! colour) and a table of steps, losses and time per variant.
//!
//! Drawn with plotters' SVG backend only: text becomes SVG `<text>` elements laid out by
//! plotters' built-in size estimate, so no font files or font system are needed.

use std::path::Path;

use plotters::prelude::*;
use serde_json::json;

use crate::error::ReportError;
use crate::format::{self, Align, Table};
use crate::inputs::TrainStep;
use crate::models::Model;
use crate::section::Section;

pub const FILE: &str = "loss.svg";
const SIZE: (u32, u32) = (800, 420);
/// Above this many steps the raw curve is reduced to each bucket's min and max (its envelope),
/// which keeps the SVG small without hiding spikes.
const MAX_RAW_POINTS: usize = 2000;

/// The colour of the `i`-th variant (Tableau 10, which stays distinguishable for most forms of
/// colour blindness).
pub fn palette(i: usize) -> RGBColor {
    const COLOURS: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = COLOURS[i % COLOURS.len()];
    RGBColor(r, g, b)
}

/// The moving-average window for a curve of `n` points: a tenth of the run, at least 1 and at
/// most 50 steps, so short runs stay visible and long ones smooth out.
pub fn window(n: usize) -> usize {
    (n / 10).clamp(1, 50)
}

/// Trailing moving average over `w` points (fewer at the start).
pub fn moving_average(values: &[f64], w: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= w {
            sum -= values[i - w];
        }
        out.push(sum / (i + 1).min(w) as f64);
    }
    out
}

/// The finite (step, loss) points of a log.
fn finite_points(log: &[TrainStep]) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|s| s.loss.filter(|l| l.is_finite()).map(|l| (s.step as f64, l)))
        .collect()
}

fn envelope(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_RAW_POINTS {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(MAX_RAW_POINTS / 2);
    let mut out = Vec::new();
    for chunk in points.chunks(bucket) {
        let lo = chunk.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("non-empty");
        let hi = chunk.iter().max_by(|a, b| a.1.total_cmp(&b.1)).expect("non-empty");
        let (first, second) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
        out.push(*first);
        if second != first {
            out.push(*second);
        }
    }
    out
}

pub fn build(models: &[Model], report: &Path) -> Result<Option<Section>, ReportError> {
    let runs: Vec<(usize, &Model, &Vec<TrainStep>)> = models
        .iter()
        .filter(|m| !m.is_original)
        .filter_map(|m| m.train_log.as_ref().map(|log| (m, log)))
        .enumerate()
        .map(|(i, (m, log))| (i, m, log))
        .collect();
    if runs.is_empty() {
        return Ok(None);
    }

    let mut table = Table::new(&[
        ("Variant", Align::Left),
        ("Steps", Align::Right),
        ("First loss", Align::Right),
        ("Final loss", Align::Right),
        ("Final moving average", Align::Right),
    ]);
    let mut notes = Vec::new();
    let mut json_rows = Vec::new();
    let mut curves = Vec::new();
    for (i, m, log) in &runs {
        let i = *i;
        let points = finite_points(log);
        let losses: Vec<f64> = points.iter().map(|p| p.1).collect();
        let w = window(losses.len());
        let average = moving_average(&losses, w);
        let non_finite = log.len() - points.len();
        if non_finite > 0 {
            notes.push(format!(
                "{}: {non_finite} of {} logged losses are not finite (the run diverged or \
                 overflowed); they are left out of the plot and the table.",
                format::code(&m.name),
                log.len()
            ));
        }
        if log.is_empty() {
            notes.push(format!("{}: the training log is empty.", format::code(&m.name)));
        }
        let dash = || "—".to_string();
        table.row(vec![
            format::code(&m.name),
            log.len().to_string(),
            losses.first().map(|l| format::num(*l)).unwrap_or_else(dash),
            losses.last().map(|l| format::num(*l)).unwrap_or_else(dash),
            average.last().map(|l| format!("{} (last {w})", format::num(*l))).unwrap_or_else(dash),
        ]);
        json_rows.push(json!({
            "model": m.name,
            "label": m.label,
            "steps": log.len(),
            "last_step": log.last().map(|s| s.step),
            "first_loss": losses.first(),
            "final_loss": losses.last(),
            "final_moving_average": average.last(),
            "moving_average_window": w,
            "non_finite_losses": non_finite,
            "final_lr": log.last().and_then(|s| s.lr),
        }));
        if !points.is_empty() {
            let smooth = points.iter().map(|p| p.0).zip(average.iter().copied()).collect();
            curves.push((i, m.name.clone(), envelope(&points), smooth));
        }
    }

    let mut markdown = String::new();
    if !curves.is_empty() {
        let svg = plot(&curves)?;
        let path = report.join(FILE);
        std::fs::write(&path, svg).map_err(|source| ReportError::Write { path, source })?;
        markdown.push_str(&format!(
            "![Training loss per step]({FILE})\n\nThin lines: the loss of each optimiser step; \
             bold lines: its trailing moving average.\n\n"
        ));
    }
    markdown.push_str(&table.render());
    Ok(Some(Section {
        title: "Training loss",
        markdown,
        json: json!({"plot": if curves.is_empty() { None } else { Some(FILE) }, "runs": json_rows}),
        notes,
    }))
}

/// Steps are integers; a tick between two steps keeps its fraction rather than repeating one.
fn step_label(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format::short(x)
    }
}

type Curve = (usize, String, Vec<(f64, f64)>, Vec<(f64, f64)>);

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

fn plot(curves: &[Curve]) -> Result<String, ReportError> {
    let err = |e: &dyn std::fmt::Display| ReportError::Plot(e.to_string());
    let (x0, x1) = range(curves.iter().flat_map(|c| c.2.iter().map(|p| p.0)));
    let (y0, y1) = range(curves.iter().flat_map(|c| c.2.iter().map(|p| p.1)));
    let pad = (y1 - y0) * 0.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Training loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            // At most one label per step, so short runs do not repeat rounded step numbers.
            .x_labels(((x1 - x0).round() as usize + 1).clamp(2, 10))
            .x_label_formatter(&|x| step_label(*x))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .y_label_formatter(&|y| format::short(*y))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, name, raw, smooth) in curves {
            let colour = palette(*i);
            chart
                .draw_series(LineSeries::new(raw.iter().copied(), colour.mix(0.3).stroke_width(1)))
                .map_err(|e| err(&e))?;
            // The legend mark is a filled square, not a line, so the SVG holds exactly one
            // bold polyline per variant.
            chart
                .draw_series(LineSeries::new(smooth.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_labels_are_whole_numbers_when_they_can_be() {
        assert_eq!(step_label(1000.0), "1000");
        assert_eq!(step_label(2.5), "2.5");
    }

    #[test]
    fn moving_average_is_trailing_and_exact() {
        assert_eq!(moving_average(&[1.0, 3.0, 5.0, 7.0], 2), vec![1.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn envelope_keeps_extremes_of_long_curves() {
        let mut points: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, 1.0)).collect();
        points[5000].1 = 9.0;
        let reduced = envelope(&points);
        assert!(reduced.len() <= MAX_RAW_POINTS);
        assert!(reduced.contains(&(5000.0, 9.0)));
    }
}
