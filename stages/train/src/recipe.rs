//! The parameters the two training kinds (`train`, `train-vae`) share — image transform,
//! learning-rate schedule, clipping, AdamW, threads — declared once with each kind's defaults,
//! and read back into the trainers' settings with the same checks.

use sdpipe_stages::api::{ParamSpec, ParamType, Params, StageContext, StageError};
use serde_json::{json, Value};

use crate::data::Transform;
use crate::lr::{LrKind, LrSchedule};
use crate::optim::AdamWConfig;

/// Where the kinds' recipes differ: the UNet follows diffusers' text-to-image script, the VAE
/// its autoencoder script (and LDM).
pub struct OptimiserDefaults {
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta1_doc: &'static str,
    pub adam_beta2: f64,
}

pub fn int(min: i64, max: Option<i64>) -> ParamType {
    ParamType::Int { min: Some(min), max }
}

pub fn float(min: f64, max: Option<f64>) -> ParamType {
    ParamType::Float { min: Some(min), max }
}

pub fn invalid(param: &str, message: impl Into<String>) -> StageError {
    StageError::InvalidParam { param: param.into(), message: message.into() }
}

/// `resolution`, `center_crop`, `random_flip`.
pub fn transform_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional(
            "resolution",
            int(8, Some(4096)),
            json!(512),
            "Images are resized (shorter side) and cropped to this square size.",
        ),
        ParamSpec::optional(
            "center_crop",
            ParamType::Bool,
            json!(false),
            "Centre crop (true) or random crop (false) after resizing.",
        ),
        ParamSpec::optional(
            "random_flip",
            ParamType::Bool,
            json!(false),
            "Flip each image horizontally with probability 0.5.",
        ),
    ]
}

/// `learning_rate`, `max_grad_norm`, `lr_scheduler`, `lr_warmup_steps` and the AdamW settings.
pub fn optimiser_params(d: OptimiserDefaults) -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional(
            "learning_rate",
            float(0.0, None),
            json!(d.learning_rate),
            "Peak learning rate.",
        ),
        ParamSpec::optional(
            "max_grad_norm",
            float(0.0, None),
            json!(1.0),
            "Clip the global gradient norm to this before each optimiser step.",
        ),
        ParamSpec::optional(
            "lr_scheduler",
            ParamType::Enum(LrKind::NAMES),
            json!("constant"),
            "Learning-rate schedule (diffusers' get_scheduler).",
        ),
        ParamSpec::optional(
            "lr_warmup_steps",
            int(0, None),
            json!(0),
            "Linear warmup steps (ignored by `constant`, as in diffusers).",
        ),
        ParamSpec::optional(
            "adam_beta1",
            float(0.0, Some(1.0)),
            json!(d.adam_beta1),
            d.adam_beta1_doc,
        ),
        ParamSpec::optional("adam_beta2", float(0.0, Some(1.0)), json!(d.adam_beta2), "AdamW β₂."),
        ParamSpec::optional(
            "adam_weight_decay",
            float(0.0, None),
            json!(1e-2),
            "AdamW decoupled weight decay.",
        ),
        ParamSpec::optional("adam_epsilon", float(0.0, None), json!(1e-8), "AdamW ε."),
    ]
}

pub fn threads_param() -> ParamSpec {
    ParamSpec::optional("threads", int(1, Some(256)), json!(DEFAULT_THREADS), "CPU threads wanted.")
}

const DEFAULT_THREADS: u64 = 4;

/// The threads the kind asks the scheduler for.
pub fn threads(params: &Params) -> usize {
    params.get("threads").and_then(Value::as_u64).unwrap_or(DEFAULT_THREADS).max(1) as usize
}

pub fn transform(ctx: &StageContext<'_>) -> Result<Transform, StageError> {
    Ok(Transform {
        resolution: ctx.param("resolution")?,
        center_crop: ctx.param("center_crop")?,
        random_flip: ctx.param("random_flip")?,
    })
}

pub fn lr_schedule(ctx: &StageContext<'_>, training_steps: u64) -> Result<LrSchedule, StageError> {
    let name: String = ctx.param("lr_scheduler")?;
    let kind = LrKind::parse(&name)
        .ok_or_else(|| invalid("lr_scheduler", format!("unknown schedule `{name}`")))?;
    Ok(LrSchedule {
        kind,
        base_lr: ctx.param("learning_rate")?,
        warmup_steps: ctx.param("lr_warmup_steps")?,
        training_steps,
    })
}

pub fn max_grad_norm(ctx: &StageContext<'_>) -> Result<f64, StageError> {
    let norm: f64 = ctx.param("max_grad_norm")?;
    if norm <= 0.0 {
        return Err(invalid("max_grad_norm", "must be positive (torch would zero every gradient)"));
    }
    Ok(norm)
}

pub fn adamw(ctx: &StageContext<'_>) -> Result<AdamWConfig, StageError> {
    Ok(AdamWConfig {
        beta1: ctx.param("adam_beta1")?,
        beta2: ctx.param("adam_beta2")?,
        eps: ctx.param("adam_epsilon")?,
        weight_decay: ctx.param("adam_weight_decay")?,
    })
}
