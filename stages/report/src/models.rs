//! The models a report compares: the original (the `base_*` inputs) and one finetuned variant
//! per sweep point (the gathered per-variant inputs, joined by their point label).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use sdpipe_stages::api::{GatheredInput, StageContext};
use sdpipe_stages::params::{Input, KindParams};
use serde_json::Value;

use crate::error::ReportError;
use crate::format;
use crate::inputs::{
    self, ClipScoreMetrics, CmmdMetrics, FidMetrics, LoraRecord, LpipsMetrics, Samples,
    SceneMetrics, TrainStep, Validation,
};

/// One compared model and everything read about it.
#[derive(Debug, Clone)]
pub struct Model {
    /// How the report names it: `original`, the sweep label, or `finetuned` outside a sweep.
    pub name: String,
    /// The sweep point's label (empty for the original and outside a sweep).
    pub label: String,
    /// The swept values of its point (`stage.param` → value).
    pub values: BTreeMap<String, Value>,
    /// Its folder under `images/`.
    pub slug: String,
    pub is_original: bool,
    pub samples: Option<Samples>,
    pub fid: Option<FidMetrics>,
    pub lpips: Option<LpipsMetrics>,
    pub cmmd: Option<CmmdMetrics>,
    pub clip_score: Option<ClipScoreMetrics>,
    pub scene: Option<SceneMetrics>,
    pub train_log: Option<Vec<TrainStep>>,
    /// Images drawn during training (None when unbound or when the run drew none).
    pub validation: Option<Validation>,
}

impl Model {
    /// Whether it has any metric of the metrics table.
    pub fn has_table_metrics(&self) -> bool {
        self.fid.is_some()
            || self.lpips.is_some()
            || self.cmmd.is_some()
            || self.clip_score.is_some()
    }

    /// The LoRA its samples were drawn with (read from its `samples.jsonl`).
    pub fn lora(&self) -> Option<&LoraRecord> {
        self.samples.as_ref()?.lora()
    }

    /// What tables write after the model's name: ` (LoRA r=4, α=8, scale 1)` for a model
    /// sampled with a LoRA, else nothing (so reports without LoRAs keep their bytes).
    pub fn lora_suffix(&self) -> String {
        match self.lora() {
            Some(lora) => format!(" ({})", format::cell(&lora.label())),
            None => String::new(),
        }
    }
}

/// The sentence that explains the LoRA labels, when any model has one.
pub fn lora_legend(models: &[&Model]) -> Option<&'static str> {
    models.iter().any(|m| m.lora().is_some()).then_some(
        "(LoRA r, α, scale): the model was sampled with a LoRA of rank r and alpha α merged \
         into its UNet at that scale (the sample stage's `lora_scale`: W + scale·(α/r)·B·A).",
    )
}

/// The input names read for the original and for each variant.
pub struct InputNames {
    pub samples: &'static str,
    pub samples_jsonl: &'static str,
    pub fid: &'static str,
    pub lpips: &'static str,
    pub lpips_per_image: &'static str,
    pub cmmd: &'static str,
    pub clip_score: &'static str,
    pub clip_score_per_image: &'static str,
    pub scene: &'static str,
    pub scene_per_image: &'static str,
    pub train_log: Option<&'static str>,
    pub validation: Option<&'static str>,
}

pub const BASE: InputNames = InputNames {
    samples: "base_samples",
    samples_jsonl: "base_samples_jsonl",
    fid: "base_fid",
    lpips: "base_lpips",
    lpips_per_image: "base_lpips_per_image",
    cmmd: "base_cmmd",
    clip_score: "base_clip_score",
    clip_score_per_image: "base_clip_score_per_image",
    scene: "base_scene",
    scene_per_image: "base_scene_per_image",
    train_log: None,
    validation: None,
};

pub const VARIANT: InputNames = InputNames {
    samples: "samples",
    samples_jsonl: "samples_jsonl",
    fid: "fid",
    lpips: "lpips",
    lpips_per_image: "lpips_per_image",
    cmmd: "cmmd",
    clip_score: "clip_score",
    clip_score_per_image: "clip_score_per_image",
    scene: "scene",
    scene_per_image: "scene_per_image",
    train_log: Some("train_log"),
    validation: Some("validation"),
};

/// The original model's inputs, the kind's parameters named in [`BASE`].
#[derive(KindParams)]
pub struct BaseInputs {
    /// The original model's sample `images`.
    #[param(input, default = null)]
    base_samples: Option<Input>,
    /// The original model's `samples.jsonl` (seeds, prompts).
    #[param(input, default = null)]
    base_samples_jsonl: Option<Input>,
    /// The original model's fid `metrics` (metrics.json).
    #[param(input, default = null)]
    base_fid: Option<Input>,
    /// The original model's lpips `metrics` (metrics.json).
    #[param(input, default = null)]
    base_lpips: Option<Input>,
    /// The original model's lpips `per_image` output.
    #[param(input, default = null)]
    base_lpips_per_image: Option<Input>,
    /// The original model's cmmd `metrics` (metrics.json).
    #[param(input, default = null)]
    base_cmmd: Option<Input>,
    /// The original model's clip-score `metrics` (metrics.json).
    #[param(input, default = null)]
    base_clip_score: Option<Input>,
    /// The original model's clip-score `per_image`.
    #[param(input, default = null)]
    base_clip_score_per_image: Option<Input>,
    /// The original model's scene-accuracy `metrics`.
    #[param(input, default = null)]
    base_scene: Option<Input>,
    /// The original model's scene-accuracy `per_image`.
    #[param(input, default = null)]
    base_scene_per_image: Option<Input>,
}

impl BaseInputs {
    /// The bound ones, under their names.
    fn bound(&self) -> Bound {
        let inputs = [
            (BASE.samples, &self.base_samples),
            (BASE.samples_jsonl, &self.base_samples_jsonl),
            (BASE.fid, &self.base_fid),
            (BASE.lpips, &self.base_lpips),
            (BASE.lpips_per_image, &self.base_lpips_per_image),
            (BASE.cmmd, &self.base_cmmd),
            (BASE.clip_score, &self.base_clip_score),
            (BASE.clip_score_per_image, &self.base_clip_score_per_image),
            (BASE.scene, &self.base_scene),
            (BASE.scene_per_image, &self.base_scene_per_image),
        ];
        let paths = inputs
            .into_iter()
            .filter_map(|(name, input)| Some((name, input.as_ref()?.path().to_path_buf())))
            .collect();
        Bound { values: BTreeMap::new(), paths }
    }
}

/// Each variant's inputs, the kind's parameters named in [`VARIANT`]. Declared here, read
/// through [`StageContext::input_points`]: over a sweep each is gathered (one binding per sweep
/// point), which a single field cannot hold.
#[derive(KindParams)]
#[allow(dead_code)]
pub struct VariantInputs {
    /// Each variant's sample `images` (gathered over a sweep).
    #[param(input, default = null)]
    samples: Option<Input>,
    /// Each variant's `samples.jsonl` (gathered).
    #[param(input, default = null)]
    samples_jsonl: Option<Input>,
    /// Each variant's fid `metrics` (gathered).
    #[param(input, default = null)]
    fid: Option<Input>,
    /// Each variant's lpips `metrics` (gathered).
    #[param(input, default = null)]
    lpips: Option<Input>,
    /// Each variant's lpips `per_image` output (gathered).
    #[param(input, default = null)]
    lpips_per_image: Option<Input>,
    /// Each variant's cmmd `metrics` (gathered).
    #[param(input, default = null)]
    cmmd: Option<Input>,
    /// Each variant's clip-score `metrics` (gathered).
    #[param(input, default = null)]
    clip_score: Option<Input>,
    /// Each variant's clip-score `per_image` (gathered).
    #[param(input, default = null)]
    clip_score_per_image: Option<Input>,
    /// Each variant's scene-accuracy `metrics` (gathered).
    #[param(input, default = null)]
    scene: Option<Input>,
    /// Each variant's scene-accuracy `per_image` (gathered).
    #[param(input, default = null)]
    scene_per_image: Option<Input>,
    /// Each variant's train stage `train_log` (gathered).
    #[param(input, default = null)]
    train_log: Option<Input>,
    /// Each variant's train stage `validation` images (gathered): a progression grid.
    #[param(input, default = null)]
    validation: Option<Input>,
}

/// Where one model's inputs are bound.
#[derive(Debug, Default)]
struct Bound {
    values: BTreeMap<String, Value>,
    paths: BTreeMap<&'static str, PathBuf>,
}

impl Bound {
    fn read(&self, names: &InputNames, point: &str) -> Result<Loaded, ReportError> {
        let name = |n: &str| if point.is_empty() { n.to_string() } else { format!("{n}@{point}") };
        let get = |n: &'static str| self.paths.get(n).map(|p| (name(n), p.as_path()));
        let samples = match get(names.samples) {
            Some((input, path)) => {
                let records = get(names.samples_jsonl);
                let records = records.as_ref().map(|(i, p)| (i.as_str(), *p));
                Some(inputs::read_samples(&input, path, records)?)
            }
            None => None,
        };
        let fid = match get(names.fid) {
            Some((input, path)) => Some(inputs::read_fid(&input, path)?),
            None => None,
        };
        let lpips = match get(names.lpips) {
            Some((input, path)) => {
                let per_image = get(names.lpips_per_image);
                let per_image = per_image.as_ref().map(|(i, p)| (i.as_str(), *p));
                Some(inputs::read_lpips(&input, path, per_image)?)
            }
            None => None,
        };
        let cmmd = match get(names.cmmd) {
            Some((input, path)) => Some(inputs::read_cmmd(&input, path)?),
            None => None,
        };
        let clip_score = match get(names.clip_score) {
            Some((input, path)) => {
                let per_image = get(names.clip_score_per_image);
                let per_image = per_image.as_ref().map(|(i, p)| (i.as_str(), *p));
                Some(inputs::read_clip_score(&input, path, per_image)?)
            }
            None => None,
        };
        let scene = match get(names.scene) {
            Some((input, path)) => {
                let per_image = get(names.scene_per_image);
                let per_image = per_image.as_ref().map(|(i, p)| (i.as_str(), *p));
                Some(inputs::read_scene(&input, path, per_image)?)
            }
            None => None,
        };
        let train_log = match names.train_log.and_then(get) {
            Some((input, path)) => Some(inputs::read_train_log(&input, path)?),
            None => None,
        };
        let validation = match names.validation.and_then(get) {
            Some((input, path)) => inputs::read_validation(&input, path)?,
            None => None,
        };
        Ok(Loaded { samples, fid, lpips, cmmd, clip_score, scene, train_log, validation })
    }
}

struct Loaded {
    samples: Option<Samples>,
    fid: Option<FidMetrics>,
    lpips: Option<LpipsMetrics>,
    cmmd: Option<CmmdMetrics>,
    clip_score: Option<ClipScoreMetrics>,
    scene: Option<SceneMetrics>,
    train_log: Option<Vec<TrainStep>>,
    validation: Option<Validation>,
}

impl Loaded {
    fn is_empty(&self) -> bool {
        self.samples.is_none()
            && self.fid.is_none()
            && self.lpips.is_none()
            && self.cmmd.is_none()
            && self.clip_score.is_none()
            && self.scene.is_none()
            && self.train_log.is_none()
            && self.validation.is_none()
    }
}

fn names_of(names: &InputNames) -> Vec<&'static str> {
    let mut all = vec![
        names.samples,
        names.samples_jsonl,
        names.fid,
        names.lpips,
        names.lpips_per_image,
        names.cmmd,
        names.clip_score,
        names.clip_score_per_image,
        names.scene,
        names.scene_per_image,
    ];
    all.extend(names.train_log);
    all.extend(names.validation);
    all
}

/// Orders sweep points by their values, numbers numerically (so `1e-05` comes before `3e-05`
/// and `0.0001`), then by label.
fn compare_points(a: &(String, Bound), b: &(String, Bound)) -> Ordering {
    let (va, vb) = (&a.1.values, &b.1.values);
    for ((ka, xa), (kb, xb)) in va.iter().zip(vb.iter()) {
        let by = ka.cmp(kb).then_with(|| match (xa.as_f64(), xb.as_f64()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => xa.to_string().cmp(&xb.to_string()),
        });
        if by != Ordering::Equal {
            return by;
        }
    }
    va.len().cmp(&vb.len()).then_with(|| a.0.cmp(&b.0))
}

/// The original (when any `base_*` input is bound) followed by the variants in sweep order.
pub fn gather(ctx: &StageContext<'_>, base: &BaseInputs) -> Result<Vec<Model>, ReportError> {
    let mut models = Vec::new();
    let mut taken: BTreeSet<String> = ["ground_truth".to_string()].into();

    let loaded = base.bound().read(&BASE, "")?;
    if !loaded.is_empty() {
        taken.insert("original".into());
        models.push(model(
            "original",
            String::new(),
            BTreeMap::new(),
            "original".into(),
            true,
            loaded,
        ));
    }

    let mut points: BTreeMap<String, Bound> = BTreeMap::new();
    for name in names_of(&VARIANT) {
        for GatheredInput { label, values, path } in ctx.input_points(name) {
            let bound = points.entry(label).or_default();
            if bound.values.is_empty() {
                bound.values = values;
            }
            bound.paths.insert(name, path);
        }
    }
    let mut points: Vec<(String, Bound)> = points.into_iter().collect();
    points.sort_by(compare_points);
    for (label, bound) in points {
        let loaded = bound.read(&VARIANT, &label)?;
        let name = if label.is_empty() { "finetuned".to_string() } else { label.clone() };
        let mut slug = format::slug(&name);
        let mut n = 2;
        while taken.contains(&slug) {
            slug = format!("{}-{n}", format::slug(&name));
            n += 1;
        }
        taken.insert(slug.clone());
        models.push(model(&name, label, bound.values, slug, false, loaded));
    }
    Ok(models)
}

fn model(
    name: &str,
    label: String,
    values: BTreeMap<String, Value>,
    slug: String,
    is_original: bool,
    loaded: Loaded,
) -> Model {
    Model {
        name: name.to_string(),
        label,
        values,
        slug,
        is_original,
        samples: loaded.samples,
        fid: loaded.fid,
        lpips: loaded.lpips,
        cmmd: loaded.cmmd,
        clip_score: loaded.clip_score,
        scene: loaded.scene,
        train_log: loaded.train_log,
        validation: loaded.validation,
    }
}
