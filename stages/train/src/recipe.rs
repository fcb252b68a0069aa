//! The parameters the two training kinds (`train`, `train-vae`) share — learning-rate schedule,
//! clipping, AdamW ([`Optimiser`]), threads ([`Threads`]); the image transform is
//! [`Transform`]'s own — declared once as groups a kind flattens into its parameters, with each
//! kind's defaults where they differ ([`OptimiserDefaults`]), and read back into the trainers'
//! settings with the checks the declared types cannot express.
//!
//! [`Transform`]: crate::data::Transform

use sdpipe_stages::api::{ParamSpec, Params, StageError};
use sdpipe_stages::params::{with_default, KindParams};
use serde_json::json;

use crate::lr::{LrKind, LrSchedule};
use crate::optim::AdamWConfig;

pub fn invalid(param: &str, message: impl Into<String>) -> StageError {
    StageError::InvalidParam { param: param.into(), message: message.into() }
}

/// `learning_rate`, `max_grad_norm`, `lr_scheduler`, `lr_warmup_steps` and the AdamW settings,
/// with the defaults of diffusers' text-to-image script; [`OptimiserDefaults`] and
/// [`with_default`] give a kind its own.
#[derive(KindParams)]
pub struct Optimiser {
    /// Peak learning rate.
    #[param(default = 1e-5, min = 0.0)]
    learning_rate: f64,
    /// Clip the global gradient norm to this before each optimiser step.
    #[param(default = 1.0, min = 0.0)]
    max_grad_norm: f64,
    /// Learning-rate schedule (diffusers' get_scheduler).
    #[param(default = "constant", one_of = LrKind::NAMES)]
    lr_scheduler: LrKind,
    /// Linear warmup steps (ignored by `constant`, as in diffusers).
    #[param(default = 0, min = 0)]
    lr_warmup_steps: u64,
    /// AdamW β₁.
    #[param(default = 0.9, min = 0.0, max = 1.0)]
    adam_beta1: f64,
    /// AdamW β₂.
    #[param(default = 0.999, min = 0.0, max = 1.0)]
    adam_beta2: f64,
    /// AdamW decoupled weight decay.
    #[param(default = 1e-2, min = 0.0)]
    adam_weight_decay: f64,
    /// AdamW ε.
    #[param(default = 1e-8, min = 0.0)]
    adam_epsilon: f64,
}

impl Optimiser {
    pub fn lr_schedule(&self, training_steps: u64) -> LrSchedule {
        LrSchedule {
            kind: self.lr_scheduler,
            base_lr: self.learning_rate,
            warmup_steps: self.lr_warmup_steps,
            training_steps,
        }
    }

    /// The clipping norm; zero is within the declared bounds but would zero every gradient.
    pub fn max_grad_norm(&self) -> Result<f64, StageError> {
        if self.max_grad_norm <= 0.0 {
            return Err(invalid(
                "max_grad_norm",
                "must be positive (torch would zero every gradient)",
            ));
        }
        Ok(self.max_grad_norm)
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.adam_weight_decay,
        }
    }
}

/// Where a kind's recipe is not [`Optimiser`]'s defaults: the UNet follows diffusers'
/// text-to-image script, the VAE its autoencoder script (and LDM).
pub struct OptimiserDefaults {
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta1_doc: &'static str,
    pub adam_beta2: f64,
}

impl OptimiserDefaults {
    /// `specs`, a kind's parameters with [`Optimiser`] among them, with these defaults.
    pub fn apply(&self, specs: Vec<ParamSpec>) -> Vec<ParamSpec> {
        let specs = with_default(specs, "learning_rate", json!(self.learning_rate));
        let specs = with_default(specs, "adam_beta2", json!(self.adam_beta2));
        let mut specs = with_default(specs, "adam_beta1", json!(self.adam_beta1));
        let beta1 = specs.iter_mut().find(|s| s.name == "adam_beta1").expect("adam_beta1");
        beta1.doc = self.adam_beta1_doc;
        specs
    }
}

/// `threads`, the last parameter of every training kind: what it asks the scheduler for before
/// it runs (it runs on what it is granted, `ctx.threads`).
#[derive(KindParams)]
pub struct Threads {
    /// CPU threads wanted.
    #[param(default = DEFAULT_THREADS, min = 1, max = 256)]
    threads: usize,
}

const DEFAULT_THREADS: usize = 4;

/// The threads the kind asks the scheduler for.
pub fn threads(params: &Params) -> usize {
    Threads::of_params(params).map_or(DEFAULT_THREADS, |t| t.threads)
}

/// Checks that every default of `kind` and every name its enum parameters take read into `T`,
/// its parameter struct: what the engine accepts, the kind runs with.
#[cfg(test)]
pub(crate) fn check_declared_values<T: KindParams>(kind: &dyn sdpipe_stages::StageKind) {
    use sdpipe_stages::api::ParamType;
    use sdpipe_stages::testing;

    if let Err(e) = T::of_params(&testing::params(kind, &[])) {
        panic!("{}'s defaults: {e}", kind.name());
    }
    for spec in T::specs() {
        let ParamType::Enum(names) = spec.ty else { continue };
        for name in names {
            if let Err(e) = T::of_params(&testing::params(kind, &[(spec.name, json!(name))])) {
                panic!("{}: `{}: {name}`: {e}", kind.name(), spec.name);
            }
        }
    }
}
