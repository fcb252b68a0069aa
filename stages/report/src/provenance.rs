//! Section 4: what every result derives from, from the engine's provenance: for the stages
//! shared by all variants and then for each variant, every stage's kind, version, cache key,
//! compute time and exact parameters.

use std::collections::BTreeMap;

use sdpipe_stages::api::Provenance;
use serde_json::{json, Map, Value};

use crate::format::{self, Align, Table};
use crate::models::Model;
use crate::section::Section;

/// Hex digits of a key shown in tables; the full key is in the details block.
const SHORT_KEY: usize = 12;

/// One upstream stage as the engine describes it.
struct Stage<'a> {
    name: &'a str,
    kind: &'a str,
    version: Option<u64>,
    params: Option<&'a BTreeMap<String, Value>>,
    key: &'a str,
    seconds: Option<f64>,
    point: &'a str,
}

fn stages(provenance: &Provenance) -> Vec<Stage<'_>> {
    provenance
        .stages
        .iter()
        .map(|s| Stage {
            name: &s.name,
            kind: &s.kind,
            version: Some(u64::from(s.version)),
            params: Some(&s.params),
            key: &s.key,
            seconds: Some(s.seconds),
            point: &s.point,
        })
        .collect()
}

/// The stages of sample kind, with the point they belong to, for the caveats' sampler notes.
pub fn sample_settings(provenance: &Provenance) -> Vec<(String, Map<String, Value>)> {
    stages(provenance)
        .into_iter()
        .filter(|s| s.kind == "sample")
        .map(|s| {
            let params = s.params.into_iter().flatten().map(|(k, v)| (k.clone(), v.clone()));
            (s.name.to_string(), params.collect())
        })
        .collect()
}

pub fn build(provenance: &Provenance, models: &[Model]) -> Option<Section> {
    let all = stages(provenance);
    if all.is_empty() {
        return None;
    }
    // Groups: shared stages first, then the variants in report order, then any other point.
    let mut order: Vec<String> = vec![String::new()];
    order.extend(models.iter().filter(|m| !m.is_original).map(|m| m.label.clone()));
    let mut rest: Vec<String> = all.iter().map(|s| s.point.to_string()).collect();
    rest.sort();
    rest.dedup();
    for point in rest {
        if !order.contains(&point) {
            order.push(point);
        }
    }
    let shared_seconds: f64 =
        all.iter().filter(|s| s.point.is_empty()).filter_map(|s| s.seconds).sum();

    let mut markdown = String::from(
        "Every stage the report derives from, with its cache key and the time its result took \
         to compute when it ran (a cached result keeps its original time). Expand a group for \
         each stage's exact parameters and full key.\n",
    );
    let mut shared = Value::Null;
    let mut points = Map::new();
    for point in &order {
        let group: Vec<&Stage> = all.iter().filter(|s| s.point == point.as_str()).collect();
        if group.is_empty() {
            continue;
        }
        let heading = if point.is_empty() {
            if order.len() > 1 {
                "Shared stages (every variant)".to_string()
            } else {
                "Stages".to_string()
            }
        } else {
            format!("Variant {}", format::code(point))
        };
        markdown.push_str(&format!("\n### {heading}\n\n"));
        let mut table = Table::new(&[
            ("Stage", Align::Left),
            ("Kind", Align::Left),
            ("Key", Align::Left),
            ("Seconds", Align::Right),
        ]);
        let mut details = String::new();
        let mut json_stages = Vec::new();
        for s in &group {
            let version = s.version.map(|v| format!(" v{v}")).unwrap_or_default();
            let row = vec![
                format::code(s.name),
                format!("{}{version}", format::code(s.kind)),
                format::code(&s.key.chars().take(SHORT_KEY).collect::<String>()),
                s.seconds.map(format::num).unwrap_or_else(|| "—".into()),
            ];
            table.row(row);
            details.push_str(&format!(
                "**{}** ({}{version}), key {}\n\n",
                format::code(s.name),
                format::code(s.kind),
                format::code(s.key)
            ));
            let params: BTreeMap<&String, &Value> =
                s.params.map(|p| p.iter().collect()).unwrap_or_default();
            if params.is_empty() {
                details.push_str("No parameters.\n\n");
            } else {
                let mut t = Table::new(&[("Parameter", Align::Left), ("Value", Align::Left)]);
                for (name, value) in &params {
                    t.row(vec![format::code(name), format::code(&value.to_string())]);
                }
                details.push_str(&t.render());
                details.push('\n');
            }
            json_stages.push(json!({
                "name": s.name,
                "kind": s.kind,
                "version": s.version,
                "key": s.key,
                "seconds": s.seconds,
                "params": s.params,
            }));
        }
        let own: f64 = group.iter().filter_map(|s| s.seconds).sum();
        table.row(vec![
            "**total**".into(),
            String::new(),
            String::new(),
            format!("**{}**", format::num(own)),
        ]);
        markdown.push_str(&table.render());
        if !point.is_empty() && shared_seconds > 0.0 {
            markdown.push_str(&format!(
                "\nWith the shared stages: {} s of compute for this variant end to end.\n",
                format::num(own + shared_seconds)
            ));
        }
        markdown.push_str(&format!(
            "\n<details><summary>Parameters and full cache keys ({} stage{})</summary>\n\n{}\
             </details>\n",
            group.len(),
            if group.len() == 1 { "" } else { "s" },
            details
        ));
        let group = json!({"seconds": own, "stages": json_stages});
        if point.is_empty() {
            shared = group;
        } else {
            points.insert(point.clone(), group);
        }
    }
    Some(Section {
        title: "Provenance",
        markdown,
        json: json!({"shared": shared, "points": points}),
        notes: vec![],
    })
}
