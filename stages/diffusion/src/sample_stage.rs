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
    Fetch, OutputKind, OutputSpec, ParamSpec, ParamType, Params, StageContext, StageError,
    StageKind,
};
use sdpipe_unet::lora::LORA_WEIGHTS_NAME;
use sdpipe_unet::LoraFile;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::generate::{latent_side, save_png, Conditioning, StableDiffusion};
use crate::lora_base::{BaseCheck, BaseIdentity};
use crate::pipeline::SdPipeline;
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

    /// The pipeline folder: the bound `pipeline` input, else `model` resolved through the hub
    /// crate (local folder, Hugging Face cache, download).
    fn resolve_model(&self, params: &Params, fetch: Fetch) -> Result<PathBuf, StageError> {
        let text = |name: &str| params.get(name).and_then(Value::as_str).unwrap_or_default();
        let variant = crate::pipeline::variant_param(params)?;
        Ok(crate::pipeline::resolve_folder(
            &self.hub_config(),
            text("model"),
            text("revision"),
            variant,
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

/// The validated settings of one run.
struct Settings {
    split: String,
    sampler: SamplerKind,
    steps: usize,
    guidance_scale: f64,
    negative_prompt: String,
    seed: u64,
    n_per_prompt: usize,
    height: usize,
    width: usize,
    batch_size: usize,
    /// What the text encoder and the VAE are loaded and computed in (`precision`).
    dtype: DType,
    /// The bound LoRA's scale (`lora_scale`).
    lora_scale: f64,
}

/// The `precision` parameter's values: the dtype the text encoder and the VAE are loaded in,
/// as diffusers' `torch_dtype` (`fp16`: torch.float16, `bf16`: torch.bfloat16).
fn precision_dtype(name: &str) -> Option<DType> {
    match name {
        "f32" => Some(DType::F32),
        "fp16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

fn settings(ctx: &StageContext<'_>) -> Result<Settings, StageError> {
    let scheduler: String = ctx.param("scheduler")?;
    let sampler = SamplerKind::parse(&scheduler).ok_or_else(|| {
        invalid("scheduler", format!("`{scheduler}`: expected pndm, ddim or euler"))
    })?;
    let positive = |name: &str| -> Result<usize, StageError> {
        let v: i64 = ctx.param(name)?;
        usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| invalid(name, "must be ≥ 1"))
    };
    let size = |name: &str| -> Result<usize, StageError> {
        let v: i64 = ctx.param(name)?;
        usize::try_from(v).map_err(|_| invalid(name, "must be ≥ 0 (0: the model's default)"))
    };
    let seed: i64 = ctx.param("seed")?;
    let precision: String = ctx.param("precision")?;
    let dtype = precision_dtype(&precision).ok_or_else(|| {
        invalid("precision", format!("`{precision}`: expected f32, fp16 or bf16"))
    })?;
    let lora_scale: f64 = ctx.param("lora_scale")?;
    if !lora_scale.is_finite() {
        return Err(invalid("lora_scale", format!("{lora_scale} is not a finite number")));
    }
    if lora_scale != 1.0 && !ctx.inputs.contains_key("lora") {
        return Err(invalid(
            "lora_scale",
            format!(
                "{lora_scale} scales a LoRA, but no `lora` is bound: bind one (a train-lora \
                 stage's `lora` output) or leave `lora_scale` at its default, 1.0"
            ),
        ));
    }
    Ok(Settings {
        split: ctx.param("split")?,
        sampler,
        steps: positive("steps")?,
        guidance_scale: ctx.param("guidance_scale")?,
        negative_prompt: ctx.param("negative_prompt")?,
        seed: seed as u64,
        n_per_prompt: positive("n_per_prompt")?,
        height: size("height")?,
        width: size("width")?,
        batch_size: positive("batch_size")?,
        dtype,
        lora_scale,
    })
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
        2
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
        let int = |min: i64| ParamType::Int { min: Some(min), max: None };
        vec![
            ParamSpec::required(
                "prompts",
                ParamType::Input,
                "An imagefolder `dataset/` whose split's metadata.jsonl holds the captions.",
            ),
            ParamSpec::optional(
                "pipeline",
                ParamType::Input,
                Value::Null,
                "A diffusers pipeline folder from an upstream stage (e.g. `train.model`); when \
                 bound it is used instead of `model`.",
            ),
            ParamSpec::optional(
                "lora",
                ParamType::Input,
                Value::Null,
                "A LoRA to merge into the UNet: a `train-lora` stage's `lora` output, or a \
                 diffusers LoRA file (`pytorch_lora_weights.safetensors`) or a folder holding \
                 one. The base model it records must be this pipeline's (a LoRA that records \
                 none is merged with a note in the log); its layers must fit the UNet.",
            ),
            ParamSpec::optional(
                "lora_scale",
                ParamType::Float { min: None, max: None },
                json!(1.0),
                "How much of the LoRA is merged: W + lora_scale·(alpha/rank)·B·A, diffusers' \
                 `fuse_lora(lora_scale=…)` or `cross_attention_kwargs={\"scale\": …}`; 0 samples \
                 the base model. Only with a bound `lora`.",
            ),
            ParamSpec::optional(
                "model",
                ParamType::String,
                json!("stable-diffusion-v1-5/stable-diffusion-v1-5"),
                "Hugging Face repository id or local folder of the pipeline.",
            ),
            ParamSpec::optional(
                "revision",
                ParamType::String,
                json!("main"),
                "Revision of `model` on the hub.",
            ),
            ParamSpec::optional(
                "variant",
                ParamType::String,
                Value::Null,
                "diffusers' weight variant of `model` to read (`fp16`: `*.fp16.safetensors`, \
                 loaded into f32); null reads the default weights.",
            ),
            ParamSpec::optional(
                "split",
                ParamType::String,
                json!("test"),
                "Which split of `prompts` to sample.",
            ),
            ParamSpec::optional(
                "scheduler",
                ParamType::Enum(SCHEDULERS),
                json!("pndm"),
                "The sampler, built from the pipeline's scheduler config as diffusers' \
                 `from_config` would.",
            ),
            ParamSpec::optional("steps", int(1), json!(50), "Inference steps."),
            ParamSpec::optional(
                "guidance_scale",
                ParamType::Float { min: Some(0.0), max: None },
                json!(7.5),
                "Classifier-free guidance scale; ≤ 1 disables guidance (as in diffusers).",
            ),
            ParamSpec::optional(
                "negative_prompt",
                ParamType::String,
                json!(""),
                "The unconditional prompt guidance steers away from (diffusers' default: empty).",
            ),
            ParamSpec::optional(
                "seed",
                ParamType::Int { min: Some(0), max: None },
                json!(0),
                "Base seed; image k of the i-th prompt (in id order) uses seed + i*n + k.",
            ),
            ParamSpec::optional("n_per_prompt", int(1), json!(1), "Images per prompt."),
            ParamSpec::optional(
                "height",
                int(0),
                json!(0),
                "Image height in pixels; 0: the UNet's sample_size × the VAE's scale factor.",
            ),
            ParamSpec::optional(
                "width",
                int(0),
                json!(0),
                "Image width in pixels; 0: the UNet's sample_size × the VAE's scale factor.",
            ),
            ParamSpec::optional(
                "batch_size",
                int(1),
                json!(1),
                "Images denoised together (results do not depend on it).",
            ),
            ParamSpec::optional(
                "precision",
                ParamType::Enum(&["f32", "fp16", "bf16"]),
                json!("f32"),
                "What the text encoder and the VAE are loaded and run in, as diffusers' \
                 `torch_dtype` (`fp16`: float16, `bf16`: bfloat16). The UNet computes in f32 \
                 whatever this says (sdpipe's UNet has no half-precision path), and the \
                 sampler's arithmetic is f32, so half precision changes images by rounding in \
                 the text embeddings and the VAE decode only.",
            ),
            ParamSpec::optional(
                "threads",
                int(1),
                json!(4),
                "CPU threads to use (the scheduler may grant fewer).",
            ),
        ]
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
        params.get("threads").and_then(Value::as_u64).unwrap_or(4).max(1) as usize
    }

    fn external_deps(
        &self,
        params: &Params,
        fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        // A bound `pipeline` is an upstream output, already part of the key.
        if params.get("pipeline").is_some_and(|v| !v.is_null()) {
            return Ok(BTreeMap::new());
        }
        Ok(crate::pipeline::model_deps(
            &self.resolve_model(params, fetch)?,
            crate::pipeline::variant_param(params)?,
        )?)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = settings(ctx)?;
        let jobs =
            jobs(ctx.input("prompts")?, &settings.split, settings.seed, settings.n_per_prompt)?;
        let root = match ctx.inputs.get("pipeline") {
            Some(path) => path.clone(),
            None => self.resolve_model(ctx.params, Fetch::allowed())?,
        };
        let pipeline =
            SdPipeline::open_variant(&root, crate::pipeline::variant_param(ctx.params)?)?;
        let model = match ctx.inputs.get("pipeline") {
            Some(path) => format!("the `pipeline` input, {}", path.display()),
            None => ctx.param::<String>("model")?,
        };
        let lora = match ctx.inputs.get("lora") {
            Some(path) => Some(open_lora(ctx, path, &pipeline, &model, settings.lora_scale)?),
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
        None => StableDiffusion::load(pipeline, &device, settings.dtype)?,
        Some(lora) => {
            // A LoRA that does not fit the UNet is refused here, from the headers, before any
            // weight is read; the error names the LoRA file and its layers.
            let loras = [(&lora.file, lora.scale)];
            let sd = StableDiffusion::load_with_lora(pipeline, &device, settings.dtype, &loras)?;
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
    let calls = settings.sampler.build(&pipeline.scheduler, settings.steps).map_err(|m| {
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
        settings.sampler.class_name(),
        pipeline.root.display(),
        settings.steps,
        settings.guidance_scale,
        settings.negative_prompt,
        settings.batch_size,
        settings.dtype
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
            .sampler
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
