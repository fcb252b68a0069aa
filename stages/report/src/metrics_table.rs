//! Section 1: FID, KID, CMMD, LPIPS and CLIP score of every model (each column only when some
//! model has it), with each variant's change from the original. Lower is better for all but the
//! CLIP score, where higher is. FID, KID and CMMD are set-level numbers: the best value is bold.
//! LPIPS and the CLIP score are per-image metrics: with their per-image values they get a
//! bootstrap interval, are bold only when significantly best, and a sentence says how each
//! variant compares (see [`crate::significance`]); a future per-image metric is one more
//! [`Column`] with a [`Metric`].

use serde_json::{json, Map, Value};

use crate::bootstrap::PerItem;
use crate::format::{self, Align, Table};
use crate::models::Model;
use crate::section::Section;
use crate::significance::{self, Analysis, Better, Metric, Row};

/// The one number of a metric column, for a model that has it.
struct Column {
    title: &'static str,
    /// Its key in `report.json`'s deltas (and, for a per-image metric, in its input names:
    /// `base_<key>_per_image`, `<key>_per_image`).
    key: &'static str,
    better: Better,
    value: fn(&Model) -> Option<f64>,
    /// The spread shown next to the value (KID's std over subsets).
    spread: fn(&Model) -> Option<f64>,
    /// For a per-image metric: how it is described, and a model's per-item values.
    per_image: Option<PerImage>,
}

/// How a per-image column finds its values.
struct PerImage {
    metric: &'static Metric,
    values: PerImageOf,
    /// The count its metrics.json states, checked against the per-image lines.
    n: fn(&Model) -> Option<u64>,
    /// What those lines count, in the plural ("pairs").
    counted: &'static str,
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

/// The clamped per-image scores (`max(100·cos, 0)`) and their mean: higher is better.
const CLIP_SCORE: Metric = Metric {
    key: "clip_score",
    noun: "CLIP score",
    better: Better::Higher,
    items: "images",
    value: format::num,
    difference: significance::signed,
    unit: "",
};

const COLUMNS: [Column; 5] = [
    Column {
        title: "FID",
        key: "fid",
        better: Better::Lower,
        value: |m| m.fid.as_ref().map(|f| f.fid),
        spread: |_| None,
        per_image: None,
    },
    Column {
        title: "KID",
        key: "kid_mean",
        better: Better::Lower,
        value: |m| m.fid.as_ref().and_then(|f| f.kid_mean),
        spread: |m| m.fid.as_ref().and_then(|f| f.kid_std),
        per_image: None,
    },
    Column {
        title: "CMMD",
        key: "cmmd",
        better: Better::Lower,
        value: |m| m.cmmd.as_ref().map(|c| c.cmmd),
        spread: |_| None,
        per_image: None,
    },
    Column {
        title: "LPIPS",
        key: "lpips",
        better: Better::Lower,
        value: |m| m.lpips.as_ref().map(|l| l.lpips),
        spread: |_| None,
        per_image: Some(PerImage {
            metric: &LPIPS,
            values: |m| m.lpips.as_ref()?.per_pair.as_ref(),
            n: |m| m.lpips.as_ref().map(|l| l.n),
            counted: "pairs",
        }),
    },
    Column {
        title: "CLIP score",
        key: "clip_score",
        better: Better::Higher,
        // The mean of the clamped per-image scores: the mean its interval is of.
        value: |m| m.clip_score.as_ref().map(|c| c.mean_clamped),
        spread: |_| None,
        per_image: Some(PerImage {
            metric: &CLIP_SCORE,
            values: |m| m.clip_score.as_ref()?.per_image.as_ref(),
            n: |m| m.clip_score.as_ref().map(|c| c.n),
            counted: "images",
        }),
    },
];

/// `a`, `a and b`, `a, b and c`.
fn list(titles: &[&str]) -> String {
    match titles {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

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
        let per_image = column.per_image.as_ref()?;
        let (metric, per_item) = (per_image.metric, per_image.values);
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
    let rows: Vec<&Model> = models.iter().filter(|m| m.has_table_metrics()).collect();
    if rows.is_empty() {
        return None;
    }
    let original = rows.iter().find(|m| m.is_original).copied();
    let present: Vec<&Column> =
        COLUMNS.iter().filter(|c| rows.iter().any(|m| (c.value)(m).is_some())).collect();

    let mut table = Table::new(&[("Model", Align::Left)]);
    for c in &present {
        let arrow = match c.better {
            Better::Lower => "↓",
            Better::Higher => "↑",
        };
        let title = if c.title == "KID" {
            "KID ↓ (mean ± std)".to_string()
        } else {
            format!("{} {arrow}", c.title)
        };
        table.column(title, Align::Right);
        if original.is_some() {
            table.column(format!("Δ {}", c.title), Align::Right);
        }
    }
    // The counts behind each row: FID's and LPIPS's always (as before CMMD and the CLIP score
    // were added), and when either of those is in the table, those of the metrics shown.
    let extended = rows.iter().any(|m| m.cmmd.is_some() || m.clip_score.is_some());
    let counts: Vec<&Count> = COUNTS
        .iter()
        .filter(|c| {
            if extended {
                rows.iter().any(|m| (c.of)(m).is_some())
            } else {
                c.label == "FID real / fake" || c.label == "LPIPS pairs"
            }
        })
        .collect();
    let labels: Vec<&str> = counts.iter().map(|c| c.label).collect();
    table.column(format!("N ({})", labels.join(", ")), Align::Right);

    let tested: Vec<Option<Tested>> = present.iter().map(|c| Tested::new(c, &rows)).collect();
    let original_row = rows.iter().position(|m| m.is_original);

    let mut json_rows = Vec::new();
    for (r, m) in rows.iter().enumerate() {
        let name = if m.is_original { "**original**".to_string() } else { format::code(&m.name) };
        let mut cells = vec![format!("{name}{}", m.lora_suffix())];
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
                            rows.iter().filter_map(|r| (c.value)(r)).all(|other| match c.better {
                                Better::Lower => v <= other,
                                Better::Higher => v >= other,
                            })
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
                            let mut d = match c.better {
                                Better::Lower => format::delta(v, b),
                                Better::Higher => format::delta_higher(v, b),
                            };
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
        let n: Vec<String> =
            counts.iter().map(|c| (c.of)(m).unwrap_or_else(|| "—".into())).collect();
        cells.push(n.join(", "));
        table.row(cells);
        let mut json_row = json!({
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
        });
        // Only when bound anywhere, so reports without them keep their bytes.
        if rows.iter().any(|r| r.cmmd.is_some()) {
            json_row["cmmd"] = json!(m.cmmd.as_ref().map(|c| Value::Object(c.raw.clone())));
        }
        if rows.iter().any(|r| r.clip_score.is_some()) {
            json_row["clip_score"] =
                json!(m.clip_score.as_ref().map(|c| Value::Object(c.raw.clone())));
        }
        if rows.iter().any(|r| r.lora().is_some()) {
            json_row["lora"] = json!(m.lora());
        }
        json_rows.push(json_row);
    }

    let mut markdown = table.render();
    let (with_intervals, point_only): (Vec<_>, Vec<_>) = present
        .iter()
        .zip(&tested)
        .partition(|(_, t)| t.as_ref().is_some_and(|t| t.analysis.tested()));
    let titles = |cs: &[(&&Column, &Option<Tested>)]| {
        list(&cs.iter().map(|(c, _)| c.title).collect::<Vec<_>>())
    };
    let by = |better: Better| -> Vec<&str> {
        present.iter().filter(|c| c.better == better).map(|c| c.title).collect()
    };
    let (lower, higher) = (by(Better::Lower), by(Better::Higher));
    markdown.push_str(&match (lower.len(), higher.len()) {
        (1, 0) => "\nLower is better.".to_string(),
        (2, 0) => "\nLower is better for both metrics.".to_string(),
        (3, 0) => "\nLower is better for all three metrics.".to_string(),
        (4, 0) => "\nLower is better for all four metrics.".to_string(),
        (n, 0) => format!("\nLower is better for all {n} metrics."),
        (0, _) => "\nHigher is better.".to_string(),
        _ => format!(
            "\nLower is better for {}; higher is better for {}.",
            list(&lower),
            list(&higher)
        ),
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
            " {} {} the mean over images with its bootstrap 95% interval [low, high]; the best \
             value is bold only when that model is significantly better than every other one \
             (a paired bootstrap of the per-image differences).",
            titles(&with_intervals),
            if with_intervals.len() == 1 { "is" } else { "are each" }
        ));
    }
    if original.is_some() {
        markdown.push_str(&match (lower.is_empty(), higher.is_empty()) {
            (_, true) => " Δ is the change from the original model (▼ better, ▲ worse)".to_string(),
            (true, false) => " Δ is the change from the original model (▲ better, ▼ worse)".into(),
            (false, false) => format!(
                " Δ is the change from the original model (▼ better, ▲ worse; for {} ▲ better, \
                 ▼ worse)",
                list(&higher)
            ),
        });
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
    if let Some(legend) = crate::models::lora_legend(&rows) {
        markdown.push_str(&format!(" {legend}"));
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
                "No per-image values were bound for the {} of {} (`base_{}_per_image`, \
                 `{}_per_image`), so {} has no interval there and {} compared by its point \
                 values only.",
                c.title,
                missing.join(", "),
                c.key,
                c.key,
                c.title,
                if t.analysis.tested() { "those models are not" } else { "the column is" }
            ));
        }
        let Some(pi) = c.per_image.as_ref() else { continue };
        for m in &rows {
            let (Some(values), Some(n)) = ((pi.values)(m), (pi.n)(m)) else { continue };
            if values.len() as u64 != n {
                notes.push(format!(
                    "The {} `per_image.jsonl` of {} has {} {} but its metrics.json says {}: its \
                     interval is of the per-image values.",
                    c.title,
                    prose(m),
                    values.len(),
                    pi.counted,
                    n
                ));
            }
        }
    }
    let unclamped: Vec<String> = rows
        .iter()
        .filter_map(|m| Some((m, m.clip_score.as_ref()?)))
        .filter(|(_, c)| c.clip_score != c.mean_clamped)
        .map(|(m, c)| format!("{} {}", prose(m), format::num(c.clip_score)))
        .collect();
    if !unclamped.is_empty() {
        notes.push(format!(
            "Some images scored below 0 (a negative cosine between image and caption), so \
             torchmetrics' CLIP score, which clamps the mean rather than each image, differs \
             from the mean of the per-image clamped scores the table shows: {} \
             (`clip_score` in report.json).",
            unclamped.join(", ")
        ));
    }
    if !sentences.is_empty() {
        markdown.push('\n');
        markdown.extend(sentences.iter().map(|s| format!("- {s}\n")));
    }
    Some(Section { title: "Metrics", markdown, json: Value::Array(json_rows), notes })
}

/// A count shown in the table's last column.
struct Count {
    label: &'static str,
    of: fn(&Model) -> Option<String>,
}

const COUNTS: [Count; 4] = [
    Count {
        label: "FID real / fake",
        of: |m| m.fid.as_ref().map(|f| format!("{} / {}", f.n_real, f.n_fake)),
    },
    Count {
        label: "CMMD real / fake",
        of: |m| m.cmmd.as_ref().map(|c| format!("{} / {}", c.n_real, c.n_fake)),
    },
    Count { label: "LPIPS pairs", of: |m| m.lpips.as_ref().map(|l| l.n.to_string()) },
    Count { label: "CLIP score images", of: |m| m.clip_score.as_ref().map(|c| c.n.to_string()) },
];
