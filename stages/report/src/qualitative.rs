//! Section 2: one row per test image (sorted by id, at most `max_rows`): its caption, the
//! ground-truth photo, and every model's sample for that caption with its LPIPS to the photo
//! and, where scene accuracy judged it, whether it shows the caption's background and style, so
//! a reader can check the metric against the picture.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::bootstrap::PerItem;
use crate::error::ReportError;
use crate::format::{self, Align, Table};
use crate::inputs::TestItem;
use crate::models::Model;
use crate::section::Section;
use crate::thumbs;

pub struct Options<'a> {
    pub report: &'a Path,
    pub max_rows: usize,
    pub thumb_size: u32,
}

pub fn build(
    items: Option<&[TestItem]>,
    models: &[Model],
    opts: &Options<'_>,
) -> Result<Option<Section>, ReportError> {
    let shown: Vec<&Model> = models.iter().filter(|m| m.samples.is_some()).collect();
    if shown.is_empty() || opts.max_rows == 0 {
        return Ok(None);
    }
    // The ground truth decides which ids are test images; without it, every sampled id.
    let ids: Vec<String> = match items {
        Some(items) => items.iter().map(|i| i.id.clone()).collect(),
        None => shown
            .iter()
            .flat_map(|m| m.samples.iter().flat_map(|s| s.images.keys().cloned()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let total = ids.len();
    let ids = &ids[..total.min(opts.max_rows)];

    let mut table = Table::new(&[("Caption", Align::Left)]);
    if items.is_some() {
        table.column("Ground truth", Align::Center);
    }
    for m in &shown {
        let title = if m.is_original { "Original".to_string() } else { format::code(&m.name) };
        table.column(format!("{title}{}", m.lora_suffix()), Align::Center);
    }

    let mut notes = Vec::new();
    let mut rows = Vec::new();
    for id in ids {
        let item = items.and_then(|items| items.iter().find(|i| &i.id == id));
        let caption = item
            .map(|i| i.caption.clone())
            .or_else(|| shown.iter().find_map(|m| m.samples.as_ref()?.record(id)?.prompt.clone()));
        let mut cells = vec![caption.as_deref().map(format::cell).unwrap_or_default()];
        let mut ground_truth = Value::Null;
        if let Some(item) = item {
            let rel = thumbs::thumbnail(
                &item.image,
                opts.report,
                "images/ground_truth",
                &file_stem(id),
                opts.thumb_size,
            )?;
            cells.push(format!("![ground truth {}]({})", format::cell(id), format::url(&rel)));
            ground_truth = json!(rel);
        }
        let mut json_cells = Vec::new();
        for m in &shown {
            let samples = m.samples.as_ref().expect("filtered above");
            let Some(src) = samples.image(id) else {
                cells.push("—".into());
                json_cells.push(json!({"model": m.name, "image": null, "lpips": null}));
                continue;
            };
            let rel = thumbs::thumbnail(
                src,
                opts.report,
                &format!("images/{}", m.slug),
                &file_stem(id),
                opts.thumb_size,
            )?;
            let stem = src.file_stem().map(|s| s.to_string_lossy().into_owned());
            let lpips = m
                .lpips
                .as_ref()
                .and_then(|l| l.per_image.as_ref())
                .and_then(|p| per_sample(p, stem.as_deref(), id));
            let mut cell =
                format!("![{} {}]({})", format::cell(&m.name), format::cell(id), format::url(&rel));
            if let Some(l) = lpips {
                cell.push_str(&format!("<br>LPIPS {}", format::num(l)));
            }
            let judged = scene_judgements(m, stem.as_deref(), id);
            if !judged.is_empty() {
                let marks: Vec<String> = judged
                    .iter()
                    .map(|(what, shown)| format!("{what} {}", if *shown { "✓" } else { "✗" }))
                    .collect();
                cell.push_str(&format!("<br>{}", marks.join(", ")));
            }
            cells.push(cell);
            let scene: serde_json::Map<String, Value> =
                judged.iter().map(|(what, shown)| (what.to_string(), json!(shown))).collect();
            json_cells.push(json!({
                "model": m.name,
                "image": rel,
                "lpips": lpips,
                "scene": if scene.is_empty() { Value::Null } else { Value::Object(scene) },
            }));
        }
        table.row(cells);
        rows.push(json!({
            "id": id,
            "caption": caption,
            "ground_truth": ground_truth,
            "samples": json_cells,
        }));
    }

    for m in &shown {
        let samples = m.samples.as_ref().expect("filtered above");
        let missing = ids.iter().filter(|id| samples.image(id).is_none()).count();
        if missing > 0 {
            notes.push(format!(
                "{} has no sample for {missing} of the {} test images shown: was it sampled \
                 from the same split?",
                if m.is_original {
                    "The original model".to_string()
                } else {
                    format::code(&m.name)
                },
                ids.len()
            ));
        }
    }

    let mut markdown = String::new();
    markdown.push_str(&format!(
        "{} of {total} test images, sorted by id.{}\n\n",
        ids.len(),
        under_each_sample(&shown),
    ));
    markdown.push_str(&table.render());
    Ok(Some(Section {
        title: "Qualitative comparison",
        markdown,
        json: json!({"total": total, "rows": rows}),
        notes,
    }))
}

/// The thumbnail's file stem: the id itself (ids are file stems already, so distinct ids stay
/// distinct files), or its slug if it could not be a plain file name.
fn file_stem(id: &str) -> String {
    let plain = !id.is_empty()
        && !id.starts_with('.')
        && !id.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    if plain {
        id.to_string()
    } else {
        format::slug(id)
    }
}

/// The scene-accuracy judgements of one sample that the report shows (background, style),
/// `true` when the sample shows what its caption states; empty when none was judged.
fn scene_judgements(model: &Model, stem: Option<&str>, id: &str) -> Vec<(&'static str, bool)> {
    let Some(per_image) = model.scene.as_ref().and_then(|s| s.per_image.as_ref()) else {
        return Vec::new();
    };
    ["background", "style"]
        .into_iter()
        .filter_map(|what| Some((what, per_sample(per_image.get(what)?, stem, id)? > 0.5)))
        .collect()
}

/// A sample's value in a per-image file: under its image's stem (unique per draw), else under
/// its id.
fn per_sample(items: &PerItem, stem: Option<&str>, id: &str) -> Option<f64> {
    stem.and_then(|s| items.get(s)).or_else(|| items.get(id)).copied()
}

/// The sentence saying what is under each sample.
fn under_each_sample(shown: &[&Model]) -> &'static str {
    let lpips = shown.iter().any(|m| m.lpips.as_ref().is_some_and(|l| l.per_image.is_some()));
    let scene = shown.iter().any(|m| m.scene.as_ref().is_some_and(|s| s.per_image.is_some()));
    match (lpips, scene) {
        (false, false) => "",
        (true, false) => {
            " Under each sample: its LPIPS distance to the ground-truth photo (lower is closer)."
        }
        (false, true) => {
            " Under each sample: whether scene accuracy judged it to show the caption's \
             background colour and style (✓) or not (✗)."
        }
        (true, true) => {
            " Under each sample: its LPIPS distance to the ground-truth photo (lower is closer), \
             and whether scene accuracy judged it to show the caption's background colour and \
             style (✓) or not (✗)."
        }
    }
}
