//! What the UNet finetuning kinds share: `train` (every UNet weight, diffusers'
//! train_text_to_image.py) and `train-lora` (LoRA adapters, train_text_to_image_lora.py) run the
//! same recipe and differ only in what they train and what they write.
//!
//! This module owns the recipe's parameters ([`RecipeParams`], which a kind's parameter struct
//! flattens, checked by [`Recipe::new`]; [`params`] adds the inputs and `threads`), the base
//! model (the bound `pipeline` input or `model` resolved through the hub, whose files are then
//! the stage's external dependencies), everything read before a model is loaded ([`prepare`]: a
//! bad dataset or parameter fails in milliseconds), and the run itself ([`run`]): the frozen VAE
//! and text encoder, the training loop with checkpoints, resumption and cancellation, validation
//! images, timing in the stage's log, and `train_log.jsonl`. A kind supplies a
//! [`Finetune`]: the models it trains, and what it writes from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use sdpipe_diffusion::config::SchedulerConfig;
use sdpipe_diffusion::pipeline::Variant;
use sdpipe_diffusion::SdPipeline;
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError,
};
use sdpipe_stages::params::{Input, KindParams};
use sdpipe_unet::{ClipText, UNet};
use serde::Deserialize;

use crate::checkpoint;
use crate::data::{load_train_split, Example, Transform};
use crate::frozen::Frozen;
use crate::objective::{NoiseSchedule, Prediction, ScheduleConfig};
use crate::recipe::{invalid, Optimiser, Threads};
use crate::trainer::{TrainConfig, TrainError, Trainer};
use crate::validation::{self, ValidationParams, Validator};

/// The per-step log, an output of both kinds.
pub const LOG: &str = "train_log.jsonl";

/// The recipe's parameters, as a kind declares them: a kind's struct flattens this first, then
/// its own parameters, then [`ValidationParams`] ([`params`] puts the inputs before and
/// `threads` after). [`Recipe::new`] checks them.
#[derive(KindParams)]
pub struct RecipeParams {
    #[param(flatten)]
    base: BaseModel,
    #[param(flatten)]
    transform: Transform,
    /// Images per micro-batch.
    #[param(default = 1, min = 1, max = 4096)]
    train_batch_size: usize,
    /// Micro-batches per optimiser step (the loss is divided by this).
    #[param(default = 4, min = 1, max = 4096)]
    gradient_accumulation_steps: usize,
    /// Recompute UNet block activations in the backward pass to save memory.
    #[param(default = false)]
    gradient_checkpointing: bool,
    /// diffusers' --mixed_precision. `fp16` or `bf16`: the frozen VAE and text encoder are
    /// loaded and run in that dtype (the script's weight_dtype) and their outputs (posterior,
    /// text states) are converted to f32; the UNet computes under autocast (its products in
    /// that dtype, norms and output in f32) while its weights, AdamW state and EMA stay f32;
    /// fp16 scales the loss dynamically (torch's GradScaler: a step whose gradients overflow is
    /// skipped and logged with `skipped`). A text encoder trained with train_text_encoder
    /// computes in f32; the saved weights are f32. On the CPU bf16 is emulated (bf16-rounded
    /// values, f32 arithmetic: candle has no bf16 CPU matmul or convolution), and fp16 is
    /// slower than f32: mixed precision is for GPUs.
    #[param(default = "no", one_of = MixedPrecision::NAMES)]
    mixed_precision: MixedPrecision,
    /// Optimiser steps.
    #[param(default = 150, min = 1)]
    max_train_steps: u64,
    #[param(flatten)]
    optimiser: Optimiser,
    /// Keep an EMA of the weights (diffusers' EMAModel) and save it instead.
    #[param(default = false)]
    use_ema: bool,
    /// Seed of every random draw (data order, crops, flips, noise, timesteps).
    #[param(default = 0, min = 0)]
    seed: u64,
    /// Offset-noise scale: adds noise_offset·N(0,1) per image and channel (0: off).
    #[param(default = 0.0, min = 0.0)]
    noise_offset: f64,
    /// Share of captions replaced by the empty prompt (diffusers' --proportion_empty_prompts;
    /// SD was pretrained with 0.1), so that classifier-free guidance has an unconditional
    /// prediction to subtract.
    #[param(default = 0.0, min = 0.0, max = 1.0)]
    proportion_empty_prompts: f64,
    /// Min-SNR-γ loss weighting (a number such as 5.0, or null for plain MSE).
    #[param(default = null, min = 0.0)]
    snr_gamma: Option<f64>,
    /// `epsilon` or `v_prediction`; null uses the model's scheduler config.
    #[param(default = null, one_of = Prediction::NAMES)]
    prediction_type: Option<Prediction>,
    /// Write a resumable checkpoint every this many optimiser steps.
    #[param(default = 500, min = 1)]
    checkpointing_steps: u64,
}

/// `model`, `revision`, `variant`: the base pipeline when no `pipeline` is bound (what
/// [`external_deps`] reads).
#[derive(KindParams)]
pub struct BaseModel {
    /// Hub repository id or local folder of a diffusers SD1.x pipeline.
    #[param(default = "stable-diffusion-v1-5/stable-diffusion-v1-5")]
    model: String,
    /// Hub revision.
    #[param(default = "main")]
    revision: String,
    /// diffusers' weight variant of `model` to read (`fp16`: `*.fp16.safetensors`, loaded into
    /// f32); null reads the default weights. The finetuned folder is written without a variant,
    /// as diffusers' `save_pretrained` writes it.
    #[param(default = null)]
    variant: Option<Variant>,
}

impl BaseModel {
    fn variant(&self) -> Option<&str> {
        self.variant.as_ref().map(Variant::as_str)
    }
}

/// `mixed_precision`: the dtype of the frozen VAE and text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

impl MixedPrecision {
    const NAMES: &'static [&'static str] = &["no", "fp16", "bf16"];

    /// The script's `weight_dtype`.
    fn weight_dtype(self) -> DType {
        self.autocast().unwrap_or(DType::F32)
    }

    /// The UNet's autocast type (accelerate's autocast around the forward).
    fn autocast(self) -> Option<DType> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Fp16 => Some(DType::F16),
            MixedPrecision::Bf16 => Some(DType::BF16),
        }
    }
}

/// The recipe's parameters, typed and checked.
pub struct Recipe {
    pub config: TrainConfig,
    pub checkpointing_steps: u64,
    /// `model`, `revision` and `variant` (checked as it was read: [`Variant`]).
    base: BaseModel,
    prediction_override: Option<Prediction>,
    /// The frozen VAE's and text encoder's dtype (`mixed_precision`; the script's
    /// `weight_dtype`).
    pub weight_dtype: DType,
    /// The UNet's autocast compute type (`mixed_precision` fp16 or bf16).
    pub autocast: Option<DType>,
    /// `None` when validation is off.
    validation: Option<validation::Settings>,
}

impl Recipe {
    /// The recipe from its parameters and the validation parameters, with the checks the
    /// declared types cannot express.
    pub fn new(params: RecipeParams, validation: ValidationParams) -> Result<Recipe, StageError> {
        // Zero is within the declared bounds (null is plain MSE).
        if params.snr_gamma.is_some_and(|g| g <= 0.0) {
            return Err(invalid("snr_gamma", "must be positive (5.0 is the paper's value)"));
        }
        let max_train_steps = params.max_train_steps;
        let config = TrainConfig {
            transform: params.transform,
            batch_size: params.train_batch_size,
            accumulation: params.gradient_accumulation_steps,
            gradient_checkpointing: params.gradient_checkpointing,
            max_train_steps,
            lr: params.optimiser.lr_schedule(max_train_steps),
            max_grad_norm: params.optimiser.max_grad_norm()?,
            adam: params.optimiser.adamw(),
            use_ema: params.use_ema,
            seed: params.seed,
            noise_offset: params.noise_offset,
            proportion_empty_prompts: params.proportion_empty_prompts,
            snr_gamma: params.snr_gamma,
            // Filled in from the scheduler config once the model is open.
            prediction: Prediction::Epsilon,
            loss_scaling: params.mixed_precision == MixedPrecision::Fp16,
        };
        let resolution = config.transform.resolution as usize;
        let validation = validation::Settings::new(validation, params.seed, resolution)?;
        Ok(Recipe {
            config,
            checkpointing_steps: params.checkpointing_steps,
            base: params.base,
            prediction_override: params.prediction_type,
            weight_dtype: params.mixed_precision.weight_dtype(),
            autocast: params.mixed_precision.autocast(),
            validation,
        })
    }
}

/// `dataset`: what a finetuning kind trains on.
#[derive(KindParams)]
struct Dataset {
    /// An imagefolder dataset (an `imagefolder` stage's `dataset`); `train/` is used.
    #[param(input)]
    dataset: Input,
}

/// `pipeline`: a base pipeline from upstream, used instead of `model` (read on its own by
/// [`external_deps`], which runs before `dataset` is bound).
#[derive(KindParams)]
struct BasePipeline {
    /// An upstream pipeline folder to finetune (e.g. a `tiny-sd` stage's `model`); when bound
    /// it is used instead of `model`.
    #[param(input, default = null)]
    pipeline: Option<Input>,
}

/// A finetuning kind's parameters: its inputs (`dataset`, `pipeline`), then `settings` (its
/// struct, [`RecipeParams`] flattened first), then `threads`.
pub fn params(settings: Vec<ParamSpec>) -> Vec<ParamSpec> {
    let mut params = Dataset::specs();
    params.extend(BasePipeline::specs());
    params.extend(settings);
    params.extend(Threads::specs());
    params
}

/// The kind's own output (`model/`, `lora/`) followed by the two every finetuning kind writes:
/// `train_log.jsonl` and `validation/`.
pub fn outputs(own: OutputSpec) -> Vec<OutputSpec> {
    vec![
        own,
        OutputSpec {
            name: "log",
            path: LOG,
            kind: OutputKind::File,
            doc: "One JSON line per optimiser step: step, loss, lr, grad_norm.",
        },
        OutputSpec {
            name: "validation",
            path: validation::DIR,
            kind: OutputKind::Dir,
            doc: "Validation images `step-<step>/prompt-<i>.png` and `validation.json` \
                  (prompts, steps, settings, images); empty when validation is off.",
        },
    ]
}

/// The hub settings to resolve `model` with: the kind's override (tests), else the environment's.
fn hub_config(hub: Option<&HubConfig>) -> HubConfig {
    hub.cloned().unwrap_or_else(HubConfig::from_env)
}

/// The base pipeline's folder: the bound `pipeline` input, else `model` resolved.
fn base_folder(
    hub: Option<&HubConfig>,
    pipeline: Option<&Input>,
    base: &BaseModel,
    fetch: Fetch,
) -> Result<PathBuf, StageError> {
    if let Some(pipeline) = pipeline {
        return Ok(pipeline.path().to_path_buf());
    }
    Ok(sdpipe_diffusion::pipeline::resolve_folder(
        &hub_config(hub),
        &base.model,
        &base.revision,
        base.variant(),
        fetch,
    )?)
}

/// The base model's files, when it comes from outside the pipeline (`model`).
pub fn external_deps(
    hub: Option<&HubConfig>,
    params: &Params,
    fetch: Fetch,
) -> Result<BTreeMap<String, PathBuf>, StageError> {
    // A bound `pipeline` is already in the key, as its upstream stage's result.
    if BasePipeline::of_params(params)?.pipeline.is_some() {
        return Ok(BTreeMap::new());
    }
    let base = BaseModel::of_params(params)?;
    let root = base_folder(hub, None, &base, fetch)?;
    Ok(sdpipe_diffusion::pipeline::model_deps(&root, base.variant())?)
}

fn train_error(e: TrainError) -> StageError {
    StageError::caused(e)
}

/// Everything read before a model is loaded: the recipe with the prediction type resolved, the
/// training examples, the validation prompts, the base pipeline and its noise schedule.
pub struct Prepared {
    pub recipe: Recipe,
    examples: Vec<Example>,
    dataset: PathBuf,
    validation: Option<validation::Plan>,
    pub pipeline: SdPipeline,
    schedule: NoiseSchedule,
    /// How messages and the saved LoRA name the base ([`base_name`]).
    base_name: String,
}

/// How messages and a LoRA's base identity name the base: the `model` parameter, or the bound
/// pipeline input's folder name.
fn base_name(pipeline: Option<&Input>, recipe: &Recipe) -> String {
    match pipeline {
        Some(pipeline) => pipeline
            .path()
            .file_name()
            .map_or_else(|| "the bound pipeline".into(), |n| n.to_string_lossy().into_owned()),
        None => recipe.base.model.clone(),
    }
}

/// Reads the dataset and the validation prompts, then opens the base pipeline (`recipe`, from
/// [`Recipe::new`], holds the parameters).
pub fn prepare(
    hub: Option<&HubConfig>,
    ctx: &StageContext<'_>,
    mut recipe: Recipe,
) -> Result<Prepared, StageError> {
    // Check the dataset before loading any model: a bad dataset fails in milliseconds.
    let dataset = Dataset::of(ctx)?.dataset.path().to_path_buf();
    let pipeline = BasePipeline::of(ctx)?.pipeline;
    let examples = load_train_split(&dataset).map_err(StageError::caused)?;
    let max_steps = recipe.config.max_train_steps;
    let validation = recipe.validation.take().map(|v| v.plan(&dataset, max_steps)).transpose()?;
    let base = base_folder(hub, pipeline.as_ref(), &recipe.base, Fetch::allowed())?;
    let base_name = base_name(pipeline.as_ref(), &recipe);
    let pipeline = SdPipeline::open_variant(&base, recipe.base.variant())?;
    let scheduler = &pipeline.scheduler;
    let scheduler_path = || base.join("scheduler/scheduler_config.json").display().to_string();
    let prediction = match recipe.prediction_override {
        Some(p) => p,
        None => {
            let name = scheduler.prediction_type.as_deref().unwrap_or("epsilon");
            Prediction::parse(name).ok_or_else(|| {
                StageError::failed(format!(
                    "{}: prediction_type `{name}` is not epsilon or v_prediction",
                    scheduler_path()
                ))
            })?
        }
    };
    recipe.config.prediction = prediction;
    let schedule = NoiseSchedule::new(&ScheduleConfig {
        num_train_timesteps: scheduler.num_train_timesteps.unwrap_or(1000),
        beta_start: scheduler.beta_start.unwrap_or(0.0001),
        beta_end: scheduler.beta_end.unwrap_or(0.02),
        beta_schedule: scheduler.beta_schedule.clone().unwrap_or_else(|| "linear".into()),
        trained_betas: scheduler.trained_betas.clone(),
    })
    .map_err(|m| StageError::failed(format!("{}: {m}", scheduler_path())))?;
    Ok(Prepared { recipe, examples, dataset, validation, pipeline, schedule, base_name })
}

/// The models a run trains: the UNet (all its weights, or its LoRA adapters: whatever its
/// `vars()` are), and the text encoder when it is trained too.
pub struct Models {
    pub unet: UNet,
    pub text_encoder: Option<ClipText>,
}

/// What a finished run hands its kind to write.
pub struct Finished<'a> {
    pub recipe: &'a Recipe,
    pub pipeline: &'a SdPipeline,
    /// How the base is named (the `model` parameter, or the bound pipeline's folder name).
    pub base_name: String,
    pub models: &'a Models,
    /// The base's scheduler config naming the prediction type trained.
    pub scheduler: SchedulerConfig,
}

/// What a finetuning kind supplies to [`run`].
pub trait Finetune: Sync {
    /// Loads the models to train from the base pipeline.
    fn load(&self, pipeline: &SdPipeline, device: &Device) -> Result<Models, StageError>;

    /// Writes the kind's outputs besides `train_log.jsonl` and `validation/` (which [`run`]
    /// writes) into `out_dir`. The models hold the weights to save: the EMA's with `use_ema`.
    fn write(&self, out_dir: &Path, finished: Finished<'_>) -> Result<(), StageError>;
}

/// Trains `kind`'s models with the prepared recipe on the stage's granted threads, then writes
/// its outputs, `train_log.jsonl` and `validation/`. `interrupt_after` stops the run abruptly
/// after that many optimiser steps without a final checkpoint, as a killed process would
/// (tests).
pub fn run(
    ctx: &mut StageContext<'_>,
    prepared: Prepared,
    kind: &dyn Finetune,
    interrupt_after: Option<u64>,
) -> Result<(), StageError> {
    let threads = ctx.threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| StageError::failed(format!("starting {threads} worker threads: {e}")))?;
    pool.install(|| train(ctx, prepared, kind, interrupt_after))
}

fn train(
    ctx: &mut StageContext<'_>,
    prepared: Prepared,
    kind: &dyn Finetune,
    interrupt_after: Option<u64>,
) -> Result<(), StageError> {
    let device = ctx.candle_device()?;
    let Prepared { recipe, examples, dataset, validation, pipeline, schedule, base_name } =
        prepared;
    let (recipe, pipeline) = (&recipe, &pipeline);
    // Mixed precision as diffusers' script: the frozen models in `weight_dtype`, their outputs
    // converted to f32 (in `Frozen`), so the posterior sample and the noising are f32 (the
    // script does them in weight_dtype); the UNet under autocast (validation samples too, as
    // the script's `log_validation` does), with fp16 loss scaling in the trainer.
    let frozen = Frozen::load(pipeline, &device, recipe.weight_dtype)?;
    let models = kind.load(pipeline, &device)?;
    models.unet.set_autocast(recipe.autocast).map_err(StageError::caused)?;
    let max_steps = recipe.config.max_train_steps;
    let mut trainer = Trainer::new(
        recipe.config.clone(),
        &models.unet,
        &frozen,
        models.text_encoder.as_ref(),
        examples,
        dataset.join("train"),
        schedule,
    )
    .map_err(train_error)?;
    let scheduler = trained_scheduler(pipeline, recipe.config.prediction);
    let mut validator = match validation {
        Some(plan) => Some(Validator::load(
            plan,
            pipeline,
            scheduler.clone(),
            &device,
            recipe.weight_dtype,
            ctx.state_dir,
        )?),
        None => None,
    };
    let names = trainer.parameter_names().to_vec();
    let checkpoint_error = StageError::caused;
    if let Some(snapshot) =
        checkpoint::load_latest(ctx.state_dir, &names, &device).map_err(checkpoint_error)?
    {
        let step = snapshot.step;
        trainer.restore(snapshot).map_err(train_error)?;
        let _ = writeln!(ctx.log, "resuming from the checkpoint at step {step}");
    }
    ctx.progress.set_total(max_steps);
    ctx.progress.advance(trainer.step_count(), "resumed");
    let started = Instant::now();
    let first = trainer.step_count();
    let mut saved = first;
    let state_dir = ctx.state_dir.to_path_buf();
    let save = |trainer: &Trainer<'_, UNet>| -> Result<(), StageError> {
        let snapshot = trainer.snapshot().map_err(StageError::caused)?;
        let epoch = trainer.step_count() / trainer.steps_per_epoch().max(1);
        checkpoint::save(&state_dir, &names, &snapshot, epoch).map_err(checkpoint_error)?;
        Ok(())
    };
    while !trainer.finished() {
        if ctx.cancel.is_cancelled() {
            if trainer.step_count() > saved {
                save(&trainer)?;
            }
            return Err(StageError::Cancelled);
        }
        if interrupt_after == Some(trainer.step_count()) {
            return Err(StageError::Cancelled);
        }
        let line = trainer.step().map_err(train_error)?;
        let training = started.elapsed().as_secs_f64() - validation_seconds(validator.as_ref());
        let rate = (line.step - first) as f64 / training.max(1e-9);
        let message = format!("loss {:.4} · {rate:.2} it/s", line.loss);
        ctx.progress.advance(1, &message);
        let _ = writeln!(
            ctx.log,
            "step {}/{max_steps} loss {:.6} lr {:.3e} grad_norm {:.4} {:.2}s",
            line.step, line.loss, line.lr, line.grad_norm, line.seconds
        );
        // Before this step's checkpoint: a run resumed from it starts after this step, so
        // its images must exist by then (and a run cancelled while validating stops without
        // it, so that its resumed run comes back to this step).
        if let Some(validator) = validator.as_mut().filter(|v| v.is_due(line.step)) {
            let text_encoder = models.text_encoder.as_ref();
            trainer
                .with_ema_weights(|| validator.run(ctx, line.step, &models.unet, text_encoder))
                .map_err(|e| StageError::failed(format!("swapping in the EMA weights: {e}")))??;
        }
        if line.step % recipe.checkpointing_steps == 0 && line.step < max_steps {
            save(&trainer)?;
            saved = line.step;
        }
    }
    let validating = validation_seconds(validator.as_ref());
    let _ = writeln!(
        ctx.log,
        "steps {}..={max_steps}: training {:.2}s, validation {validating:.2}s",
        first + 1,
        started.elapsed().as_secs_f64() - validating
    );
    // What is saved is the EMA's weights when use_ema (diffusers' `ema_unet.copy_to`).
    if let Some(shadow) = trainer.ema_weights() {
        for (var, weights) in trainer.vars().iter().zip(shadow) {
            var.set(weights).map_err(|e| StageError::failed(format!("EMA weights: {e}")))?;
        }
    }
    let finished = Finished { recipe, pipeline, base_name, models: &models, scheduler };
    kind.write(ctx.out_dir, finished)?;
    write_log(ctx.out_dir, &trainer)?;
    validation::write_output(ctx.out_dir, validator.as_ref())
}

/// `train_log.jsonl`: one JSON line per optimiser step.
fn write_log(out_dir: &Path, trainer: &Trainer<'_, UNet>) -> Result<(), StageError> {
    let mut text = String::new();
    for line in trainer.log() {
        text.push_str(&serde_json::to_string(line).expect("log lines serialise"));
        text.push('\n');
    }
    let log = out_dir.join(LOG);
    std::fs::write(&log, text).map_err(|e| StageError::io(format!("writing {}", log.display()), e))
}

/// Seconds this run has spent validating (0 without validation).
fn validation_seconds(validator: Option<&Validator>) -> f64 {
    validator.map_or(0.0, Validator::seconds)
}

/// The scheduler config of the trained model: the base's, naming the prediction type trained.
/// The scheduler says what the UNet predicts, so a `prediction_type` override must reach it, or
/// every sampler would read a v-prediction UNet's output as noise. (diffusers' script saves the
/// base's scheduler unchanged; its users fix the config by hand.)
fn trained_scheduler(pipeline: &SdPipeline, prediction: Prediction) -> SchedulerConfig {
    SchedulerConfig {
        prediction_type: Some(prediction.name().to_string()),
        ..pipeline.scheduler.clone()
    }
}
