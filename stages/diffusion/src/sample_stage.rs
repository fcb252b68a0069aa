//! The `sample` kind: text-to-image samples of an imagefolder split's captions, as diffusers'
//! `StableDiffusionPipeline` makes them.
//!
//! Reproducibility: prompts are taken in sorted id order and image `k` of prompt `i` starts
//! from latents drawn with seed `seed + i·n_per_prompt + k` (see [`crate::noise`]), so any one
//! sample can be regenerated alone and batching never changes a result. Finished images are
//! kept in the stage's state directory, so an interrupted run resumes where it stopped.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::DType;
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, ParamType, Params, StageContext, StageError,
    StageKind,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::generate::{latent_side, save_png, Conditioning, StableDiffusion};
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
         resolved from a local folder, the Hugging Face cache or the hub."
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
                doc: "One {id, file_name, prompt, seed, k} line per image, in id order.",
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .build()
            .map_err(|e| StageError::failed(format!("starting {} threads: {e}", ctx.threads)))?;
        pool.install(|| run_jobs(ctx, &pipeline, &settings, &jobs))?;
        write_outputs(ctx, &jobs)
    }
}

/// Generate every job's image into `state_dir/images`, skipping those already there.
fn run_jobs(
    ctx: &mut StageContext<'_>,
    pipeline: &SdPipeline,
    settings: &Settings,
    jobs: &[Job],
) -> Result<(), StageError> {
    let device = ctx.candle_device()?;
    let sd = StableDiffusion::load(pipeline, &device, settings.dtype)?;
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

/// Move the finished images into `images/` and write `samples.jsonl`.
fn write_outputs(ctx: &mut StageContext<'_>, jobs: &[Job]) -> Result<(), StageError> {
    let done_dir = ctx.state_dir.join(IMAGES);
    let out_dir = ctx.output_path(IMAGES);
    fs::create_dir_all(&out_dir).map_err(io("creating images/"))?;
    let mut lines = String::new();
    for job in jobs {
        let (from, to) = (done_dir.join(&job.file_name), out_dir.join(&job.file_name));
        if fs::rename(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(io(format!("copying {}", job.file_name)))?;
        }
        let line = json!({"id": job.id, "file_name": job.file_name, "prompt": job.prompt,
                          "seed": job.seed, "k": job.k});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    fs::write(ctx.output_path(SAMPLES), lines).map_err(io("writing samples.jsonl"))
}
