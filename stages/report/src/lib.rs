//! The `report` stage kind: the experiment's write-up as a generated markdown report.
//!
//! From whatever a pipeline binds — the test split, the original model's samples and metrics,
//! each finetuned variant's samples, metrics, training log and validation images (one per
//! sweep point when gathered), and the engine's provenance — it writes `report/README.md` (renders on GitHub),
//! `report/images/` (resized copies of the images it shows), `report/loss.svg` and
//! `report/report.json` (the same numbers, machine-readable). Every figure comes from the
//! inputs; nothing is timestamped and everything is sorted, so the same inputs give the same
//! bytes.
//!
//! Modules: [`inputs`] reads the upstream files, [`models`] joins them into the compared
//! models, and each section has its own module: [`metrics_table`], [`sweep_table`],
//! [`scene_table`], [`qualitative`], [`loss`], [`progression`], [`provenance`], [`caveats`]. Per-image metrics get bootstrap
//! intervals and significance tests from [`bootstrap`] through [`significance`].

pub mod bootstrap;
pub mod caveats;
pub mod error;
pub mod format;
pub mod inputs;
pub mod loss;
pub mod metrics_table;
pub mod models;
pub mod progression;
pub mod provenance;
pub mod qualitative;
pub mod scene_table;
pub mod section;
pub mod significance;
pub mod sweep_table;
pub mod thumbs;

use std::fs;
use std::sync::Arc;

use sdpipe_stages::api::{OutputKind, OutputSpec, ParamSpec, StageContext, StageError, StageKind};
use sdpipe_stages::params::{Input, KindParams};
use serde_json::{json, Map, Value};

pub use error::ReportError;
use models::{BaseInputs, Model, VariantInputs};
use section::Section;

/// The kinds this crate provides.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![Arc::new(Report)]
}

pub struct Report;

/// The output folder.
pub const REPORT: &str = "report";

/// The parameters. Every input is optional: its section is left out when it is unbound.
#[derive(KindParams)]
struct Settings {
    /// The report's heading.
    #[param(default = "Finetuning report")]
    title: String,
    /// The split of `dataset` whose images are the ground truth.
    #[param(default = "test")]
    split: String,
    /// Rows of the qualitative table (test images in id order); 0 leaves it out.
    #[param(default = 10, min = 0)]
    max_rows: usize,
    /// Images copied into the report are downscaled to fit this many pixels a side, or enlarged
    /// by a whole factor (each pixel a square block) when at most half as large.
    #[param(default = 256, min = 16, max = 4096)]
    thumb_size: u32,
    /// An imagefolder stage's `dataset` (ground truth and captions).
    #[param(input, default = null)]
    dataset: Option<Input>,
    #[param(flatten)]
    base: BaseInputs,
    // Declared, not read from here: see `VariantInputs`.
    #[param(flatten)]
    _variants: VariantInputs,
    /// Scene-accuracy `metrics` of the test images through the VAE (a train-vae stage's
    /// reconstructions): a reference row for what the VAE preserves.
    #[param(input, default = null)]
    vae_scene: Option<Input>,
    /// The same stage's scene-accuracy `per_image`.
    #[param(input, default = null)]
    vae_scene_per_image: Option<Input>,
}

impl StageKind for Report {
    fn name(&self) -> &'static str {
        "report"
    }

    fn version(&self) -> u32 {
        // 3: the provenance table lost its never-filled `Cached` column.
        // 4: the scene-accuracy table can end with the test images through the VAE.
        // 5: per-image metrics (LPIPS, scene accuracy) with bootstrap 95% intervals; marks
        //    only for significant differences, and a sentence per metric saying which is better.
        // 6: CMMD and CLIP score columns (`*cmmd`, `*clip_score*` inputs), the CLIP score with a
        //    bootstrap interval; a caveat for each.
        // 7: a progression grid of each variant's validation images (the `validation` input).
        // A model sampled with a LoRA (`lora` in its samples.jsonl) is labelled with it in the
        // tables and report.json; reports of samples without one are byte-identical, and no
        // cached report can have read a LoRA's samples before this: no bump.
        // 8: a `Sweep` section (`sweep` in report.json) after the metrics table: the
        //    `exp show`-style table of each model's swept parameters and headline metrics.
        // 9: images at most half of `thumb_size` are enlarged by a whole factor (PNG).
        // 10: under each sample of the qualitative table, its scene-accuracy judgements
        //     (background, style), also in report.json (`scene` of each sample).
        10
    }

    fn doc(&self) -> &'static str {
        "Writes the experiment's report: `report/README.md` with a metrics table (FID, KID, \
         CMMD, LPIPS and CLIP score of the original model and of each finetuned variant, each \
         column only when bound, with the change from the original), a sweep table like \
         `sdpipe exp show --only-changed` (one row per model: the swept parameters that differ \
         and the headline metrics; only over a sweep), a scene-accuracy table, a qualitative table (caption | ground truth | each model's sample with its \
         LPIPS and whether scene accuracy judged its background and style right), the training-loss plot `loss.svg` with a table of steps, losses and time, a \
         progression grid per variant of the images its train stage drew during training \
         (rows: validation prompts, columns: steps), the provenance of every variant (each stage's parameters, cache key and compute time) and \
         caveats worked out from the inputs; plus `report.json` with the same numbers and \
         copies of the images under `images/`, downscaled or, when small, enlarged pixel for \
         pixel. Every input is optional and its \
         section is left out when unbound; mark the stage `gather: true` to get one row or \
         column per sweep point. Per-image metrics (LPIPS, CLIP score, scene accuracy) whose \
         `*_per_image` outputs are bound get a bootstrap 95% interval, and a model is marked better only \
         when the (paired, per image) bootstrap finds the difference significant. A model \
         whose samples.jsonl records a LoRA (the sample stage's `lora`) is labelled with it in \
         the tables: `(LoRA r=4, α=8, scale 1)`."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            path: REPORT,
            kind: OutputKind::Dir,
            doc: "`README.md`, `report.json`, `loss.svg` and `images/`.",
        }]
    }

    fn wants_provenance(&self) -> bool {
        true
    }

    fn headline(&self) -> Option<&'static str> {
        Some("report/README.md")
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let (title, split) = (&settings.title, &settings.split);
        let (max_rows, thumb_size) = (settings.max_rows, settings.thumb_size);
        let report = ctx.output_path(REPORT);
        fs::create_dir_all(&report).map_err(|e| StageError::io("creating report/", e))?;

        let models = models::gather(ctx, &settings.base)?;
        let items = match &settings.dataset {
            Some(dataset) => Some(inputs::read_test_items(dataset.path(), split)?),
            None => None,
        };
        ctx.cancel.check()?;

        let mut sections: Vec<Section> = Vec::new();
        sections.extend(metrics_table::build(&models));
        sections.extend(sweep_table::build(&models));
        let vae_scene = match &settings.vae_scene {
            Some(input) => {
                let per_image = settings.vae_scene_per_image.as_ref();
                let per_image = per_image.map(|p| ("vae_scene_per_image", p.path()));
                Some(inputs::read_scene("vae_scene", input.path(), per_image)?)
            }
            None => None,
        };
        sections.extend(scene_table::build(&models, vae_scene.as_ref()));
        let options = qualitative::Options { report: &report, max_rows, thumb_size };
        sections.extend(qualitative::build(items.as_deref(), &models, &options)?);
        ctx.cancel.check()?;
        sections.extend(loss::build(&models, &report)?);
        sections.extend(progression::build(&models, &report, thumb_size)?);
        sections.extend(provenance::build(ctx.provenance, &models));
        let notes = sections.iter_mut().flat_map(|s| std::mem::take(&mut s.notes)).collect();
        sections.extend(caveats::build(&models, ctx.provenance, notes));

        let readme = readme(title, split, items.as_deref().map(<[_]>::len), &models, &sections);
        write(&report.join("README.md"), readme.as_bytes())?;
        let mut json = Map::new();
        json.insert("title".into(), json!(title));
        json.insert("split".into(), json!(split));
        let mut summaries: Vec<Value> = models.iter().map(summary).collect();
        // Only when some model was sampled with a LoRA, so reports without one keep their bytes.
        if models.iter().any(|m| m.lora().is_some()) {
            for (s, m) in summaries.iter_mut().zip(&models) {
                s["lora"] = json!(m.lora());
            }
        }
        json.insert("models".into(), json!(summaries));
        for s in &sections {
            json.insert(s.key(), s.json.clone());
        }
        let text = serde_json::to_string_pretty(&Value::Object(json)).expect("JSON serialises");
        write(&report.join("report.json"), format!("{text}\n").as_bytes())?;
        writeln!(
            ctx.log,
            "report: {} model(s), sections: {}",
            models.len(),
            sections.iter().map(|s| s.title).collect::<Vec<_>>().join(", ")
        )
        .map_err(|e| StageError::io("writing the log", e))?;
        Ok(())
    }
}

fn write(path: &std::path::Path, bytes: &[u8]) -> Result<(), StageError> {
    fs::write(path, bytes)
        .map_err(|source| ReportError::Write { path: path.to_path_buf(), source }.into())
}

fn summary(m: &Model) -> Value {
    json!({
        "name": m.name,
        "label": m.label,
        "values": m.values,
        "original": m.is_original,
        "images_dir": if m.samples.is_some() { Some(format!("images/{}", m.slug)) } else { None },
    })
}

fn readme(
    title: &str,
    split: &str,
    test_images: Option<usize>,
    models: &[Model],
    sections: &[Section],
) -> String {
    let mut out = format!("# {}\n\n", format::cell(title));
    let variants: Vec<&Model> = models.iter().filter(|m| !m.is_original).collect();
    let has_original = models.iter().any(|m| m.is_original);
    let mut intro = Vec::new();
    if !variants.is_empty() || has_original {
        let names = variants.iter().map(|m| format::code(&m.name)).collect::<Vec<_>>().join(", ");
        intro.push(match (has_original, variants.len()) {
            (true, 0) => "The original model".to_string(),
            (true, 1) => format!("The original model against the finetuned variant {names}"),
            (true, n) => format!("The original model against {n} finetuned variants: {names}"),
            (false, 1) => format!("The finetuned variant {names}"),
            (false, n) => format!("{n} finetuned variants: {names}"),
        });
    }
    if let Some(n) = test_images {
        intro.push(format!("evaluated on the {} split ({n} images)", format::code(split)));
    }
    if !intro.is_empty() {
        out.push_str(&format!("{}.\n\n", intro.join(", ")));
    }
    if sections.is_empty() {
        out.push_str("No inputs were bound, so there is nothing to report.\n");
        return out;
    }
    out.push_str(
        "Generated by sdpipe's `report` stage from its inputs alone; [`report.json`](report.json) \
         holds the same numbers.\n\n",
    );
    for s in sections {
        out.push_str(&format!("- [{}](#{})\n", s.title, s.anchor()));
    }
    for s in sections {
        out.push_str(&format!("\n## {}\n\n{}", s.title, s.markdown));
    }
    out
}
