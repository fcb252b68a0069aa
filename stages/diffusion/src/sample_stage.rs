//! The `sample` kind: text-to-image samples of an imagefolder split's captions, as diffusers'
//! `StableDiffusionPipeline` makes them.
//!
//! Reproducibility: prompts are taken in sorted id order and image `k` of prompt `i` starts
//! from latents drawn with seed `seed + i·n_per_prompt + k` (see [`crate::noise`]), so any one
//! sample can be regenerated alone and batching never changes a result. Finished images are
//! kept in the stage's state directory, so an interrupted run resumes where it stopped.
//!
//! LoRA: a bound `lora` input (a `train-lora` stage's `lora/` folder, or any diffusers LoRA
//! file or folder) is merged into the UNet at load time at `lora_scale`, as diffusers'
//! `fuse_lora(lora_scale=…)`. Before merging, the base model the LoRA records
//! ([`crate::lora_base`]) is checked against the pipeline sampled: another base is refused, a
//! LoRA that records none is merged with a note in the log. Each `samples.jsonl` line then
//! carries `"lora": {"rank", "alpha", "scale", "targets", "layers"}` so that a report can say
//! which variant it is; without a LoRA the lines are exactly what they were before LoRAs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::DType;
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{Input, KindParams};
use sdpipe_unet::lora::LORA_WEIGHTS_NAME;
use sdpipe_unet::LoraFile;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::generate::{latent_side, save_png, Conditioning, StableDiffusion};
use crate::lora_base::{BaseCheck, BaseIdentity};
use crate::pipeline::{SdPipeline, Variant};
use crate::schedulers::SamplerKind;

const IMAGES: &str = "images";
const SAMPLES: &str = "samples.jsonl";

/// The `scheduler` values (each a [`SamplerKind`]), for every kind that samples.
pub const SCHEDULERS: &[&str] = &["pndm", "ddim", "euler"];

/// The `sample` kind. `hub` overrides the environment's hub settings (tests).
#[derive(Default)]
pub struct Sample {
    pub hub: Option<HubConfig>,
}

/// One line of an imagefolder split's `metadata.jsonl`.
#[derive(Debug, Deserialize)]
struct MetadataLine {
    file_name: String,
    text: String,
}

/// One image to make.
struct Job {
    id: String,
    file_name: String,
    prompt: String,
    seed: u64,
    k: usize,
}

fn invalid(param: &str, message: impl Into<String>) -> StageError {
    StageError::InvalidParam { param: param.into(), message: message.into() }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StageError {
    let context = context.into();
    move |e| StageError::io(context, e)
}

impl Sample {
    fn hub_config(&self) -> HubConfig {
        self.hub.clone().unwrap_or_else(HubConfig::from_env)
    }

    /// `model` resolved through the hub crate (local folder, Hugging Face cache, download).
    fn resolve_model(&self, model: &Model, fetch: Fetch) -> Result<PathBuf, StageError> {
        Ok(crate::pipeline::resolve_folder(
            &self.hub_config(),
            &model.model,
            &model.revision,
            model.variant(),
            fetch,
        )?)
    }
}

/// Read `<dataset>/<split>/metadata.jsonl` into jobs, sorted by id, with their seeds.
fn jobs(dataset: &Path, split: &str, seed: u64, n: usize) -> Result<Vec<Job>, StageError> {
    let path = dataset.join(split).join("metadata.jsonl");
    let text = fs::read_to_string(&path).map_err(|e| {
        StageError::failed(format!(
            "{}: {e}; `prompts` must be an imagefolder dataset with a `{split}/` split \
             (set `split` to choose another)",
            path.display()
        ))
    })?;
    let mut prompts: BTreeMap<String, String> = BTreeMap::new();
    for (n_line, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: MetadataLine = serde_json::from_str(line).map_err(|e| {
            StageError::failed(format!("{} line {}: {e}", path.display(), n_line + 1))
        })?;
        let id = Path::new(&record.file_name)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                StageError::failed(format!(
                    "{} line {}: `file_name` {:?} has no file stem to name the sample by",
                    path.display(),
                    n_line + 1,
                    record.file_name
                ))
            })?;
        if prompts.insert(id.clone(), record.text).is_some() {
            return Err(StageError::failed(format!(
                "{}: two lines have the id `{id}`; ids (file stems) must be unique",
                path.display()
            )));
        }
    }
    if prompts.is_empty() {
        return Err(StageError::failed(format!("{}: no prompts to sample", path.display())));
    }
    let mut jobs = Vec::new();
    for (i, (id, prompt)) in prompts.into_iter().enumerate() {
        for k in 0..n {
            let file_name = if n == 1 { format!("{id}.png") } else { format!("{id}_{k}.png") };
            let seed = seed.wrapping_add((i * n + k) as u64);
            jobs.push(Job { id: id.clone(), file_name, prompt: prompt.clone(), seed, k });
        }
    }
    Ok(jobs)
}

/// The parameters.
#[derive(KindParams)]
struct Settings {
    /// An imagefolder `dataset/` whose split's metadata.jsonl holds the captions.
    #[param(input)]
    prompts: Input,
    #[param(flatten)]
    model: Model,
    /// Which split of `prompts` to sample.
    #[param(default = "test")]
    split: String,
    /// The sampler, built from the pipeline's scheduler config as diffusers' `from_config`
    /// would.
    #[param(default = "pndm", one_of = SCHEDULERS)]
    scheduler: SamplerKind,
    /// Inference steps.
    #[param(default = 50, min = 1)]
    steps: usize,
    /// Classifier-free guidance scale; ≤ 1 disables guidance (as in diffusers).
    #[param(default = 7.5, min = 0.0)]
    guidance_scale: f64,
    /// The unconditional prompt guidance steers away from (diffusers' default: empty).
    #[param(default = "")]
    negative_prompt: String,
    /// Base seed; image k of the i-th prompt (in id order) uses seed + i*n + k.
    #[param(default = 0, min = 0)]
    seed: u64,
    /// Images per prompt.
    #[param(default = 1, min = 1)]
    n_per_prompt: usize,
    /// Image height in pixels; 0: the UNet's sample_size × the VAE's scale factor.
    #[param(default = 0, min = 0)]
    height: usize,
    /// Image width in pixels; 0: the UNet's sample_size × the VAE's scale factor.
    #[param(default = 0, min = 0)]
    width: usize,
    /// Images denoised together (results do not depend on it).
    #[param(default = 1, min = 1)]
    batch_size: usize,
    /// What the models compute in, as diffusers' `torch_dtype` (`fp16`: float16, `bf16`:
    /// bfloat16): the text encoder, the VAE and the UNet are loaded in it, the UNet computing
    /// under autocast (products in the half type, norms in f32); the sampler's arithmetic and
    /// the latents stay f32. On the CPU bf16 is emulated (bf16-rounded values, f32
    /// arithmetic) and fp16 is slower than f32.
    #[param(default = "f32", one_of = Precision::NAMES)]
    precision: Precision,
    /// Not read here: the run uses the threads the scheduler granted (`ctx.threads`).
    #[allow(dead_code)]
    #[param(flatten)]
    threads: Threads,
}

impl Settings {
    /// What the parameters' types cannot say: `lora_scale` is a finite number, and only
    /// scales a bound `lora`.
    fn check(&self) -> Result<(), StageError> {
        let lora_scale = self.model.lora_scale;
        if !lora_scale.is_finite() {
            return Err(invalid("lora_scale", format!("{lora_scale} is not a finite number")));
        }
        if lora_scale != 1.0 && self.model.lora.is_none() {
            return Err(invalid(
                "lora_scale",
                format!(
                    "{lora_scale} scales a LoRA, but no `lora` is bound: bind one (a train-lora \
                     stage's `lora` output) or leave `lora_scale` at its default, 1.0"
                ),
            ));
        }
        Ok(())
    }
}

/// The model sampled: the bound `pipeline`, else `model` at `revision` (`variant`'s weights),
/// and the LoRA merged into it; `external_deps` reads these alone, needing no `prompts`.
#[derive(KindParams)]
struct Model {
    /// A diffusers pipeline folder from an upstream stage (e.g. `train.model`); when bound it is
    /// used instead of `model`.
    #[param(input, default = null)]
    pipeline: Option<Input>,
    /// A LoRA to merge into the UNet: a `train-lora` stage's `lora` output, or a diffusers LoRA
    /// file (`pytorch_lora_weights.safetensors`) or a folder holding one. The base model it
    /// records must be this pipeline's (a LoRA that records none is merged with a note in the
    /// log); its layers must fit the UNet.
    #[param(input, default = null)]
    lora: Option<Input>,
    /// How much of the LoRA is merged: W + lora_scale·(alpha/rank)·B·A, diffusers'
    /// `fuse_lora(lora_scale=…)` or `cross_attention_kwargs={"scale": …}`; 0 samples the base
    /// model. Only with a bound `lora`.
    #[param(default = 1.0)]
    lora_scale: f64,
    /// Hugging Face repository id or local folder of the pipeline.
    #[param(default = "stable-diffusion-v1-5/stable-diffusion-v1-5")]
    model: String,
    /// Revision of `model` on the hub.
    #[param(default = "main")]
    revision: String,
    /// diffusers' weight variant of `model` to read (`fp16`: `*.fp16.safetensors`, loaded into
    /// f32); null reads the default weights.
    #[param(default = null)]
    variant: Option<Variant>,
}

impl Model {
    fn variant(&self) -> Option<&str> {
        self.variant.as_ref().map(Variant::as_str)
    }
}

/// The threads a run asks for; read alone by `threads`, which the engine calls before any
/// input is bound.
#[derive(KindParams)]
struct Threads {
    /// CPU threads to use (the scheduler may grant fewer).
    #[param(default = 4, min = 1)]
    threads: usize,
}

/// The `precision` parameter's values: the dtype the text encoder and the VAE are loaded in,
/// as diffusers' `torch_dtype` (`fp16`: torch.float16, `bf16`: torch.bfloat16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Precision {
    F32,
    Fp16,
    Bf16,
}

impl Precision {
    const NAMES: &'static [&'static str] = &["f32", "fp16", "bf16"];

    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Fp16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl StageKind for Sample {
    fn name(&self) -> &'static str {
        "sample"
    }

    fn version(&self) -> u32 {
        // 2: the UNet is sdpipe-unet's (exact GELU, as diffusers); version 1 ran
        // candle-transformers' (tanh GELU), so its samples differ slightly. `precision`
        // (default f32) left outputs of existing parameter sets bit-identical: no bump.
        // `lora` (default unbound) and `lora_scale` (default 1.0, refused without a `lora`)
        // leave them bit-identical too: no bump.
        // 3: with `precision` fp16/bf16 the UNet computes under autocast (it computed in f32).
        3
    }

    fn doc(&self) -> &'static str {
        "Generates images for the captions of an imagefolder split with a Stable Diffusion 1.x \
         pipeline, as diffusers' StableDiffusionPipeline does: CLIP text embeddings, \
         classifier-free guidance against the negative (default empty) prompt, PNDM (SD1.5's \
         default), DDIM or Euler, VAE decode, 8-bit PNG. Writes `images/<id>.png` (or \
         `<id>_<k>.png` with n_per_prompt > 1) and `samples.jsonl` ({id, file_name, prompt, \
         seed, k}). Image k of the i-th prompt in id order starts from latents drawn with seed \
         `seed + i*n_per_prompt + k` by sdpipe's ChaCha-based generator (not torch's, so the \
         same seed gives a different image than diffusers; the same latents give the same image \
         within float tolerance). The model is the `pipeline` input when bound, else `model` \
         resolved from a local folder, the Hugging Face cache or the hub. A bound `lora` (a \
         train-lora stage's `lora` output or a diffusers LoRA file) is merged into the UNet at \
         `lora_scale` (diffusers' fuse_lora), after checking the base model it records; each \
         samples.jsonl line then also has `lora` ({rank, alpha, scale, targets, layers})."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "images",
                path: IMAGES,
                kind: OutputKind::Dir,
                doc: "One PNG per sample: `<id>.png`, or `<id>_<k>.png` with n_per_prompt > 1.",
            },
            OutputSpec {
                name: "samples",
                path: SAMPLES,
                kind: OutputKind::File,
                doc: "One {id, file_name, prompt, seed, k} line per image, in id order; with a \
                      bound `lora`, each line also has `lora`: {rank, alpha, scale, targets, \
                      layers}.",
            },
        ]
    }

    fn threads(&self, params: &Params) -> usize {
        Threads::of_params(params).map_or(4, |t| t.threads)
    }

    fn external_deps(
        &self,
        params: &Params,
        fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        let model = Model::of_params(params)?;
        // A bound `pipeline` is an upstream output, already part of the key.
        if model.pipeline.is_some() {
            return Ok(BTreeMap::new());
        }
        Ok(crate::pipeline::model_deps(&self.resolve_model(&model, fetch)?, model.variant())?)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        settings.check()?;
        let jobs =
            jobs(settings.prompts.path(), &settings.split, settings.seed, settings.n_per_prompt)?;
        let m = &settings.model;
        let root = match &m.pipeline {
            Some(input) => input.path().to_path_buf(),
            None => self.resolve_model(m, Fetch::allowed())?,
        };
        let pipeline = SdPipeline::open_variant(&root, m.variant())?;
        let model = match &m.pipeline {
            Some(input) => format!("the `pipeline` input, {}", input.path().display()),
            None => m.model.clone(),
        };
        let lora = match &m.lora {
            Some(input) => Some(open_lora(ctx, input.path(), &pipeline, &model, m.lora_scale)?),
            None => None,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .build()
            .map_err(|e| StageError::failed(format!("starting {} threads: {e}", ctx.threads)))?;
        pool.install(|| run_jobs(ctx, &pipeline, &settings, lora.as_ref(), &jobs))?;
        write_outputs(ctx, &jobs, lora.as_ref().map(|l| &l.record))
    }
}

/// A LoRA to merge, checked: its file (header read), its scale, and its `samples.jsonl` record.
struct Lora {
    file: LoraFile,
    scale: f64,
    /// `{"rank", "alpha", "scale", "targets", "layers"}`: see [`lora_record`].
    record: Value,
}

/// Opens the bound `lora` (a file, or a folder holding `pytorch_lora_weights.safetensors`)
/// from its header alone and checks the base model it records against `pipeline` (named
/// `model` in messages): another base is refused, none recorded is noted in the log.
fn open_lora(
    ctx: &mut StageContext<'_>,
    path: &Path,
    pipeline: &SdPipeline,
    model: &str,
    scale: f64,
) -> Result<Lora, StageError> {
    let refused = |message: String| {
        StageError::failed(format!("the `lora` input {}: {message}", path.display()))
    };
    if path.is_dir() && !path.join(LORA_WEIGHTS_NAME).is_file() {
        return Err(refused(format!(
            "this folder has no {LORA_WEIGHTS_NAME}; bind a train-lora stage's `lora` output, \
             a LoRA file, or a folder holding {LORA_WEIGHTS_NAME} as diffusers' \
             save_lora_weights writes it"
        )));
    }
    // The loader's errors name the file already.
    let file =
        LoraFile::open(path).map_err(|e| StageError::failed(format!("the `lora` input: {e}")))?;
    let check = BaseIdentity::check(file.metadata(), pipeline, model).map_err(refused)?;
    let note = match check {
        BaseCheck::Matches(base) => format!(
            "LoRA {} was trained on {}, the UNet sampled here (the UNet digest it records \
             matches)",
            file.path().display(),
            base.model
        ),
        BaseCheck::Unrecorded => format!(
            "note: LoRA {} records no base model (it was not written by sdpipe's train-lora), \
             so it is merged on trust: make sure it was trained on {model}",
            file.path().display()
        ),
    };
    writeln!(ctx.log, "{note}").map_err(io("writing the log"))?;
    let record = lora_record(&file, scale);
    Ok(Lora { file, scale, record })
}

/// How `samples.jsonl` records a LoRA: `rank` and `alpha` (one number, or the sorted distinct
/// values when its layers differ), the `scale` it was merged at, `targets` (the adapted
/// layers' names by their last part: `to_q`, `to_out.0`; sorted) and `layers` (how many).
/// Alpha is what the merge uses, as the loader read it ([`LoraFile::layers`]).
fn lora_record(file: &LoraFile, scale: f64) -> Value {
    let ranks: BTreeSet<usize> = file.layers().map(|(_, rank, _)| rank).collect();
    let mut alphas: Vec<f64> = file.layers().map(|(_, _, alpha)| alpha).collect();
    alphas.sort_by(f64::total_cmp);
    alphas.dedup();
    let targets: BTreeSet<String> = file.modules().map(target_name).collect();
    let one_or_all = |values: Vec<Value>| match <[Value; 1]>::try_from(values) {
        Ok([one]) => one,
        Err(values) => Value::Array(values),
    };
    json!({
        "rank": one_or_all(ranks.iter().map(|&r| json!(r)).collect()),
        "alpha": one_or_all(alphas.into_iter().map(|a| json!(a)).collect()),
        "scale": scale,
        "targets": targets,
        "layers": file.modules().count(),
    })
}

/// A LoRA layer's target as peft names it: the module's last dotted part, or its last two when
/// the last is an index (`…attn1.to_out.0` → `to_out.0`).
fn target_name(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.as_slice() {
        [.., a, b] if b.bytes().all(|c| c.is_ascii_digit()) => format!("{a}.{b}"),
        [.., last] => last.to_string(),
        [] => module.to_string(),
    }
}

/// Generate every job's image into `state_dir/images`, skipping those already there.
fn run_jobs(
    ctx: &mut StageContext<'_>,
    pipeline: &SdPipeline,
    settings: &Settings,
    lora: Option<&Lora>,
    jobs: &[Job],
) -> Result<(), StageError> {
    let device = ctx.candle_device()?;
    let sd = match lora {
        None => StableDiffusion::load(pipeline, &device, settings.precision.dtype())?,
        Some(lora) => {
            // A LoRA that does not fit the UNet is refused here, from the headers, before any
            // weight is read; the error names the LoRA file and its layers.
            let loras = [(&lora.file, lora.scale)];
            let sd = StableDiffusion::load_with_lora(
                pipeline,
                &device,
                settings.precision.dtype(),
                &loras,
            )?;
            writeln!(ctx.log, "merged the LoRA into the UNet: {}", lora.record)
                .map_err(io("writing the log"))?;
            sd
        }
    };
    let default_side = pipeline.unet.sample_size * sd.vae_scale_factor;
    let height = if settings.height == 0 { default_side } else { settings.height };
    let width = if settings.width == 0 { default_side } else { settings.width };
    let lh = latent_side(pipeline, height).map_err(|m| invalid("height", m))?;
    let lw = latent_side(pipeline, width).map_err(|m| invalid("width", m))?;

    let done_dir = ctx.state_dir.join(IMAGES);
    fs::create_dir_all(&done_dir).map_err(io("creating the state directory"))?;
    let todo: Vec<&Job> = jobs.iter().filter(|j| !done_dir.join(&j.file_name).is_file()).collect();
    let calls = settings.scheduler.build(&pipeline.scheduler, settings.steps).map_err(|m| {
        StageError::failed(format!("{}: {m}", pipeline.root.join("scheduler").display()))
    })?;
    let calls = calls.timesteps().len() as u64;
    writeln!(
        ctx.log,
        "sampling {} images ({} already done) at {width}x{height} with {} from {}: {} steps \
         ({calls} UNet calls), guidance {}, negative prompt {:?}, batch {}, text encoder and \
         VAE in {:?}",
        jobs.len(),
        jobs.len() - todo.len(),
        settings.scheduler.class_name(),
        pipeline.root.display(),
        settings.steps,
        settings.guidance_scale,
        settings.negative_prompt,
        settings.batch_size,
        settings.precision.dtype()
    )
    .map_err(io("writing the log"))?;
    ctx.progress.set_total(todo.len() as u64 * calls);

    let uncond_one = sd.embed(&[settings.negative_prompt.as_str()])?;
    for chunk in todo.chunks(settings.batch_size) {
        ctx.cancel.check()?;
        let b = chunk.len();
        let seeds: Vec<u64> = chunk.iter().map(|j| j.seed).collect();
        let prompts: Vec<&str> = chunk.iter().map(|j| j.prompt.as_str()).collect();
        let cond = sd.embed(&prompts)?;
        let uncond = uncond_one
            .repeat((b, 1, 1))
            .map_err(|e| StageError::failed(format!("embeddings: {e}")))?;
        let conditioning = Conditioning {
            cond: &cond,
            uncond: Some(&uncond),
            guidance_scale: settings.guidance_scale,
        };
        let mut sampler = settings
            .scheduler
            .build(&pipeline.scheduler, settings.steps)
            .map_err(StageError::failed)?;
        let (progress, cancel) = (ctx.progress, ctx.cancel);
        let first = &chunk[0].file_name;
        let images =
            sd.draw(&sd.unet, &seeds, (lh, lw), &conditioning, sampler.as_mut(), &mut |i, n| {
                progress.advance(b as u64, &format!("{first}: step {}/{n}", i + 1));
                cancel.check()
            })?;
        for (job, image) in chunk.iter().zip(images) {
            save_png(&image, &done_dir.join(&job.file_name))?;
        }
    }
    Ok(())
}

/// Move the finished images into `images/` and write `samples.jsonl`, each line with `lora`
/// when one was merged (and exactly as before LoRAs otherwise).
fn write_outputs(
    ctx: &mut StageContext<'_>,
    jobs: &[Job],
    lora: Option<&Value>,
) -> Result<(), StageError> {
    let done_dir = ctx.state_dir.join(IMAGES);
    let out_dir = ctx.output_path(IMAGES);
    fs::create_dir_all(&out_dir).map_err(io("creating images/"))?;
    let mut lines = String::new();
    for job in jobs {
        let (from, to) = (done_dir.join(&job.file_name), out_dir.join(&job.file_name));
        if fs::rename(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(io(format!("copying {}", job.file_name)))?;
        }
        let mut line = json!({"id": job.id, "file_name": job.file_name, "prompt": job.prompt,
                              "seed": job.seed, "k": job.k});
        if let Some(lora) = lora {
            line["lora"] = lora.clone();
        }
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    fs::write(ctx.output_path(SAMPLES), lines).map_err(io("writing samples.jsonl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheduler_and_precision_name_is_read() {
        for &name in SCHEDULERS {
            let kind: SamplerKind = serde_json::from_value(json!(name)).unwrap();
            assert_eq!(Some(kind), SamplerKind::parse(name));
        }
        for &name in Precision::NAMES {
            serde_json::from_value::<Precision>(json!(name)).unwrap();
        }
    }
}
