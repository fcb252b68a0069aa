//! What the UNet finetuning kinds share: `train` (every UNet weight, diffusers'
//! train_text_to_image.py) and `train-lora` (LoRA adapters, train_text_to_image_lora.py) run the
//! same recipe and differ only in what they train and what they write.
//!
//! This module owns the recipe's parameters ([`params`], read back by [`Recipe::from`]), the
//! base model (the bound `pipeline` input or `model` resolved through the hub, whose files are
//! then the stage's external dependencies), everything read before a model is loaded
//! ([`prepare`]: a bad dataset or parameter fails in milliseconds), and the run itself
//! ([`run`]): the frozen VAE and text encoder, the training loop with checkpoints, resumption and
//! cancellation, validation images, timing in the stage's log, and `train_log.jsonl`. A kind
//! supplies a [`Finetune`]: the models it trains, and what it writes from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use sdpipe_diffusion::config::SchedulerConfig;
use sdpipe_diffusion::SdPipeline;
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, ParamType, Params, StageContext, StageError,
};
use sdpipe_unet::{ClipText, UNet};
use serde_json::{json, Value};

use crate::checkpoint;
use crate::data::{load_train_split, Example};
use crate::frozen::Frozen;
use crate::objective::{NoiseSchedule, Prediction, ScheduleConfig};
use crate::recipe::{self, float, int, invalid, OptimiserDefaults};
use crate::trainer::{TrainConfig, TrainError, Trainer};
use crate::validation::{self, Validator};

/// The per-step log, an output of both kinds.
pub const LOG: &str = "train_log.jsonl";

/// The recipe's parameters, typed and checked.
pub struct Recipe {
    pub config: TrainConfig,
    pub checkpointing_steps: u64,
    pub model: String,
    pub revision: String,
    prediction_override: Option<Prediction>,
    /// The frozen VAE's and text encoder's dtype (`mixed_precision`; the script's
    /// `weight_dtype`).
    pub weight_dtype: DType,
    /// `None` when validation is off.
    validation: Option<validation::Settings>,
}

/// The `mixed_precision` values and the `weight_dtype` each gives the frozen models.
fn weight_dtype(mixed_precision: &str) -> Option<DType> {
    match mixed_precision {
        "no" => Some(DType::F32),
        "fp16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

/// An optional number given as a JSON number or null.
fn optional_number(ctx: &StageContext<'_>, name: &str) -> Result<Option<f64>, StageError> {
    match ctx.params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| invalid(name, format!("expected a number or null, found {v}"))),
    }
}

impl Recipe {
    pub fn from(ctx: &StageContext<'_>) -> Result<Recipe, StageError> {
        let max_train_steps: u64 = ctx.param("max_train_steps")?;
        let snr_gamma = optional_number(ctx, "snr_gamma")?;
        if snr_gamma.is_some_and(|g| g <= 0.0) {
            return Err(invalid("snr_gamma", "must be positive (5.0 is the paper's value)"));
        }
        let prediction_override = match ctx.params.get("prediction_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Prediction::parse(s).ok_or_else(|| {
                invalid("prediction_type", format!("`{s}`: expected epsilon or v_prediction"))
            })?),
            Some(other) => {
                return Err(invalid(
                    "prediction_type",
                    format!("expected a string or null, found {other}"),
                ))
            }
        };
        let seed: i64 = ctx.param("seed")?;
        let mixed_precision: String = ctx.param("mixed_precision")?;
        let weight_dtype = weight_dtype(&mixed_precision).ok_or_else(|| {
            invalid("mixed_precision", format!("`{mixed_precision}`: expected no, fp16 or bf16"))
        })?;
        let config = TrainConfig {
            transform: recipe::transform(ctx)?,
            batch_size: ctx.param("train_batch_size")?,
            accumulation: ctx.param("gradient_accumulation_steps")?,
            gradient_checkpointing: ctx.param("gradient_checkpointing")?,
            max_train_steps,
            lr: recipe::lr_schedule(ctx, max_train_steps)?,
            max_grad_norm: recipe::max_grad_norm(ctx)?,
            adam: recipe::adamw(ctx)?,
            use_ema: ctx.param("use_ema")?,
            seed: seed as u64,
            noise_offset: ctx.param("noise_offset")?,
            proportion_empty_prompts: ctx.param("proportion_empty_prompts")?,
            snr_gamma,
            // Filled in from the scheduler config once the model is open.
            prediction: Prediction::Epsilon,
        };
        let validation =
            validation::Settings::from(ctx, seed as u64, config.transform.resolution as usize)?;
        Ok(Recipe {
            config,
            checkpointing_steps: ctx.param("checkpointing_steps")?,
            model: ctx.param("model")?,
            revision: ctx.param("revision")?,
            prediction_override,
            weight_dtype,
            validation,
        })
    }
}

/// The recipe's parameters with the kind's `learning_rate` default; `own` (what only the kind
/// takes) come after the recipe's flags, before validation and threads.
pub fn params(learning_rate: f64, own: Vec<ParamSpec>) -> Vec<ParamSpec> {
    let mut params = vec![
        ParamSpec::required(
            "dataset",
            ParamType::Input,
            "An imagefolder dataset (an `imagefolder` stage's `dataset`); `train/` is used.",
        ),
        ParamSpec::optional(
            "pipeline",
            ParamType::Input,
            Value::Null,
            "An upstream pipeline folder to finetune (e.g. a `tiny-sd` stage's `model`); \
                 when bound it is used instead of `model`.",
        ),
        ParamSpec::optional(
            "model",
            ParamType::String,
            json!("stable-diffusion-v1-5/stable-diffusion-v1-5"),
            "Hub repository id or local folder of a diffusers SD1.x pipeline.",
        ),
        ParamSpec::optional("revision", ParamType::String, json!("main"), "Hub revision."),
        ParamSpec::optional(
            "variant",
            ParamType::String,
            Value::Null,
            "diffusers' weight variant of `model` to read (`fp16`: `*.fp16.safetensors`, \
                 loaded into f32); null reads the default weights. The finetuned folder is written \
                 without a variant, as diffusers' `save_pretrained` writes it.",
        ),
    ];
    params.extend(recipe::transform_params());
    params.extend([
        ParamSpec::optional(
            "train_batch_size",
            int(1, Some(4096)),
            json!(1),
            "Images per micro-batch.",
        ),
        ParamSpec::optional(
            "gradient_accumulation_steps",
            int(1, Some(4096)),
            json!(4),
            "Micro-batches per optimiser step (the loss is divided by this).",
        ),
        ParamSpec::optional(
            "gradient_checkpointing",
            ParamType::Bool,
            json!(false),
            "Recompute UNet block activations in the backward pass to save memory.",
        ),
        ParamSpec::optional(
            "mixed_precision",
            ParamType::Enum(&["no", "fp16", "bf16"]),
            json!("no"),
            "diffusers' --mixed_precision. `fp16` or `bf16`: the frozen VAE and text \
             encoder are loaded and run in that dtype (the script's weight_dtype) and their \
             outputs (posterior, text states) are converted to f32; the UNet's weights, \
             AdamW state and EMA stay f32, a text encoder trained with train_text_encoder \
             stays f32, and the saved weights are f32. UNet autocast is not implemented: \
             the UNet computes in f32, so no loss scaling (fp16 GradScaler) is needed. On \
             the CPU a bf16 VAE computes in f32 on bf16-rounded weights (candle has no \
             bf16 CPU convolution).",
        ),
        ParamSpec::optional("max_train_steps", int(1, None), json!(150), "Optimiser steps."),
    ]);
    params.extend(recipe::optimiser_params(OptimiserDefaults {
        learning_rate,
        adam_beta1: 0.9,
        adam_beta1_doc: "AdamW β₁.",
        adam_beta2: 0.999,
    }));
    params.extend([
        ParamSpec::optional(
            "use_ema",
            ParamType::Bool,
            json!(false),
            "Keep an EMA of the weights (diffusers' EMAModel) and save it instead.",
        ),
        ParamSpec::optional(
            "seed",
            int(0, None),
            json!(0),
            "Seed of every random draw (data order, crops, flips, noise, timesteps).",
        ),
        ParamSpec::optional(
            "noise_offset",
            float(0.0, None),
            json!(0.0),
            "Offset-noise scale: adds noise_offset·N(0,1) per image and channel (0: off).",
        ),
        ParamSpec::optional(
            "proportion_empty_prompts",
            float(0.0, Some(1.0)),
            json!(0.0),
            "Share of captions replaced by the empty prompt (diffusers' \
             --proportion_empty_prompts; SD was pretrained with 0.1), so that \
             classifier-free guidance has an unconditional prediction to subtract.",
        ),
        ParamSpec::optional(
            "snr_gamma",
            ParamType::Float { min: Some(0.0), max: None },
            Value::Null,
            "Min-SNR-γ loss weighting (a number such as 5.0, or null for plain MSE).",
        ),
        ParamSpec::optional(
            "prediction_type",
            ParamType::Enum(&["epsilon", "v_prediction"]),
            Value::Null,
            "`epsilon` or `v_prediction`; null uses the model's scheduler config.",
        ),
        ParamSpec::optional(
            "checkpointing_steps",
            int(1, None),
            json!(500),
            "Write a resumable checkpoint every this many optimiser steps.",
        ),
    ]);
    params.extend(own);
    params.extend(validation::params());
    params.push(recipe::threads_param());
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
    inputs: &BTreeMap<String, PathBuf>,
    model: &str,
    revision: &str,
    variant: Option<&str>,
    fetch: Fetch,
) -> Result<PathBuf, StageError> {
    if let Some(path) = inputs.get("pipeline") {
        return Ok(path.clone());
    }
    Ok(sdpipe_diffusion::pipeline::resolve_folder(
        &hub_config(hub),
        model,
        revision,
        variant,
        fetch,
    )?)
}

/// The base model's files, when it comes from outside the pipeline (`model`).
pub fn external_deps(
    hub: Option<&HubConfig>,
    params: &Params,
    fetch: Fetch,
) -> Result<BTreeMap<String, PathBuf>, StageError> {
    // Called before inputs are bound: a bound `pipeline` is already in the key, and its
    // parameter value is the binding, not a model name.
    if params.get("pipeline").is_some_and(|v| !v.is_null()) {
        return Ok(BTreeMap::new());
    }
    let model = params.get("model").and_then(Value::as_str).unwrap_or_default();
    let revision = params.get("revision").and_then(Value::as_str).unwrap_or("main");
    let variant = sdpipe_diffusion::pipeline::variant_param(params)?;
    let root = base_folder(hub, &BTreeMap::new(), model, revision, variant, fetch)?;
    Ok(sdpipe_diffusion::pipeline::model_deps(&root, variant)?)
}

fn train_error(e: TrainError) -> StageError {
    StageError::failed(e.to_string())
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
}

/// How messages and a LoRA's base identity name the base: the `model` parameter, or the bound
/// pipeline input's folder name.
fn base_name(ctx: &StageContext<'_>, recipe: &Recipe) -> String {
    match ctx.inputs.get("pipeline") {
        Some(path) => path
            .file_name()
            .map_or_else(|| "the bound pipeline".into(), |n| n.to_string_lossy().into_owned()),
        None => recipe.model.clone(),
    }
}

/// Reads the parameters (`recipe`, from [`Recipe::from`]), the dataset and the validation
/// prompts, then opens the base pipeline.
pub fn prepare(
    hub: Option<&HubConfig>,
    ctx: &StageContext<'_>,
    mut recipe: Recipe,
) -> Result<Prepared, StageError> {
    // Check the dataset before loading any model: a bad dataset fails in milliseconds.
    let dataset = ctx.input("dataset")?.to_path_buf();
    let examples = load_train_split(&dataset).map_err(|e| StageError::failed(e.to_string()))?;
    let max_steps = recipe.config.max_train_steps;
    let validation = recipe.validation.take().map(|v| v.plan(&dataset, max_steps)).transpose()?;
    let variant = sdpipe_diffusion::pipeline::variant_param(ctx.params)?;
    let base =
        base_folder(hub, ctx.inputs, &recipe.model, &recipe.revision, variant, Fetch::allowed())?;
    let pipeline = SdPipeline::open_variant(&base, variant)?;
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
    Ok(Prepared { recipe, examples, dataset, validation, pipeline, schedule })
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
    let Prepared { recipe, examples, dataset, validation, pipeline, schedule } = prepared;
    let (recipe, pipeline) = (&recipe, &pipeline);
    // Mixed precision as diffusers' script: the frozen models in `weight_dtype`, their outputs
    // converted to f32 (in `Frozen`), so the posterior sample and the noising are f32 (the
    // script does them in weight_dtype). UNet autocast is not implemented; the UNet computes
    // in f32. The script scales the loss (GradScaler) for fp16 because its UNet's autocast
    // forward and backward would underflow small fp16 gradients; here the UNet's activations
    // and gradients are f32 throughout, and nothing the gradients pass through is half (the
    // frozen models are outside the graph), so there is nothing to underflow and no scaling.
    let frozen = Frozen::load(pipeline, &device, recipe.weight_dtype)?;
    let models = kind.load(pipeline, &device)?;
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
    let checkpoint_error = |e: checkpoint::CheckpointError| StageError::failed(e.to_string());
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
        let snapshot = trainer.snapshot().map_err(|e| StageError::failed(e.to_string()))?;
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
    let base_name = base_name(ctx, recipe);
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
