//! The `train` stage kind: finetunes every weight of a Stable Diffusion pipeline's UNet (and its
//! text encoder with `train_text_encoder`) on an imagefolder dataset with the reference script's
//! flags, and writes the finetuned pipeline folder. What it shares with `train-lora` — the
//! recipe, the base model, checkpoints and resumption, validation images, the per-step log — is
//! [`crate::finetune`]'s; this file holds what it trains and what it writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use sdpipe_diffusion::config::{write_json, SchedulerConfig};
use sdpipe_diffusion::{copy_components, SdPipeline};
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::KindParams;

use crate::finetune::{self, Finetune, Finished, Models, Recipe, RecipeParams};
use crate::recipe;
use crate::validation::ValidationParams;

const MODEL: &str = "model";

/// The parameters besides the inputs and `threads` ([`finetune::params`]).
#[derive(KindParams)]
struct Settings {
    #[param(flatten)]
    recipe: RecipeParams,
    /// Train the CLIP text encoder with the UNet (diffusers' --train_text_encoder): same
    /// optimiser, clipping and EMA; the output's text_encoder is the trained one.
    #[param(default = false)]
    train_text_encoder: bool,
    #[param(flatten)]
    validation: ValidationParams,
}

/// The `train` kind. `hub` overrides the environment's hub settings and `interrupt_after` stops
/// the run abruptly after that many optimiser steps without a final checkpoint, as a killed
/// process would (both for tests).
#[derive(Default)]
pub struct Train {
    pub hub: Option<HubConfig>,
    pub interrupt_after: Option<u64>,
}

impl StageKind for Train {
    fn name(&self) -> &'static str {
        "train"
    }

    fn version(&self) -> u32 {
        // `mixed_precision` (default `no`) left outputs of existing parameter sets bit-identical,
        // so it did not bump this.
        // 4: the `validation/` output (validation images during training; an empty folder with
        //    the defaults, which leave the other outputs as they were).
        // 5: `mixed_precision` fp16/bf16 runs the UNet under autocast (with fp16 loss scaling).
        5
    }

    fn doc(&self) -> &'static str {
        "Finetunes a Stable Diffusion pipeline's UNet on an imagefolder dataset's `train/` split \
         exactly as diffusers' train_text_to_image.py: frozen VAE and CLIP text encoder (the \
         encoder trained too with train_text_encoder, as the DreamBooth script does), Pillow \
         bilinear resize, centre or random crop, optional flip; VAE posterior sample × \
         scaling_factor; DDPM noising with the model's scheduler config; ε or v target; MSE \
         (optionally min-SNR weighted); gradient accumulation; global-norm clipping; AdamW; \
         diffusers' learning-rate schedules; EMA; mixed_precision (frozen VAE and text encoder \
         in fp16/bf16, the UNet under autocast with f32 weights, fp16 loss scaling). Writes \
         `model/` (the complete pipeline folder, with the EMA weights when use_ema and a \
         scheduler config that names the prediction type trained) and `train_log.jsonl` \
         (step, loss, lr, grad_norm per optimiser step, and skipped on a step skipped for \
         fp16 overflow; wall time per step goes to the stage's log, so the output depends \
         on the inputs alone). With validation_steps, every that many steps and after the \
         last it draws the validation prompts with the current weights (the EMA's with \
         use_ema, the trained text encoder with train_text_encoder) exactly as the `sample` \
         kind would from a model saved then, into `validation/` \
         (`step-<step>/prompt-<i>.png` and `validation.json`); validation time goes to the \
         stage's log. Checkpoints go to the stage's state directory, so an interrupted run \
         resumes, validation images included."
    }

    fn params(&self) -> Vec<ParamSpec> {
        finetune::params(Settings::specs())
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        finetune::outputs(OutputSpec {
            name: "model",
            path: MODEL,
            kind: OutputKind::Dir,
            doc: "The finetuned diffusers pipeline folder (EMA weights when use_ema).",
        })
    }

    fn threads(&self, params: &Params) -> usize {
        recipe::threads(params)
    }

    fn external_deps(
        &self,
        params: &Params,
        fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        finetune::external_deps(self.hub.as_ref(), params, fetch)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let settings = Settings::of(ctx)?;
        let recipe = Recipe::new(settings.recipe, settings.validation)?;
        let full = FullFinetune { train_text_encoder: settings.train_text_encoder };
        let prepared = finetune::prepare(self.hub.as_ref(), ctx, recipe)?;
        finetune::run(ctx, prepared, &full, self.interrupt_after)
    }
}

/// Every UNet weight trained, and the text encoder's with `train_text_encoder`.
struct FullFinetune {
    train_text_encoder: bool,
}

impl Finetune for FullFinetune {
    fn load(&self, pipeline: &SdPipeline, device: &Device) -> Result<Models, StageError> {
        let unet_files = pipeline.weight_files("unet")?;
        let unet = sdpipe_unet::UNet::from_files(&pipeline.root.join("unet"), &unet_files, device)
            .map_err(StageError::caused)?;
        let text_encoder = if self.train_text_encoder {
            Some(pipeline.load_trainable_text_encoder(device)?)
        } else {
            None
        };
        Ok(Models { unet, text_encoder })
    }

    /// `model/`: the base pipeline with the finetuned UNet (the EMA's weights with `use_ema`),
    /// and text encoder when trained.
    fn write(&self, out_dir: &Path, finished: Finished<'_>) -> Result<(), StageError> {
        let Finished { pipeline, models, scheduler, .. } = finished;
        let (unet, text_encoder) = (&models.unet, models.text_encoder.as_ref());
        let model_dir = out_dir.join(MODEL);
        let mut replaced = vec!["unet"];
        if text_encoder.is_some() {
            replaced.push("text_encoder");
        }
        copy_components(pipeline, &model_dir, &replaced)?;
        // Rewritten only when the prediction type changed, so that an unchanged config stays the
        // base's file byte for byte.
        let name =
            |c: &SchedulerConfig| c.prediction_type.clone().unwrap_or_else(|| "epsilon".into());
        if name(&pipeline.scheduler) != name(&scheduler) {
            let path = model_dir.join("scheduler/scheduler_config.json");
            // The copy may be a hard link to the base's file in the cache: replace, never edit.
            std::fs::remove_file(&path)
                .map_err(|e| StageError::io(format!("replacing {}", path.display()), e))?;
            write_json(&path, &scheduler)?;
        }
        if let Some(text) = text_encoder {
            let dir = model_dir.join("text_encoder");
            let config = pipeline.root.join("text_encoder/config.json");
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::copy(&config, dir.join("config.json")))
                .map_err(|e| StageError::io(format!("copying {}", config.display()), e))?;
            text.save(&dir).map_err(StageError::caused)?;
        }
        unet.save_pretrained(&model_dir.join("unet")).map_err(StageError::caused)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_and_enum_name_reads() {
        recipe::check_declared_values::<Settings>(&Train::default());
    }
}
