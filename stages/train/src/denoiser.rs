//! What the training loop needs from the model it trains: named trainable parameters in a
//! fixed order, and the loss with its gradients (with or without gradient checkpointing).
//!
//! The real model is sdpipe-unet's `UNet2DConditionModel`; the loop only sees this trait, so its
//! pieces can be tested with a model small enough to reason about.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// A trainable noise-prediction model.
pub trait Denoiser {
    /// The trainable parameters with their state-dict names, always in the same order.
    fn parameters(&self) -> Vec<(String, Var)>;

    /// Predicts from `sample` `(B, C, h, w)`, `timesteps` `(B,)` and `context` `(B, L, D)`,
    /// applies `loss_fn` to the prediction (a scalar) and returns the loss value and the
    /// gradient of that loss for each parameter of [`Denoiser::parameters`] (`None` when a
    /// parameter does not influence it), and with `context_grad` also its gradient with respect
    /// to `context`, shaped like it (what training the text encoder back-propagates).
    /// `checkpointing` recomputes activations in the backward pass instead of keeping them.
    fn loss_and_grads(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        checkpointing: bool,
        context_grad: bool,
        loss_fn: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(f32, Vec<Option<Tensor>>, Option<Tensor>)>;
}

/// Gradients from a `GradStore` in the order of `params`.
pub fn ordered_grads(params: &[(String, Var)], grads: &mut GradStore) -> Vec<Option<Tensor>> {
    params.iter().map(|(_, var)| grads.remove(var.as_tensor())).collect()
}

impl Denoiser for sdpipe_unet::UNet {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.vars().iter().map(|(name, var)| (name.clone(), var.clone())).collect()
    }

    fn loss_and_grads(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        checkpointing: bool,
        context_grad: bool,
        loss_fn: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(f32, Vec<Option<Tensor>>, Option<Tensor>)> {
        use sdpipe_unet::UNet;
        let (loss, mut grads, context_grad) = if context_grad {
            let (l, g, c) = UNet::loss_and_grads_with_context(
                self,
                sample,
                timesteps,
                context,
                checkpointing,
                loss_fn,
            )
            .map_err(candle_core::Error::wrap)?;
            (l, g, Some(c))
        } else {
            let (l, g) =
                UNet::loss_and_grads(self, sample, timesteps, context, checkpointing, loss_fn)
                    .map_err(candle_core::Error::wrap)?;
            (l, g, None)
        };
        let loss = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let params = Denoiser::parameters(self);
        Ok((loss, ordered_grads(&params, &mut grads), context_grad))
    }
}
