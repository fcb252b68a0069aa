//! The `train-lora` stage kind: LoRA finetuning of a Stable Diffusion pipeline's UNet, as
//! diffusers' `examples/text_to_image/train_text_to_image_lora.py` does it: rank-`lora_rank`
//! adapters (`lora_alpha`, default = rank) on the attention projections (`to_q`, `to_k`, `to_v`,
//! `to_out.0`, or `lora_target_modules`), the base weights frozen, only the adapters in AdamW,
//! in gradient clipping and in the EMA; every other flag is the `train` kind's recipe
//! ([`crate::finetune`]), with the LoRA script's learning rate 1e-4 as the default.
//!
//! Its output is `lora/pytorch_lora_weights.safetensors`, the file and key naming diffusers'
//! `StableDiffusionPipeline.load_lora_weights` loads (see `sdpipe_unet::lora`), a few MB instead
//! of a 3.4 GB UNet, with the base model's identity in its metadata
//! ([`sdpipe_diffusion::lora_base`]) so that `sample` never applies it to another base.
//!
//! A separate kind rather than a flag of `train` because its output is another thing (an
//! adapter, not a pipeline folder), as diffusers keeps a separate script for it. Two
//! differences from that script, both deliberate: it clips the adapters' gradients at
//! `max_grad_norm` (the script means to, but passes `clip_grad_norm_` a generator the optimiser
//! has already consumed, so it clips nothing; tests/parity/lora.py shows the difference), and
//! `use_ema` is honoured (the script has no EMA).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use sdpipe_diffusion::lora_base::BaseIdentity;
use sdpipe_diffusion::SdPipeline;
use sdpipe_hub::HubConfig;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{with_default, KindParams};
use sdpipe_unet::lora::DEFAULT_TARGETS;
use sdpipe_unet::{LoraConfig, UNet};
use serde_json::json;

use crate::finetune::{self, Finetune, Finished, Models, Recipe, RecipeParams};
use crate::recipe::{self, invalid};
use crate::validation::ValidationParams;

/// The output folder (diffusers' `load_lora_weights(dir)` reads it as it is).
const LORA: &str = "lora";

/// The `train-lora` kind; `hub` and `interrupt_after` as [`crate::train_stage::Train`]'s.
#[derive(Default)]
pub struct TrainLora {
    pub hub: Option<HubConfig>,
    pub interrupt_after: Option<u64>,
}

/// The parameters besides the inputs and `threads` ([`finetune::params`]).
#[derive(KindParams)]
struct Settings {
    #[param(flatten)]
    recipe: RecipeParams,
    #[param(flatten)]
    lora: LoraParams,
    #[param(flatten)]
    validation: ValidationParams,
}

/// The LoRA's own parameters.
#[derive(KindParams)]
struct LoraParams {
    /// The adapters' rank r (diffusers' --rank).
    #[param(default = 4, min = 1, max = 16384)]
    lora_rank: usize,
    /// peft's lora_alpha: the adapters' output is scaled by lora_alpha / lora_rank; null is the
    /// rank (scale 1), as the script sets it.
    #[param(default = null, min = 0.0)]
    lora_alpha: Option<f64>,
    /// The linear layers that get adapters, by the end of their state-dict name as peft matches
    /// them (e.g. ff.net.2 adds the feed-forward output).
    #[param(default = DEFAULT_TARGETS)]
    lora_target_modules: Vec<String>,
}

/// The LoRA's own parameters, checked.
fn lora_config(params: LoraParams) -> Result<LoraConfig, StageError> {
    let rank = params.lora_rank;
    let alpha = match params.lora_alpha {
        None => rank as f64,
        // Zero is within the declared bounds, but would scale the adapters away.
        Some(a) if a > 0.0 => a,
        Some(a) => {
            return Err(invalid("lora_alpha", format!("expected a positive number, found {a}")))
        }
    };
    let target_modules = params.lora_target_modules;
    if target_modules.is_empty() || target_modules.iter().any(|t| t.trim().is_empty()) {
        return Err(invalid(
            "lora_target_modules",
            "must name at least one layer (e.g. to_q), and no blank names",
        ));
    }
    let config = LoraConfig { rank, alpha, target_modules };
    config.validate().map_err(|e| invalid("lora_rank", e.to_string()))?;
    Ok(config)
}

impl StageKind for TrainLora {
    fn name(&self) -> &'static str {
        "train-lora"
    }

    fn version(&self) -> u32 {
        // 2: `mixed_precision` fp16/bf16 runs the UNet under autocast (with fp16 loss scaling).
        2
    }

    fn doc(&self) -> &'static str {
        "LoRA finetuning of a Stable Diffusion pipeline's UNet as diffusers' \
         train_text_to_image_lora.py: rank-lora_rank adapters (scale lora_alpha/lora_rank) on \
         the attention projections to_q, to_k, to_v, to_out.0 (lora_target_modules), gaussian \
         A and zero B as peft initialises them, the base frozen; only the adapters are in AdamW \
         (default learning rate 1e-4), in gradient clipping (which the script means to do but, \
         as written, does not) and in the EMA. Every other flag as `train`. Writes \
         `lora/pytorch_lora_weights.safetensors` (diffusers' key naming; \
         StableDiffusionPipeline.load_lora_weights loads it; the base model's identity in its \
         metadata, checked by `sample`), `train_log.jsonl` and `validation/`. Checkpoints go to \
         the stage's state directory, so an interrupted run resumes."
    }

    fn params(&self) -> Vec<ParamSpec> {
        // The LoRA script's learning rate.
        with_default(finetune::params(Settings::specs()), "learning_rate", json!(1e-4))
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        finetune::outputs(OutputSpec {
            name: "lora",
            path: LORA,
            kind: OutputKind::Dir,
            doc: "pytorch_lora_weights.safetensors: the adapters (the EMA's with use_ema) \
                  in diffusers' naming, with the base model's identity in its metadata.",
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
        let lora = LoraFinetune { config: lora_config(settings.lora)?, seed: recipe.config.seed };
        let prepared = finetune::prepare(self.hub.as_ref(), ctx, recipe)?;
        finetune::run(ctx, prepared, &lora, self.interrupt_after)
    }
}

/// Adapters trained on a frozen UNet.
struct LoraFinetune {
    config: LoraConfig,
    /// Seeds the adapters' initial values (the stage's `seed`).
    seed: u64,
}

impl Finetune for LoraFinetune {
    fn load(&self, pipeline: &SdPipeline, device: &Device) -> Result<Models, StageError> {
        let files = pipeline.weight_files("unet")?;
        let unet = UNet::for_lora_training(
            &pipeline.root.join("unet"),
            &files,
            &self.config,
            self.seed,
            device,
        )
        .map_err(StageError::caused)?;
        Ok(Models { unet, text_encoder: None })
    }

    /// `lora/pytorch_lora_weights.safetensors`, the EMA's adapters with `use_ema`.
    fn write(&self, out_dir: &Path, finished: Finished<'_>) -> Result<(), StageError> {
        let Finished { pipeline, base_name, models, .. } = finished;
        let identity = BaseIdentity::of(pipeline, &base_name)?;
        let dir = out_dir.join(LORA);
        models.unet.save_lora(&dir, &identity.metadata()).map_err(StageError::caused)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_and_enum_name_reads() {
        recipe::check_declared_values::<Settings>(&TrainLora::default());
    }
}
