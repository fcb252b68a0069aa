//! The `train-vae` stage kind: trains a pipeline's VAE as an autoencoder on one or two
//! imagefolder datasets ([`crate::vae_training`]) and writes the pipeline folder with the new
//! VAE, its latent `scaling_factor` measured on the training images, and the per-step log.
//!
//! The other components (UNet, text encoder, tokenizer, scheduler) are copied unchanged. Runs
//! are short and deterministic, so an interrupted run starts over rather than resuming.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use sdpipe_diffusion::{copy_components, to_rgb8, SdPipeline};
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{Input, KindParams};
use sdpipe_unet::vae::Vae;
use serde_json::json;

use crate::data::{load_split, load_train_split, read_rgb, Example, Transform};
use crate::recipe::{self, Optimiser, OptimiserDefaults, Threads};
use crate::rng::{Purpose, Seeds};
use crate::vae_training::{ReconLoss, VaeTrainConfig, VaeTrainer};

const MODEL: &str = "model";
const LOG: &str = "train_log.jsonl";
const RECONSTRUCTIONS: &str = "reconstructions";
const RECONSTRUCTIONS_JSONL: &str = "reconstructions.jsonl";

/// The `train-vae` kind.
#[derive(Default)]
pub struct TrainVae;

/// The inputs: the pipeline whose VAE is trained and the datasets it learns from.
#[derive(KindParams)]
struct Inputs {
    /// The diffusers pipeline folder whose VAE is trained (e.g. a `tiny-sd` stage's `model`).
    #[param(input)]
    pipeline: Input,
    /// An imagefolder dataset (an `imagefolder` stage's `dataset`); `train/` is used.
    #[param(input)]
    dataset: Input,
    /// A second imagefolder dataset whose `train/` images are added (a VAE is meant to
    /// represent every domain the diffusion model will see; test images stay out).
    #[param(input, default = null)]
    extra_dataset: Option<Input>,
}

impl Inputs {
    /// `dataset` and, when bound, `extra_dataset`.
    fn datasets(&self) -> Vec<PathBuf> {
        let extra = self.extra_dataset.as_ref().map(|d| d.path().to_path_buf());
        std::iter::once(self.dataset.path().to_path_buf()).chain(extra).collect()
    }
}

/// The parameters besides the inputs and `threads` (see `params`).
#[derive(KindParams)]
struct Settings {
    #[param(flatten)]
    transform: Transform,
    /// Images per optimiser step.
    #[param(default = 4, min = 1, max = 4096)]
    train_batch_size: usize,
    /// Optimiser steps.
    #[param(default = 1000, min = 1)]
    max_train_steps: u64,
    /// With the autoencoder recipe's defaults ([`VAE_OPTIMISER`]).
    #[param(flatten)]
    optimiser: Optimiser,
    /// Pixel reconstruction loss: `l1` (LDM's) or `mse`.
    #[param(default = "l1", one_of = ReconLoss::NAMES)]
    reconstruction_loss: ReconLoss,
    /// Weight of the KL term (diffusers' --kl_scale; LDM's kl_weight).
    #[param(default = 1e-6, min = 0.0)]
    kl_weight: f64,
    /// Seed of every random draw (data order, crops, flips, posterior noise).
    #[param(default = 0, min = 0)]
    seed: u64,
}

/// diffusers' autoencoder script's (and LDM's) optimiser, not the UNet's.
const VAE_OPTIMISER: OptimiserDefaults = OptimiserDefaults {
    learning_rate: 1e-4,
    adam_beta1: 0.5,
    adam_beta1_doc: "AdamW β₁ (0.5, as diffusers' and LDM's autoencoder training).",
    adam_beta2: 0.9,
};

impl Settings {
    /// The trainer's settings, with the check the declared bounds cannot express.
    fn config(self) -> Result<VaeTrainConfig, StageError> {
        Ok(VaeTrainConfig {
            transform: self.transform,
            batch_size: self.train_batch_size,
            max_train_steps: self.max_train_steps,
            lr: self.optimiser.lr_schedule(self.max_train_steps),
            max_grad_norm: self.optimiser.max_grad_norm()?,
            adam: self.optimiser.adamw(),
            seed: self.seed,
            kl_weight: self.kl_weight,
            recon: self.reconstruction_loss,
        })
    }
}

/// The training examples of `dataset` and, when bound, `extra_dataset`, each with its split
/// folder (for error messages).
fn examples(datasets: &[PathBuf]) -> Result<Vec<(Example, PathBuf)>, StageError> {
    let mut all = Vec::new();
    for dataset in datasets {
        let split = dataset.join("train");
        let found = load_train_split(dataset).map_err(StageError::caused)?;
        all.extend(found.into_iter().map(|e| (e, split.clone())));
    }
    Ok(all)
}

impl StageKind for TrainVae {
    fn name(&self) -> &'static str {
        "train-vae"
    }

    fn version(&self) -> u32 {
        3
    }

    fn doc(&self) -> &'static str {
        "Trains a Stable Diffusion pipeline's VAE (AutoencoderKL) as an autoencoder on the \
         `train/` split of an imagefolder dataset (and of `extra_dataset` when bound), as \
         diffusers' train_autoencoderkl.py does without its discriminator and perceptual loss: \
         the `train` stage's image transform; posterior sample z = μ + σ·ε; loss = mean L1 (or \
         MSE) reconstruction error on [-1, 1] pixels + kl_weight × KL (per example, summed over \
         latents); global-norm clipping; AdamW; seeded. Writes `model/` (the pipeline with the \
         new VAE and everything else unchanged; vae/config.json's scaling_factor set to 1/std of \
         the training images' latents, the LDM practice), `train_log.jsonl` (step, loss, \
         recon, kl, lr, grad_norm; wall time per step goes to the stage's log) and \
         `reconstructions/` with `reconstructions.jsonl` (the datasets' `test/` images through \
         the trained VAE, listed as a `sample` stage lists its images, so `scene-accuracy` can \
         judge how much of their domain the VAE preserves)."
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut params = Inputs::specs();
        params.extend(VAE_OPTIMISER.apply(Settings::specs()));
        params.extend(Threads::specs());
        params
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "model",
                path: MODEL,
                kind: OutputKind::Dir,
                doc: "The pipeline folder with the trained VAE (and its measured scaling_factor).",
            },
            OutputSpec {
                name: "log",
                path: LOG,
                kind: OutputKind::File,
                doc: "One JSON line per optimiser step: step, loss, recon, kl, lr, grad_norm.",
            },
            OutputSpec {
                name: "reconstructions",
                path: RECONSTRUCTIONS,
                kind: OutputKind::Dir,
                doc: "The bound datasets' held-out `test/` images through the trained VAE, as \
                      PNGs (how much of their domain the VAE preserves).",
            },
            OutputSpec {
                name: "reconstructions_jsonl",
                path: RECONSTRUCTIONS_JSONL,
                kind: OutputKind::File,
                doc: "One line per reconstruction in the `sample` stage's `samples` format \
                      (id, file_name, prompt = the caption), so `scene-accuracy` can judge them.",
            },
        ]
    }

    fn threads(&self, params: &Params) -> usize {
        recipe::threads(params)
    }

    fn external_deps(
        &self,
        _params: &Params,
        _fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        // Every model file comes from a bound input, which is already part of the key.
        Ok(BTreeMap::new())
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let config = Settings::of(ctx)?.config()?;
        let inputs = Inputs::of(ctx)?;
        let datasets = inputs.datasets();
        // Check the data before loading the model: a bad dataset fails in milliseconds.
        let examples = examples(&datasets)?;
        let base = inputs.pipeline.path().to_path_buf();
        let threads = ctx.threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| StageError::failed(format!("starting {threads} worker threads: {e}")))?;
        pool.install(|| train(ctx, config, &base, &examples, &datasets))
    }
}

fn train(
    ctx: &mut StageContext<'_>,
    config: VaeTrainConfig,
    base: &Path,
    examples: &[(Example, PathBuf)],
    datasets: &[PathBuf],
) -> Result<(), StageError> {
    let failed = |e: &dyn std::fmt::Display| StageError::failed(e.to_string());
    let device = ctx.candle_device()?;
    let mut vae = Vae::from_pretrained(&base.join("vae"), &device).map_err(|e| failed(&e))?;
    let max_steps = config.max_train_steps;
    let transform = config.transform;
    let mut trainer = VaeTrainer::new(config, &vae, examples).map_err(|e| failed(&e))?;
    let _ = writeln!(
        ctx.log,
        "training the VAE ({} parameters) on {} images",
        vae.parameter_count(),
        examples.len()
    );
    ctx.progress.set_total(max_steps);
    let started = Instant::now();
    while !trainer.finished() {
        ctx.cancel.check()?;
        let line = trainer.step().map_err(|e| failed(&e))?;
        let rate = line.step as f64 / started.elapsed().as_secs_f64().max(1e-9);
        ctx.progress.advance(1, &format!("recon {:.4} · {rate:.2} it/s", line.recon));
        let _ = writeln!(
            ctx.log,
            "step {}/{max_steps} loss {:.6} recon {:.6} kl {:.3} lr {:.3e} grad_norm {:.4} {:.2}s",
            line.step, line.loss, line.recon, line.kl, line.lr, line.grad_norm, line.seconds
        );
    }
    let scaling_factor = trainer.latent_scaling_factor().map_err(|e| failed(&e))?;
    let _ = writeln!(
        ctx.log,
        "latent scaling_factor (1/std of the training latents): {scaling_factor:.6}"
    );
    let mut text = String::new();
    for line in trainer.log() {
        text.push_str(&serde_json::to_string(line).expect("log lines serialise"));
        text.push('\n');
    }
    drop(trainer);

    let model_dir = ctx.out_dir.join(MODEL);
    copy_components(&SdPipeline::open(base)?, &model_dir, &["vae"])?;
    // The UNet is trained on `posterior sample × scaling_factor` and sampling decodes
    // `latents / scaling_factor`: with 1/std the diffusion model sees unit-variance latents,
    // as LDM chose SD's 0.18215 for its own VAE.
    vae.set_scaling_factor(scaling_factor);
    vae.save_pretrained(&model_dir.join("vae")).map_err(|e| failed(&e))?;
    write_reconstructions(ctx, &vae, transform, datasets)?;
    let log = ctx.out_dir.join(LOG);
    std::fs::write(&log, text).map_err(|e| StageError::io(format!("writing {}", log.display()), e))
}

/// `reconstructions/` and its list: every `test/` image of the bound datasets, resized and
/// centre-cropped as for training, encoded to its posterior mean and decoded (what diffusers'
/// `train_autoencoderkl.py` logs as validation images). Judged like samples, they show how much
/// of their domain the VAE preserves, which limits what a model sampling through it can show.
fn write_reconstructions(
    ctx: &mut StageContext<'_>,
    vae: &Vae,
    transform: Transform,
    datasets: &[PathBuf],
) -> Result<(), StageError> {
    let failed = |e: &dyn std::fmt::Display| StageError::failed(e.to_string());
    let images = ctx.out_dir.join(RECONSTRUCTIONS);
    std::fs::create_dir_all(&images)
        .map_err(|e| StageError::io(format!("creating {}", images.display()), e))?;
    let transform = Transform { center_crop: true, random_flip: false, ..transform };
    // A centre crop without flips draws nothing; the stream is only the signature's.
    let mut draws = Seeds::new(0).stream(Purpose::MicroBatch, 0);
    let mut lines = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for dataset in datasets {
        if !dataset.join("test/metadata.jsonl").is_file() {
            continue;
        }
        let split = dataset.join("test");
        for example in load_split(dataset, "test").map_err(|e| failed(&e))? {
            ctx.cancel.check()?;
            let id = example.image.file_stem().unwrap_or_default().to_string_lossy().to_string();
            if !seen.insert(id.clone()) {
                return Err(StageError::failed(format!(
                    "two test images are named `{id}` ({}): reconstructions are kept by name",
                    split.display()
                )));
            }
            let image = read_rgb(&example.image, &split).map_err(|e| failed(&e))?;
            let (pixels, _) = transform.apply(&image, &mut draws);
            let size = transform.resolution as usize;
            let decoded = Tensor::from_vec(pixels, (1, 3, size, size), vae.device())
                .and_then(|x| vae.encode(&x))
                .and_then(|posterior| vae.decode(&posterior.mean))
                .and_then(|y| y.affine(0.5, 0.5))
                .map_err(|e| failed(&e))?;
            let file_name = format!("{id}.png");
            let rgb = to_rgb8(&decoded)?.remove(0);
            rgb.save(images.join(&file_name)).map_err(|e| failed(&e))?;
            let line = json!({"id": id, "file_name": file_name, "prompt": example.caption});
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
    }
    let path = ctx.out_dir.join(RECONSTRUCTIONS_JSONL);
    std::fs::write(&path, lines)
        .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_and_enum_name_reads() {
        recipe::check_declared_values::<Settings>(&TrainVae);
    }
}
