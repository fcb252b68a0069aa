//! Validation images during training, as diffusers' `--validation_prompts` (`log_validation`)
//! and kohya's sample images: every `validation_steps` optimiser steps, and after the last, each
//! validation prompt is drawn with the weights as they are then (the EMA's with `use_ema`).
//!
//! An image is drawn exactly as the `sample` kind draws it ([`StableDiffusion::draw`], the same
//! initial latents for the same seed), so the one at the last step equals what `sample` makes
//! from the saved model with the same prompt, seed and settings. Prompt `i` uses seed
//! `validation_seed + i`, as `sample` gives its `i`-th prompt (in id order) `seed + i`.
//!
//! A training kind uses it in five steps:
//!
//! ```text
//! #[param(flatten)] validation: ValidationParams,  // its parameters, in the kind's struct
//! let settings = validation::Settings::new(params, seed, resolution)?;  // None when off
//! let plan = settings.map(|s| s.plan(&dataset, max_steps)).transpose()?;  // reads prompts
//! let mut validator = plan.map(|p| Validator::load(p, …)).transpose()?;   // loads VAE, CLIP
//! // after each optimiser step:
//! if let Some(v) = validator.as_mut().filter(|v| v.is_due(step)) {
//!     trainer.with_ema_weights(|| v.run(ctx, step, &unet, text_encoder))??;
//! }
//! validation::write_output(ctx.out_dir, validator.as_ref())?;           // at the end
//! ```
//!
//! The output `validation/` holds `step-<step, 6 digits>/prompt-<index, 2 digits>.png` and
//! `validation.json` (the prompts, the steps, the settings and every image with its seed); it
//! is empty when validation is off. Images are written into the stage's state directory as
//! they are made (under a temporary name, then renamed) and an image already there is not
//! drawn again, so a run resumed from a checkpoint neither repeats nor loses any: it retrains
//! the steps after the checkpoint to the same weights, skips what the interrupted run made, and
//! [`write_output`] moves them all to the output. Timing goes to the stage's log only, so the
//! output depends on the inputs alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sdpipe_diffusion::config::SchedulerConfig;
use sdpipe_diffusion::generate::{latent_side, save_png, Conditioning, NoisePredictor};
use sdpipe_diffusion::sample_stage::SCHEDULERS;
use sdpipe_diffusion::schedulers::SamplerKind;
use sdpipe_diffusion::{SdPipeline, StableDiffusion};
use sdpipe_stages::api::{StageContext, StageError};
use sdpipe_stages::params::KindParams;
use sdpipe_unet::ClipText;
use serde_json::{json, Value};

use crate::data::load_split;
use crate::recipe::invalid;

/// The output folder, and the state directory's folder its images are made in.
pub const DIR: &str = "validation";
/// The settings and the list of images, in the output folder.
pub const INDEX: &str = "validation.json";

/// The `validation_*` parameters, a group a training kind flattens into its own.
#[derive(KindParams)]
pub struct ValidationParams {
    /// Prompts to draw during training (diffusers' --validation_prompts); or set
    /// num_validation_prompts instead.
    #[param(default = [])]
    validation_prompts: Vec<String>,
    /// Draw the first this many captions (in id order, as `sample` takes them) of the dataset's
    /// `test/` split, or of `train/` when it has no `test/` (all of them when the split has
    /// fewer), instead of listing validation_prompts.
    #[param(default = 0, min = 0)]
    num_validation_prompts: usize,
    /// Draw the validation prompts every this many optimiser steps and after the last (null or
    /// 0: no validation). Images go to `validation/`.
    #[param(default = null, min = 0)]
    validation_steps: Option<u64>,
    /// Seed of the initial latents: prompt i starts from seed + i, as in `sample`. Null: the
    /// stage's `seed`.
    #[param(default = null, min = 0)]
    validation_seed: Option<u64>,
    /// Classifier-free guidance scale of validation images (≤ 1: none).
    #[param(default = 7.5, min = 0.0)]
    validation_guidance_scale: f64,
    /// Inference steps of validation images (diffusers' script uses 20).
    #[param(default = 20, min = 1)]
    validation_num_inference_steps: usize,
    /// The sampler of validation images, as `sample`'s `scheduler`.
    #[param(default = "pndm", one_of = SCHEDULERS)]
    validation_scheduler: String,
    /// Side of the (square) validation images in pixels. Null: the training resolution.
    #[param(default = null, min = 8, max = 4096)]
    validation_resolution: Option<usize>,
}

/// Where the prompts come from.
#[derive(Debug, Clone, PartialEq)]
enum Prompts {
    Listed(Vec<String>),
    /// The first this many captions of the dataset's test (else train) split.
    FromDataset(usize),
}

/// The `validation_*` parameters, checked, with their defaults resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    prompts: Prompts,
    every: u64,
    seed: u64,
    guidance_scale: f64,
    num_inference_steps: usize,
    scheduler: SamplerKind,
    /// Its parameter value, for `validation.json`.
    scheduler_name: String,
    resolution: usize,
}

impl Settings {
    /// The settings, or `None` when validation is off. `seed` and `resolution` are the
    /// training's, the defaults of `validation_seed` and `validation_resolution`.
    pub fn new(
        params: ValidationParams,
        seed: u64,
        resolution: usize,
    ) -> Result<Option<Settings>, StageError> {
        let listed = params.validation_prompts;
        let from_dataset = params.num_validation_prompts;
        let prompts = match (listed.is_empty(), from_dataset) {
            (false, 0) => Prompts::Listed(listed),
            (true, n) => Prompts::FromDataset(n),
            (false, _) => {
                return Err(invalid(
                    "num_validation_prompts",
                    "set either validation_prompts or num_validation_prompts, not both",
                ))
            }
        };
        let Some(every) = params.validation_steps.filter(|&n| n > 0) else { return Ok(None) };
        if prompts == Prompts::FromDataset(0) {
            return Err(invalid(
                "validation_steps",
                "no prompts to validate with: set validation_prompts or num_validation_prompts",
            ));
        }
        let scheduler_name = params.validation_scheduler;
        let scheduler = SamplerKind::parse(&scheduler_name).ok_or_else(|| {
            let expected = SCHEDULERS.join(", ");
            invalid("validation_scheduler", format!("`{scheduler_name}`: expected {expected}"))
        })?;
        Ok(Some(Settings {
            prompts,
            every,
            seed: params.validation_seed.unwrap_or(seed),
            guidance_scale: params.validation_guidance_scale,
            num_inference_steps: params.validation_num_inference_steps,
            scheduler,
            scheduler_name,
            resolution: params.validation_resolution.unwrap_or(resolution),
        }))
    }

    /// The plan of a run of `max_steps` optimiser steps on `dataset`: its prompts read (so a
    /// dataset without them fails before any model is loaded).
    pub fn plan(self, dataset: &Path, max_steps: u64) -> Result<Plan, StageError> {
        let prompts = match &self.prompts {
            Prompts::Listed(prompts) => prompts.clone(),
            Prompts::FromDataset(n) => dataset_prompts(dataset, *n)?,
        };
        Ok(Plan { settings: self, prompts, max_steps })
    }
}

/// The first `n` captions of the test split (else the training split) in id order.
fn dataset_prompts(dataset: &Path, n: usize) -> Result<Vec<String>, StageError> {
    let split = if dataset.join("test/metadata.jsonl").is_file() { "test" } else { "train" };
    let mut examples = load_split(dataset, split).map_err(StageError::caused)?;
    // Ids are file stems, as the `sample` kind sorts its prompts (imagefolder stages write
    // their metadata in this order too).
    examples.sort_by(|a, b| a.image.file_stem().cmp(&b.image.file_stem()));
    Ok(examples.into_iter().take(n).map(|e| e.caption).collect())
}

/// What will be drawn, and when.
#[derive(Debug, Clone)]
pub struct Plan {
    settings: Settings,
    prompts: Vec<String>,
    max_steps: u64,
}

impl Plan {
    /// Whether the prompts are drawn after optimiser step `step`: every `validation_steps`,
    /// and after the last.
    fn is_due(&self, step: u64) -> bool {
        step > 0 && (step.is_multiple_of(self.settings.every) || step == self.max_steps)
    }

    /// Every step the prompts are drawn after, in order.
    fn steps(&self) -> Vec<u64> {
        (1..=self.max_steps).filter(|&s| self.is_due(s)).collect()
    }

    /// The initial-latent seed of prompt `index`.
    fn seed(&self, index: usize) -> u64 {
        self.settings.seed.wrapping_add(index as u64)
    }
}

/// An image's path under `validation/`.
fn image_path(step: u64, prompt: usize) -> String {
    format!("step-{step:06}/prompt-{prompt:02}.png")
}

/// Draws a plan's images as training goes, into the state directory.
pub struct Validator {
    plan: Plan,
    /// The pipeline's VAE, text encoder and tokenizer; the UNet is the caller's.
    sd: StableDiffusion<()>,
    /// The scheduler config the samplers are built from: the trained model's (its prediction
    /// type is what the UNet is trained to predict).
    scheduler: SchedulerConfig,
    latent_size: (usize, usize),
    /// Where images are made: `<state>/validation/`.
    dir: PathBuf,
    /// Time spent drawing, for the log.
    spent: Duration,
}

impl Validator {
    /// Loads what drawing needs besides the UNet: `pipeline`'s VAE, text encoder and tokenizer
    /// in `dtype` (the frozen models' dtype, as diffusers' script samples in `weight_dtype`).
    /// `scheduler` is the config the trained model will be saved with.
    pub fn load(
        plan: Plan,
        pipeline: &SdPipeline,
        scheduler: SchedulerConfig,
        device: &Device,
        dtype: DType,
        state_dir: &Path,
    ) -> Result<Validator, StageError> {
        let side = plan.settings.resolution;
        let latent =
            latent_side(pipeline, side).map_err(|m| invalid("validation_resolution", m))?;
        // A sampler that cannot be built from this config fails now, not after training.
        plan.settings.scheduler.build(&scheduler, plan.settings.num_inference_steps).map_err(
            |m| StageError::failed(format!("{}: {m}", pipeline.root.join("scheduler").display())),
        )?;
        Ok(Validator {
            sd: StableDiffusion::load_without_unet(pipeline, device, dtype)?,
            plan,
            scheduler,
            latent_size: (latent, latent),
            dir: state_dir.join(DIR),
            spent: Duration::ZERO,
        })
    }

    /// Whether the prompts are drawn after optimiser step `step`: every `validation_steps`,
    /// and after the last.
    pub fn is_due(&self, step: u64) -> bool {
        self.plan.is_due(step)
    }

    /// Seconds spent drawing so far.
    pub fn seconds(&self) -> f64 {
        self.spent.as_secs_f64()
    }

    /// Draws every prompt after optimiser step `step` with `unet` as it is now and the
    /// trained `text_encoder` if any (else the pipeline's), skipping images already made.
    /// With EMA, call it inside [`crate::trainer::Trainer::with_ema_weights`]. The progress
    /// message says it is validating; the time it took goes to the log.
    pub fn run(
        &mut self,
        ctx: &mut StageContext<'_>,
        step: u64,
        unet: &dyn NoisePredictor,
        text_encoder: Option<&ClipText>,
    ) -> Result<(), StageError> {
        let started = Instant::now();
        let count = self.plan.prompts.len();
        let todo: Vec<usize> =
            (0..count).filter(|&i| !self.dir.join(image_path(step, i)).is_file()).collect();
        if todo.is_empty() {
            let _ = writeln!(
                ctx.log,
                "validation at step {step}: its {count} images were made before an interruption"
            );
            return Ok(());
        }
        let settings = &self.plan.settings;
        let uncond =
            if settings.guidance_scale > 1.0 { Some(self.embed(text_encoder, "")?) } else { None };
        for &i in &todo {
            ctx.cancel.check()?;
            let cond = self.embed(text_encoder, &self.plan.prompts[i])?;
            let conditioning = Conditioning {
                cond: &cond,
                uncond: uncond.as_ref(),
                guidance_scale: settings.guidance_scale,
            };
            let mut sampler = settings
                .scheduler
                .build(&self.scheduler, settings.num_inference_steps)
                .map_err(StageError::failed)?;
            let (progress, cancel) = (ctx.progress, ctx.cancel);
            let image = self.sd.draw(
                unet,
                &[self.plan.seed(i)],
                self.latent_size,
                &conditioning,
                sampler.as_mut(),
                &mut |s, n| {
                    let what = format!("prompt {}/{count}, step {}/{n}", i + 1, s + 1);
                    progress.advance(0, &format!("validating after step {step}: {what}"));
                    cancel.check()
                },
            )?;
            let path = self.dir.join(image_path(step, i));
            let parent = path.parent().expect("an image path has a folder");
            fs::create_dir_all(parent)
                .map_err(|e| StageError::io(format!("creating {}", parent.display()), e))?;
            save_png(&image[0], &path)?;
        }
        let took = started.elapsed();
        self.spent += took;
        let _ = writeln!(
            ctx.log,
            "validation at step {step}: {} images in {:.2}s ({:.2}s validating so far)",
            todo.len(),
            took.as_secs_f64(),
            self.seconds()
        );
        Ok(())
    }

    /// A prompt's embedding `(1, 77, D)`: from the trained encoder when there is one (as
    /// diffusers' validation pipeline gets the trained `text_encoder`), else the pipeline's.
    fn embed(&self, text_encoder: Option<&ClipText>, prompt: &str) -> Result<Tensor, StageError> {
        match text_encoder {
            Some(text) => text
                .forward(&self.sd.token_ids(&[prompt])?)
                .map(|hidden| hidden.detach())
                .map_err(|e| StageError::failed(format!("the trained text encoder: {e}"))),
            None => self.sd.embed(&[prompt]),
        }
    }

    /// `validation.json`: the prompts, the steps, the settings and every image.
    fn index(&self) -> Value {
        let settings = &self.plan.settings;
        let steps = self.plan.steps();
        let images: Vec<Value> = steps
            .iter()
            .flat_map(|&step| {
                (0..self.plan.prompts.len()).map(move |i| {
                    json!({"step": step, "prompt": i, "seed": self.plan.seed(i),
                           "file_name": image_path(step, i)})
                })
            })
            .collect();
        json!({
            "prompts": self.plan.prompts,
            "steps": steps,
            "seed": settings.seed,
            "guidance_scale": settings.guidance_scale,
            "num_inference_steps": settings.num_inference_steps,
            "scheduler": settings.scheduler_name,
            "resolution": settings.resolution,
            "images": images,
        })
    }
}

/// Writes the output `validation/`: the validator's images, moved from the state directory,
/// and `validation.json`; an empty folder without a validator (validation off).
pub fn write_output(out_dir: &Path, validator: Option<&Validator>) -> Result<(), StageError> {
    let out = out_dir.join(DIR);
    let io = |what: &str, path: &Path| {
        let context = format!("{what} {}", path.display());
        move |e: std::io::Error| StageError::io(context, e)
    };
    fs::create_dir_all(&out).map_err(io("creating", &out))?;
    let Some(validator) = validator else { return Ok(()) };
    let index = validator.index();
    for image in index["images"].as_array().expect("a list") {
        let name = image["file_name"].as_str().expect("a file name");
        let (from, to) = (validator.dir.join(name), out.join(name));
        let parent = to.parent().expect("an image path has a folder");
        fs::create_dir_all(parent).map_err(io("creating", parent))?;
        if fs::rename(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(io("copying", &from))?;
        }
    }
    let text = serde_json::to_string_pretty(&index).expect("JSON serialises") + "\n";
    let path = out.join(INDEX);
    fs::write(&path, text).map_err(io("writing", &path))
}
