//! Section: the sweep as one table, shaped like the engine's `sdpipe exp show --only-changed`
//! (which this crate does not import: stage crates know nothing of the engine). One row per
//! compared model (the original first, then the sweep points in sweep order), one column per
//! swept `stage.param` that differs between the sweep points, then one column per headline
//! metric that some model has. Cells are printed as `exp show` prints them, through the same
//! [`sdpipe_stages::exp_cells`] (metric values: five significant digits, no trailing zeros) and kept whole in `report.json`'s `sweep` rows.
//! Left out when no model has swept values.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use sdpipe_stages::exp_cells::{self, value as param};

use crate::format::{self, Align, Table};
use crate::models::Model;
use crate::section::Section;

/// `exp show`'s default `--precision`: significant digits of a metric value.
const PRECISION: usize = 5;

/// A headline metric: its column title, its key in `report.json`, and a model's value.
type MetricColumn = (&'static str, &'static str, fn(&Model) -> Option<f64>);

const METRICS: [MetricColumn; 7] = [
    ("FID ↓", "fid", |m| m.fid.as_ref().map(|f| f.fid)),
    ("KID mean ↓", "kid_mean", |m| m.fid.as_ref()?.kid_mean),
    ("CMMD ↓", "cmmd", |m| m.cmmd.as_ref().map(|c| c.cmmd)),
    ("LPIPS mean ↓", "lpips", |m| m.lpips.as_ref().map(|l| l.lpips)),
    // The mean of the clamped per-image scores, as in the metrics table.
    ("CLIP score mean ↑", "clip_score", |m| m.clip_score.as_ref().map(|c| c.mean_clamped)),
    ("Scene accuracy (all) ↑", "scene_all", |m| m.scene.as_ref().map(|s| s.all)),
    ("Background ↑", "scene_background", |m| m.scene.as_ref().map(|s| s.background)),
];

pub fn build(models: &[Model]) -> Option<Section> {
    let points: Vec<&Model> = models.iter().filter(|m| !m.values.is_empty()).collect();
    if points.is_empty() {
        return None;
    }
    // Like `--only-changed`, but among the sweep points: the original has no swept values, so
    // against it every parameter would count as changed.
    let names: BTreeSet<&String> = points.iter().flat_map(|m| m.values.keys()).collect();
    let (params, constant): (Vec<&String>, Vec<&String>) = names
        .into_iter()
        .partition(|p| points.windows(2).any(|w| w[0].values.get(*p) != w[1].values.get(*p)));
    let metrics: Vec<&MetricColumn> =
        METRICS.iter().filter(|(_, _, value)| models.iter().any(|m| value(m).is_some())).collect();

    let mut table = Table::new(&[("Model", Align::Left)]);
    for p in &params {
        table.column(format::code(p), Align::Right);
    }
    for (title, _, _) in &metrics {
        table.column(*title, Align::Right);
    }
    let mut json_rows = Vec::new();
    for m in models {
        let name = if m.is_original { "**original**".to_string() } else { format::code(&m.name) };
        let mut cells = vec![format!("{name}{}", m.lora_suffix())];
        let mut shown_params = Map::new();
        for p in &params {
            let value = m.values.get(*p);
            cells.push(value.map_or_else(|| "—".into(), |v| format::cell(&param(v))));
            if let Some(v) = value {
                shown_params.insert(p.to_string(), v.clone());
            }
        }
        let mut shown_metrics = Map::new();
        for (_, key, value) in &metrics {
            let value = value(m);
            cells.push(value.map_or_else(|| "—".into(), number));
            if let Some(v) = value {
                shown_metrics.insert(key.to_string(), json!(v));
            }
        }
        table.row(cells);
        let mut row = json!({
            "model": m.name,
            "label": m.label,
            "original": m.is_original,
            "params": Value::Object(shown_params),
            "metrics": Value::Object(shown_metrics),
        });
        if models.iter().any(|r| r.lora().is_some()) {
            row["lora"] = json!(m.lora());
        }
        json_rows.push(row);
    }

    let mut markdown = table.render();
    markdown.push_str(
        "\nOne row per model: the swept parameters of its sweep point (— for the original; \
         those the same at every point are left out, as `--only-changed` does), then its \
         headline metrics to five significant digits.",
    );
    if !constant.is_empty() {
        let same: Vec<String> = constant
            .iter()
            .map(|p| {
                format!("{} = {}", format::code(p), format::cell(&param(&points[0].values[*p])))
            })
            .collect();
        markdown.push_str(&format!(
            " Swept parameters with the same value at every point are left out: {}.",
            same.join(", ")
        ));
    }
    let listed: Vec<&Model> = models.iter().collect();
    if let Some(legend) = crate::models::lora_legend(&listed) {
        markdown.push_str(&format!(" {legend}"));
    }
    markdown.push_str(
        " `sdpipe exp show <pipeline>` gives the same table across every recorded run of the \
         pipeline.\n",
    );
    Some(Section { title: "Sweep", markdown, json: Value::Array(json_rows), notes: vec![] })
}

/// A metric value as `exp show` prints it at its default precision.
fn number(x: f64) -> String {
    exp_cells::number(x, PRECISION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_have_five_significant_digits_like_exp_show() {
        assert_eq!(number(120.0), "120");
        assert_eq!(number(0.012), "0.012");
        assert_eq!(number(0.123456), "0.12346");
        assert_eq!(number(12345.678), "12346");
        assert_eq!(number(0.0), "0");
    }
}
