//! Section 1: FID, KID and LPIPS of every model, with each variant's change from the original.
//! Lower is better for all three; the best value of each column is bold.

use serde_json::{json, Map, Value};

use crate::format::{self, Align, Table};
use crate::models::Model;
use crate::section::Section;

/// The one number of a metric column, for a model that has it.
struct Column {
    title: &'static str,
    /// Its key in `report.json`'s deltas.
    key: &'static str,
    value: fn(&Model) -> Option<f64>,
    /// The spread shown next to the value (KID's std over subsets).
    spread: fn(&Model) -> Option<f64>,
}

const COLUMNS: [Column; 3] = [
    Column { title: "FID", key: "fid", value: |m| m.fid.as_ref().map(|f| f.fid), spread: |_| None },
    Column {
        title: "KID",
        key: "kid_mean",
        value: |m| m.fid.as_ref().and_then(|f| f.kid_mean),
        spread: |m| m.fid.as_ref().and_then(|f| f.kid_std),
    },
    Column {
        title: "LPIPS",
        key: "lpips",
        value: |m| m.lpips.as_ref().map(|l| l.lpips),
        spread: |_| None,
    },
];

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

    let mut json_rows = Vec::new();
    for m in &rows {
        let name = if m.is_original { "**original**".to_string() } else { format::code(&m.name) };
        let mut cells = vec![name];
        let mut deltas = Map::new();
        for c in &present {
            let value = (c.value)(m);
            let best = rows.len() > 1
                && value.is_some_and(|v| {
                    rows.iter().filter_map(|r| (c.value)(r)).all(|other| v <= other)
                });
            cells.push(match value {
                Some(v) if best => format!("**{}**", format::mean_std(v, (c.spread)(m))),
                Some(v) => format::mean_std(v, (c.spread)(m)),
                None => "—".into(),
            });
            if let Some(o) = original {
                let base = (c.value)(o);
                cells.push(match (value, base) {
                    _ if m.is_original => "—".into(),
                    (Some(v), Some(b)) => {
                        deltas.insert(c.key.to_string(), json!(v - b));
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
            "delta_vs_original": if m.is_original || original.is_none() {
                Value::Null
            } else {
                Value::Object(deltas)
            },
        }));
    }

    let mut markdown = table.render();
    markdown.push_str(
        "\nLower is better for all three metrics; the best value of each column is bold.",
    );
    if original.is_some() {
        markdown.push_str(
            " Δ is the change from the original model (▼ better, ▲ worse); a KID change no larger \
             than the larger of the two KID standard deviations is marked *within ±std*.",
        );
    }
    markdown.push('\n');
    Some(Section { title: "Metrics", markdown, json: Value::Array(json_rows), notes: vec![] })
}
