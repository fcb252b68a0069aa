//! Section: scene accuracy — how often each model's samples show what their synthetic captions
//! say (`scene-accuracy` stages: background colour, style, shape colours, relations, all at
//! once). Higher is better. Every column is a per-image metric (each image is right or not):
//! with the per-image values, each share gets a bootstrap interval, the best is bold only when
//! significantly better, and a sentence per column says how each variant compares (see
//! [`crate::significance`]); without them, the best value of each column is bold.

use serde_json::{json, Map, Value};

use crate::bootstrap::{self, PerItem};
use crate::format::{self, Align, Table};
use crate::inputs::SceneMetrics;
use crate::metrics_table::prose;
use crate::models::Model;
use crate::section::Section;
use crate::significance::{percent, points, Analysis, Better, Metric, Row};

const fn share(key: &'static str, noun: &'static str) -> Metric {
    Metric {
        key,
        noun,
        better: Better::Higher,
        items: "images",
        value: percent,
        difference: points,
        unit: " percentage points",
    }
}

/// Title, key (in `metrics.json` and `per_image`), the metric, and the value.
type SceneColumn = (&'static str, &'static str, Metric, fn(&SceneMetrics) -> Option<f64>);

const COLUMNS: [SceneColumn; 5] = [
    ("Background ↑", "background", share("scene.background", "background accuracy"), |s| {
        Some(s.background)
    }),
    ("Style ↑", "style", share("scene.style", "style accuracy"), |s| s.style),
    ("Shape colours ↑", "colours", share("scene.colours", "shape-colour accuracy"), |s| {
        Some(s.colours)
    }),
    ("Relations ↑", "relations", share("scene.relations", "relation accuracy"), |s| s.relations),
    ("All ↑", "all", share("scene.all", "all-at-once accuracy"), |s| Some(s.all)),
];

fn per_item<'a>(s: &'a SceneMetrics, key: &str) -> Option<&'a PerItem> {
    s.per_image.as_ref()?.get(key)
}

/// The table's rows are the models; `vae_bound`, when given, adds the test images decoded by
/// the VAE as a last row for reference, never bold (it is not a model).
pub fn build(models: &[Model], vae_bound: Option<&SceneMetrics>) -> Option<Section> {
    let rows: Vec<(&Model, &SceneMetrics)> =
        models.iter().filter_map(|m| m.scene.as_ref().map(|s| (m, s))).collect();
    if rows.is_empty() {
        return None;
    }
    // Per column: the analysis over the rows that have its value, and each row's index in it.
    let analyses: Vec<(Analysis, Vec<Option<usize>>)> = COLUMNS
        .iter()
        .map(|(_, key, metric, value)| {
            let mut index = Vec::new();
            let mut analysed = Vec::new();
            for (m, s) in &rows {
                if value(s).is_some() {
                    index.push(Some(analysed.len()));
                    analysed.push(Row { prose: prose(m), values: per_item(s, key) });
                } else {
                    index.push(None);
                }
            }
            (Analysis::new(metric, analysed), index)
        })
        .collect();
    let original_row = rows.iter().position(|(m, _)| m.is_original);

    let mut table = Table::new(&[("Model", Align::Left)]);
    for (title, _, _, _) in &COLUMNS {
        table.column(title.to_string(), Align::Right);
    }
    table.column("Images".to_string(), Align::Right);
    let mut json_rows = Vec::new();
    for (r, (m, s)) in rows.iter().enumerate() {
        let name = if m.is_original { "**original**".to_string() } else { format::code(&m.name) };
        let mut cells = vec![format!("{name}{}", m.lora_suffix())];
        let mut intervals = Map::new();
        for ((_, key, _, value), (analysis, index)) in COLUMNS.iter().zip(&analyses) {
            let v = value(s);
            let best = if analysis.tested() {
                // Bold only a significant lead over every other model.
                index[r].is_some_and(|i| analysis.significantly_best(i))
            } else {
                // Bold only a lead: when every model scores the same, none is best.
                let others: Vec<f64> = rows.iter().filter_map(|(_, o)| value(o)).collect();
                v.is_some_and(|v| others.iter().all(|&o| v >= o) && others.iter().any(|&o| o < v))
            };
            let shown = |v: f64| match index[r] {
                Some(i) => analysis.cell(i, v),
                None => percent(v),
            };
            cells.push(match v {
                Some(v) if best => format!("**{}**", shown(v)),
                Some(v) => shown(v),
                None => "—".into(),
            });
            if let Some(i) = index[r] {
                let interval = analysis.json(i, original_row.and_then(|o| index[o]));
                if !interval.is_null() {
                    intervals.insert(key.to_string(), interval);
                }
            }
        }
        cells.push(s.images.to_string());
        table.row(cells);
        json_rows.push(json!({
            "model": m.name,
            "label": m.label,
            "values": m.values,
            "scene": Value::Object(s.raw.clone()),
            "intervals": Value::Object(intervals),
        }));
    }
    if let Some(s) = vae_bound {
        let mut cells = vec!["*test images through the VAE*".to_string()];
        let mut intervals = Map::new();
        for (_, key, _, value) in &COLUMNS {
            let values: Vec<f64> =
                per_item(s, key).map(|p| p.values().copied().collect()).unwrap_or_default();
            let interval = bootstrap::mean_interval(&values, bootstrap::interval_seed());
            cells.push(match (value(s), interval) {
                (Some(v), Some(i)) => {
                    intervals.insert(
                        key.to_string(),
                        json!({"mean": i.estimate, "low": i.low,
                        "high": i.high, "n": i.n}),
                    );
                    format!("{} [{}, {}]", percent(v), percent(i.low), percent(i.high))
                }
                (Some(v), None) => percent(v),
                (None, _) => "—".into(),
            });
        }
        cells.push(s.images.to_string());
        table.row(cells);
        json_rows.push(json!({"model": "vae_bound", "scene": Value::Object(s.raw.clone()),
            "intervals": Value::Object(intervals)}));
    }
    let mut markdown = table.render();
    let all_tested = analyses.iter().all(|(a, _)| a.tested());
    let any_interval = analyses.iter().any(|(a, _)| a.has_intervals());
    markdown.push_str(
        "\nThe share of samples that show what their caption states, judged as GenEval judges \
         real models but with a colour classifier that knows the synthetic styles: the \
         background colour, the style (flat, textured, dusk), every named shape colour, the \
         stated left/right/above/below relations (by the centroids of the shapes' colours), and \
         all of them at once. Higher is better; ",
    );
    markdown.push_str(if all_tested {
        "each share has its bootstrap 95% interval over the images [low, high], and the best \
         value of a column is bold only when that model is significantly better than every \
         other one (a paired bootstrap of the per-image differences).\n"
    } else if any_interval {
        "shares with per-image values have their bootstrap 95% interval over the images \
         [low, high]; the best value of each column is bold (none when all are equal), and only \
         when significantly better where every model's per-image values are bound.\n"
    } else {
        "the best value of each column is bold (none when all are equal).\n"
    });
    if vae_bound.is_some() {
        markdown.push_str(
            "\nFor reference, the last row judges the test images themselves after encoding and \
             decoding by the VAE the models sample through: how much of their content the VAE \
             preserves, which limits what samples of their domain show.\n",
        );
    }
    let reference = original_row.unwrap_or(0);
    let mut sentences = Vec::new();
    let mut missing = std::collections::BTreeSet::new();
    for (analysis, index) in &analyses {
        if let Some(r) = index[reference] {
            for i in (0..rows.len()).filter(|&i| i != reference) {
                sentences.extend(index[i].and_then(|i| analysis.sentence(r, i)));
            }
        }
        missing.extend(analysis.missing().into_iter().map(str::to_string));
    }
    if !sentences.is_empty() {
        markdown.push('\n');
        markdown.extend(sentences.iter().map(|s| format!("- {s}\n")));
    }
    let notes = if missing.is_empty() {
        vec![]
    } else {
        vec![format!(
            "No per-image scene-accuracy values were bound for {} (`base_scene_per_image`, \
             `scene_per_image`), so their shares have no interval and the scene-accuracy table \
             compares them by point values only.",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        )]
    };
    Some(Section { title: "Scene accuracy", markdown, json: Value::Array(json_rows), notes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use std::collections::BTreeMap;

    fn model(name: &str, is_original: bool, background: f64, all: f64) -> Model {
        Model {
            name: name.into(),
            label: if is_original { String::new() } else { name.into() },
            values: Default::default(),
            slug: name.into(),
            is_original,
            samples: None,
            fid: None,
            lpips: None,
            cmmd: None,
            clip_score: None,
            scene: Some(SceneMetrics {
                background,
                style: Some(0.5),
                colours: 0.25,
                relations: None,
                all,
                images: 16,
                raw: Map::new(),
                per_image: None,
            }),
            train_log: None,
            validation: None,
        }
    }

    #[test]
    fn the_lead_is_bold_and_a_tie_is_not() {
        let models = [model("original", true, 0.19, 0.0), model("lr", false, 0.75, 0.0)];
        let section = build(&models, None).unwrap();
        let table = section.markdown;
        assert!(table.contains("| **75%** |"), "{table}");
        assert!(!table.contains("**0%**") && !table.contains("**50%**"), "{table}");
        assert!(table.contains("| — |"), "no relations stated: {table}");
    }

    #[test]
    fn the_vae_bound_row_has_intervals_but_is_never_bold() {
        let judged = |share: usize| -> BTreeMap<&'static str, PerItem> {
            let items = (0..16).map(|i| (format!("s{i:02}"), if i < share { 1.0 } else { 0.0 }));
            BTreeMap::from([("background", items.collect())])
        };
        let mut models = [model("original", true, 0.25, 0.0), model("lr", false, 0.75, 0.0)];
        models[0].scene.as_mut().unwrap().per_image = Some(judged(4));
        models[1].scene.as_mut().unwrap().per_image = Some(judged(12));
        let mut bound = model("bound", false, 1.0, 0.0).scene.unwrap();
        bound.per_image = Some(judged(16));
        let table = build(&models, Some(&bound)).unwrap().markdown;
        let last_row = table.lines().rfind(|l| l.starts_with('|')).unwrap();
        assert!(last_row.contains("| 100% [100%, 100%] |"), "{table}");
        assert!(!last_row.contains("**"), "{table}");
        assert!(table.contains("| **75% ["), "the significantly better model is bold: {table}");
    }

    #[test]
    fn no_section_without_scene_metrics() {
        let mut m = model("original", true, 0.5, 0.5);
        m.scene = None;
        assert!(build(&[m], None).is_none());
    }

    #[test]
    fn the_vae_bound_is_a_last_row_that_is_never_bold() {
        let models = [model("original", true, 0.19, 0.0), model("lr", false, 0.5, 0.0)];
        let bound = model("bound", false, 0.9, 0.0).scene.unwrap();
        let table = build(&models, Some(&bound)).unwrap().markdown;
        let last_row = table.lines().rfind(|l| l.starts_with('|')).unwrap();
        assert!(last_row.contains("through the VAE") && last_row.contains("| 90% |"), "{table}");
        assert!(table.contains("| **50%** |"), "the best model stays bold: {table}");
    }
}
