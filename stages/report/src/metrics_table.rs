//! Section 1: FID, KID and LPIPS of every model, with each variant's change from the original.
//! Lower is better for all three. FID and KID are set-level numbers: the best value is bold.
//! LPIPS is a per-image metric: with its per-image values it gets a bootstrap interval, is bold
//! only when significantly best, and a sentence says how each variant compares (see
//! [`crate::significance`]); a future per-image metric is one more [`Column`] with a
//! [`Metric`].

use serde_json::{json, Map, Value};

use crate::bootstrap::PerItem;
use crate::format::{self, Align, Table};
use crate::models::Model;
use crate::section::Section;
use crate::significance::{self, Analysis, Better, Metric, Row};

/// The one number of a metric column, for a model that has it.
struct Column {
    title: &'static str,
    /// Its key in `report.json`'s deltas.
    key: &'static str,
    value: fn(&Model) -> Option<f64>,
    /// The spread shown next to the value (KID's std over subsets).
    spread: fn(&Model) -> Option<f64>,
    /// For a per-image metric: how it is described, and a model's per-item values.
    per_image: Option<(&'static Metric, PerImageOf)>,
}

/// A model's per-item values of a metric, when bound.
type PerImageOf = fn(&Model) -> Option<&PerItem>;

const LPIPS: Metric = Metric {
    key: "lpips",
    noun: "LPIPS",
    better: Better::Lower,
    items: "image pairs",
    value: format::num,
    difference: significance::signed,
    unit: "",
};

const COLUMNS: [Column; 3] = [
    Column {
        title: "FID",
        key: "fid",
        value: |m| m.fid.as_ref().map(|f| f.fid),
        spread: |_| None,
        per_image: None,
    },
    Column {
        title: "KID",
        key: "kid_mean",
        value: |m| m.fid.as_ref().and_then(|f| f.kid_mean),
        spread: |m| m.fid.as_ref().and_then(|f| f.kid_std),
        per_image: None,
    },
    Column {
        title: "LPIPS",
        key: "lpips",
        value: |m| m.lpips.as_ref().map(|l| l.lpips),
        spread: |_| None,
        per_image: Some((&LPIPS, |m| m.lpips.as_ref()?.per_pair.as_ref())),
    },
];

/// How prose names a model.
pub fn prose(m: &Model) -> String {
    if m.is_original {
        "the original".into()
    } else {
        format::code(&m.name)
    }
}

/// A per-image column's analysis over the rows that have the metric, with the index of each
/// table row in it.
struct Tested<'a> {
    analysis: Analysis<'a>,
    index: Vec<Option<usize>>,
}

impl<'a> Tested<'a> {
    fn new(column: &Column, rows: &[&'a Model]) -> Option<Tested<'a>> {
        let (metric, per_item) = column.per_image?;
        let mut index = Vec::new();
        let mut analysed = Vec::new();
        for m in rows {
            if (column.value)(m).is_some() {
                index.push(Some(analysed.len()));
                analysed.push(Row { prose: prose(m), values: per_item(m) });
            } else {
                index.push(None);
            }
        }
        Some(Tested { analysis: Analysis::new(metric, analysed), index })
    }
}

pub fn build(models: &[Model]) -> Option<Section> {
    let rows: Vec<&Model> =
        models.iter().filter(|m| m.fid.is_some() || m.lpips.is_some()).collect();
    if rows.is_empty() {
        return None;
    }
    let original = rows.iter().find(|m| m.is_original).copied();
    let present: Vec<&Column> =
        COLUMNS.iter().filter(|c| rows.iter().any(|m| (c.value)(m).is_some())).collect();

    let mut table = Table::new(&[("Model", Align::Left)]);
    for c in &present {
        let title = if c.title == "KID" {
            "KID ↓ (mean ± std)".to_string()
        } else {
            format!("{} ↓", c.title)
        };
        table.column(title, Align::Right);
        if original.is_some() {
            table.column(format!("Δ {}", c.title), Align::Right);
        }
    }
    table.column("N (FID real / fake, LPIPS pairs)", Align::Right);

    let tested: Vec<Option<Tested>> = present.iter().map(|c| Tested::new(c, &rows)).collect();
    let original_row = rows.iter().position(|m| m.is_original);

    let mut json_rows = Vec::new();
    for (r, m) in rows.iter().enumerate() {
        let name = if m.is_original { "**original**".to_string() } else { format::code(&m.name) };
        let mut cells = vec![name];
        let mut deltas = Map::new();
        let mut intervals = Map::new();
        for (c, t) in present.iter().zip(&tested) {
            let value = (c.value)(m);
            let at = t.as_ref().and_then(|t| Some((&t.analysis, t.index[r]?)));
            let best = match (t, at) {
                // A per-image metric with every row's values: bold only when significant.
                (Some(t), Some((a, i))) if t.analysis.tested() => a.significantly_best(i),
                (Some(t), None) if t.analysis.tested() => false,
                _ => {
                    rows.len() > 1
                        && value.is_some_and(|v| {
                            rows.iter().filter_map(|r| (c.value)(r)).all(|other| v <= other)
                        })
                }
            };
            let shown = |v: f64| match at {
                Some((a, i)) => a.cell(i, v),
                None => format::mean_std(v, (c.spread)(m)),
            };
            cells.push(match value {
                Some(v) if best => format!("**{}**", shown(v)),
                Some(v) => shown(v),
                None => "—".into(),
            });
            let reference = original_row.and_then(|o| t.as_ref()?.index[o]);
            if let Some((a, i)) = at {
                let interval = a.json(i, reference);
                if !interval.is_null() {
                    intervals.insert(c.key.to_string(), interval);
                }
            }
            if let Some(o) = original {
                let base = (c.value)(o);
                let tested_delta = at.zip(reference).and_then(|((a, i), o)| a.delta_cell(o, i));
                cells.push(match (value, base) {
                    _ if m.is_original => "—".into(),
                    (Some(v), Some(b)) => {
                        deltas.insert(c.key.to_string(), json!(v - b));
                        if let Some(d) = tested_delta {
                            d
                        } else {
                            let mut d = format::delta(v, b);
                            // NaN (no spread known) compares false: no noise claim without a std.
                            let noise = [(c.spread)(m), (c.spread)(o)]
                                .into_iter()
                                .flatten()
                                .fold(f64::NAN, f64::max);
                            if (v - b).abs() <= noise {
                                d.push_str(" (within ±std)");
                            }
                            d
                        }
                    }
                    _ => "—".into(),
                });
            }
        }
        let n_fid = m.fid.as_ref().map(|f| format!("{} / {}", f.n_real, f.n_fake));
        let n_lpips = m.lpips.as_ref().map(|l| l.n.to_string());
        cells.push([n_fid, n_lpips].map(|n| n.unwrap_or_else(|| "—".into())).join(", "));
        table.row(cells);
        json_rows.push(json!({
            "model": m.name,
            "label": m.label,
            "values": m.values,
            "fid": m.fid.as_ref().map(|f| Value::Object(f.raw.clone())),
            "lpips": m.lpips.as_ref().map(|l| Value::Object(l.raw.clone())),
            "intervals": Value::Object(intervals),
            "delta_vs_original": if m.is_original || original.is_none() {
                Value::Null
            } else {
                Value::Object(deltas)
            },
        }));
    }

    let mut markdown = table.render();
    let (with_intervals, point_only): (Vec<_>, Vec<_>) = present
        .iter()
        .zip(&tested)
        .partition(|(_, t)| t.as_ref().is_some_and(|t| t.analysis.tested()));
    let titles = |cs: &[(&&Column, &Option<Tested>)]| {
        let titles: Vec<&str> = cs.iter().map(|(c, _)| c.title).collect();
        match titles.as_slice() {
            [] => String::new(),
            [one] => one.to_string(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    };
    markdown.push_str(match present.len() {
        1 => "\nLower is better.",
        2 => "\nLower is better for both metrics.",
        _ => "\nLower is better for all three metrics.",
    });
    if !point_only.is_empty() {
        markdown.push_str(&format!(
            " The best value of {} is bold.",
            if point_only.len() == 1 {
                titles(&point_only)
            } else {
                format!("each of {}", titles(&point_only))
            }
        ));
    }
    if !with_intervals.is_empty() {
        markdown.push_str(&format!(
            " {} is the mean over images with its bootstrap 95% interval [low, high]; the best \
             value is bold only when that model is significantly better than every other one \
             (a paired bootstrap of the per-image differences).",
            titles(&with_intervals)
        ));
    }
    if original.is_some() {
        markdown.push_str(" Δ is the change from the original model (▼ better, ▲ worse)");
        markdown.push_str(if present.iter().any(|c| c.key == "kid_mean") {
            "; a KID change no larger than the larger of the two KID standard deviations is \
             marked *within ±std*."
        } else {
            "."
        });
        if !with_intervals.is_empty() {
            markdown.push_str(&format!(
                " For {} Δ has the 95% interval of the change and says *not significant* when \
                 that interval contains 0.",
                titles(&with_intervals)
            ));
        }
    }
    markdown.push('\n');

    let mut notes = Vec::new();
    let reference = original_row.unwrap_or(0);
    let mut sentences = Vec::new();
    for (c, t) in present.iter().zip(&tested) {
        let Some(t) = t else { continue };
        if let Some(r) = t.index[reference] {
            for i in (0..rows.len()).filter(|&i| i != reference) {
                sentences.extend(t.index[i].and_then(|i| t.analysis.sentence(r, i)));
            }
        }
        let missing = t.analysis.missing();
        if !missing.is_empty() {
            notes.push(format!(
                "No per-image values were bound for the {} of {} (`base_lpips_per_image`, \
                 `lpips_per_image`), so {} has no interval there and {} compared by its point \
                 values only.",
                c.title,
                missing.join(", "),
                c.title,
                if t.analysis.tested() { "those models are not" } else { "the column is" }
            ));
        }
        for m in &rows {
            let Some(l) = m.lpips.as_ref().filter(|_| c.key == "lpips") else { continue };
            if let Some(p) = l.per_pair.as_ref().filter(|p| p.len() as u64 != l.n) {
                notes.push(format!(
                    "The LPIPS `per_image.jsonl` of {} has {} pairs but its metrics.json says \
                     {}: its interval is of the per-image values.",
                    prose(m),
                    p.len(),
                    l.n
                ));
            }
        }
    }
    if !sentences.is_empty() {
        markdown.push('\n');
        markdown.extend(sentences.iter().map(|s| format!("- {s}\n")));
    }
    Some(Section { title: "Metrics", markdown, json: Value::Array(json_rows), notes })
}
