//! Validation images during training as a progression grid per variant, from each train
//! stage's `validation/` output: one row per validation prompt, one column per validated step
//! (at most [`MAX_COLUMNS`], evenly spread, the first and the last always), each cell the
//! image drawn with the weights of that step. Thumbnails go under
//! `images/<variant>/validation/`.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::ReportError;
use crate::format::{self, Align, Table};
use crate::inputs::Validation;
use crate::models::Model;
use crate::section::Section;
use crate::thumbs;

/// Columns a grid shows at most: more would shrink every image on a page.
pub const MAX_COLUMNS: usize = 8;

/// At most `max` (≥ 2) of `steps`, evenly spread, keeping the first and the last.
pub fn shown_steps(steps: &[u64], max: usize) -> Vec<u64> {
    if steps.len() <= max {
        return steps.to_vec();
    }
    // Index k·last/(max − 1), rounded to the nearest: distinct, since last > max − 1.
    let last = steps.len() - 1;
    (0..max).map(|k| steps[(k * last + (max - 1) / 2) / (max - 1)]).collect()
}

/// How the images were drawn, in words, from `validation.json`'s settings.
fn describe(validation: &Validation) -> String {
    let s = &validation.settings;
    let mut parts = Vec::new();
    if let Some(scheduler) = s.get("scheduler").and_then(Value::as_str) {
        parts.push(format::code(scheduler));
    }
    if let Some(n) = s.get("num_inference_steps").and_then(Value::as_u64) {
        parts.push(format!("{n} inference steps"));
    }
    if let Some(g) = s.get("guidance_scale").and_then(Value::as_f64) {
        parts.push(format!("guidance {}", format::short(g)));
    }
    if let Some(seed) = s.get("seed").and_then(Value::as_u64) {
        parts.push(format!("seed {seed} (prompt i: seed + i)"));
    }
    if let Some(side) = s.get("resolution").and_then(Value::as_u64) {
        parts.push(format!("{side}×{side} px"));
    }
    parts.join(", ")
}

pub fn build(
    models: &[Model],
    report: &Path,
    thumb_size: u32,
) -> Result<Option<Section>, ReportError> {
    let shown: Vec<(&Model, &Validation)> = models
        .iter()
        .filter_map(|m| m.validation.as_ref().map(|v| (m, v)))
        .filter(|(_, v)| !v.images.is_empty())
        .collect();
    if shown.is_empty() {
        return Ok(None);
    }
    let mut markdown = String::from(
        "Images drawn with the validation prompts during training, with the weights of each \
         step (the EMA's when the run kept one): one row per prompt, one column per step.\n",
    );
    let mut json_models = Vec::new();
    let mut notes = Vec::new();
    for (model, validation) in shown {
        let steps = shown_steps(&validation.steps, MAX_COLUMNS);
        markdown.push_str(&format!("\n### {}\n\n", format::code(&model.name)));
        let mut about = describe(validation);
        if steps.len() < validation.steps.len() {
            about.push_str(&format!(
                "; {} of its {} validated steps, evenly spread",
                steps.len(),
                validation.steps.len()
            ));
        }
        if !about.is_empty() {
            markdown.push_str(&format!("{about}.\n\n"));
        }
        let mut table = Table::new(&[("Prompt", Align::Left)]);
        for step in &steps {
            table.column(format!("Step {step}"), Align::Center);
        }
        let mut rows = Vec::new();
        let mut missing = 0;
        for (i, prompt) in validation.prompts.iter().enumerate() {
            let mut cells = vec![format::cell(prompt)];
            let mut images = Vec::new();
            for &step in &steps {
                let Some(source) = validation.images.get(&(step, i)) else {
                    missing += 1;
                    cells.push("—".into());
                    images.push(Value::Null);
                    continue;
                };
                let rel = thumbs::thumbnail(
                    source,
                    report,
                    &format!("images/{}/validation/step-{step:06}", model.slug),
                    &format!("prompt-{i:02}"),
                    thumb_size,
                )?;
                cells.push(format!("![step {step}, prompt {i}]({})", format::url(&rel)));
                images.push(json!(rel));
            }
            table.row(cells);
            rows.push(json!({"prompt": prompt, "images": images}));
        }
        markdown.push_str(&table.render());
        if missing > 0 {
            notes.push(format!(
                "{}'s validation output lacks {missing} of the images its grid shows.",
                format::code(&model.name)
            ));
        }
        json_models.push(json!({
            "model": model.name,
            "label": model.label,
            "settings": validation.settings,
            "steps": validation.steps,
            "shown_steps": steps,
            "rows": rows,
        }));
    }
    Ok(Some(Section {
        title: "Validation during training",
        markdown,
        json: Value::Array(json_models),
        notes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_steps_are_all_shown() {
        assert_eq!(shown_steps(&[50, 100, 150], 8), vec![50, 100, 150]);
    }

    #[test]
    fn many_steps_are_thinned_evenly_keeping_the_first_and_the_last() {
        let steps: Vec<u64> = (1..=40).map(|s| s * 10).collect();
        let shown = shown_steps(&steps, 5);
        assert_eq!(shown, vec![10, 110, 210, 300, 400]);
    }
}
