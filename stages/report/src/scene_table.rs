//! Section: scene accuracy — how often each model's samples show what their synthetic captions
//! say (`scene-accuracy` stages: background colour, shape colours, relations, all at once).
//! Higher is better; the best value of each column is bold.

use serde_json::{json, Value};

use crate::format::{self, Align, Table};
use crate::inputs::SceneMetrics;
use crate::models::Model;
use crate::section::Section;

const COLUMNS: [(&str, &str, fn(&SceneMetrics) -> Option<f64>); 5] = [
    ("Background ↑", "background", |s| Some(s.background)),
    ("Style ↑", "style", |s| s.style),
    ("Shape colours ↑", "colours", |s| Some(s.colours)),
    ("Relations ↑", "relations", |s| s.relations),
    ("All ↑", "all", |s| Some(s.all)),
];

/// The table's rows are the models; `vae_bound`, when given, adds the test images decoded by
/// the VAE as a last row for reference, never bold (it is not a model).
pub fn build(models: &[Model], vae_bound: Option<&SceneMetrics>) -> Option<Section> {
    let rows: Vec<(&Model, &SceneMetrics)> =
        models.iter().filter_map(|m| m.scene.as_ref().map(|s| (m, s))).collect();
    if rows.is_empty() {
        return None;
    }
    let mut table = Table::new(&[("Model", Align::Left)]);
    for (title, _, _) in COLUMNS {
        table.column(title.to_string(), Align::Right);
    }
    table.column("Images".to_string(), Align::Right);
    let mut json_rows = Vec::new();
    for (m, s) in &rows {
        let name = if m.is_original { "**original**".to_string() } else { format::code(&m.name) };
        let mut cells = vec![name];
        for (_, _, value) in COLUMNS {
            let v = value(s);
            // Bold only a lead: when every model scores the same, none is best.
            let others: Vec<f64> = rows.iter().filter_map(|(_, o)| value(o)).collect();
            let best =
                v.is_some_and(|v| others.iter().all(|&o| v >= o) && others.iter().any(|&o| o < v));
            cells.push(match v {
                Some(v) if best => format!("**{}**", percent(v)),
                Some(v) => percent(v),
                None => "—".into(),
            });
        }
        cells.push(s.images.to_string());
        table.row(cells);
        json_rows.push(json!({
            "model": m.name,
            "label": m.label,
            "values": m.values,
            "scene": Value::Object(s.raw.clone()),
        }));
    }
    if let Some(s) = vae_bound {
        let mut cells = vec!["*test images through the VAE*".to_string()];
        cells.extend(COLUMNS.iter().map(|(_, _, value)| value(s).map_or("—".into(), percent)));
        cells.push(s.images.to_string());
        table.row(cells);
        json_rows.push(json!({"model": "vae_bound", "scene": Value::Object(s.raw.clone())}));
    }
    let mut markdown = table.render();
    markdown.push_str(
        "\nThe share of samples that show what their caption states, judged as GenEval judges \
         real models but with a colour classifier that knows the synthetic styles: the \
         background colour, the style (flat, textured, dusk), every named shape colour, the stated left/right/above/below \
         relations (by the centroids of the shapes' colours), and all of them at once. Higher \
         is better; the best value of each column is bold (none when all are equal).\n",
    );
    if vae_bound.is_some() {
        markdown.push_str(
            "\nFor reference, the last row judges the test images themselves after encoding and \
             decoding by the VAE the models sample through: how much of their content the VAE \
             preserves, which limits what samples of their domain show.\n",
        );
    }
    Some(Section {
        title: "Scene accuracy",
        markdown,
        json: Value::Array(json_rows),
        notes: vec![],
    })
}

fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

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
            scene: Some(SceneMetrics {
                background,
                style: Some(0.5),
                colours: 0.25,
                relations: None,
                all,
                images: 16,
                raw: Map::new(),
            }),
            train_log: None,
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
        let last_row = table.lines().filter(|l| l.starts_with('|')).last().unwrap();
        assert!(last_row.contains("through the VAE") && last_row.contains("| 90% |"), "{table}");
        assert!(table.contains("| **50%** |"), "the best model stays bold: {table}");
    }
}
