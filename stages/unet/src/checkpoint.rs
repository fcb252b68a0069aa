//! The training entry point: a loss and the gradients of every UNet parameter (and, when the
//! text encoder is trained too, of the encoder hidden states), computed either by one ordinary
//! backward pass or with gradient checkpointing.
//!
//! With checkpointing, the forward runs the UNet's plan (see [`crate::unet`]) keeping only each
//! step's output, detached: the graph of one step (its norms, attention scores, GEGLU
//! intermediates, ...) is freed as soon as the step is done. The backward then walks the plan in
//! reverse. For each step it turns the saved inputs into fresh variables, recomputes the step's
//! forward, and back-propagates the gradient arriving at the step's output with the
//! vector-Jacobian identity `∂/∂θ Σ(out ⊙ g) = gᵀ ∂out/∂θ` (g held constant). That yields the
//! step's parameter gradients (accumulated into one store) and the gradients of its inputs, which
//! are added to the gradients of the slots that produced them. Slots with several consumers —
//! the time embedding read by every resnet, the skip connections read by the up path — so
//! collect every contribution before their producer is processed, because the plan is in
//! topological order. Every gradient is detached before reuse: candle's backward builds graphs of
//! its own when an op's input is a variable (here: the leaves), and a gradient carrying such a
//! graph would both pin memory and, multiplied into the next surrogate, leak spurious terms into
//! other parameters' gradients. Peak memory is the saved slot values plus one step's graph, instead of the
//! whole network's graph; the price is a second forward of every step.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::UNetError;
use crate::unet::{resolve, Slot, UNet};

/// Adds `grad` to the gradient stored for `tensor`.
fn accumulate(store: &mut GradStore, tensor: &Tensor, grad: Tensor) -> candle_core::Result<()> {
    let total = match store.remove(tensor) {
        Some(previous) => (previous + grad)?,
        None => grad,
    };
    store.insert(tensor, total);
    Ok(())
}

impl UNet {
    /// Runs the UNet on `sample`, `timesteps` and `encoder_hidden_states`, applies `loss_fn` to
    /// its prediction (it must return a scalar) and returns the loss (detached) with the
    /// gradients of the loss with respect to every parameter in [`UNet::vars`], keyed by the
    /// parameters' tensors (so the store works with candle's optimisers).
    ///
    /// `checkpointing` trades compute for memory as described in the module docs; the gradients
    /// are the same either way up to float rounding. A model built by [`UNet::for_inference`]
    /// has no trainable parameters and is refused.
    pub fn loss_and_grads<F>(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        checkpointing: bool,
        loss_fn: F,
    ) -> Result<(Tensor, GradStore), UNetError>
    where
        F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    {
        let pass = self.pass(sample, timesteps, encoder_hidden_states, checkpointing, false)?;
        let (loss, grads, _) = pass.run(loss_fn)?;
        Ok((loss, grads))
    }

    /// [`UNet::loss_and_grads`], and also the gradient of the loss with respect to
    /// `encoder_hidden_states`, for training the text encoder that produced them: its own
    /// parameters' gradients follow from back-propagating this one through it.
    pub fn loss_and_grads_with_context<F>(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        checkpointing: bool,
        loss_fn: F,
    ) -> Result<(Tensor, GradStore, Tensor), UNetError>
    where
        F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    {
        let pass = self.pass(sample, timesteps, encoder_hidden_states, checkpointing, true)?;
        let (loss, grads, context) = pass.run(loss_fn)?;
        let context = match context {
            Some(g) => g,
            // Only a UNet without cross-attention ignores its context.
            None => encoder_hidden_states.detach().zeros_like()?,
        };
        Ok((loss, grads, context))
    }

    fn pass(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        checkpointing: bool,
        context_grad: bool,
    ) -> Result<Pass<'_>, UNetError> {
        if !self.is_trainable() {
            return Err(UNetError::Input(
                "this UNet was loaded for inference (UNet::for_inference); load it with \
                 UNet::from_pretrained to train it"
                    .into(),
            ));
        }
        let inputs = self.prepare_inputs(sample, timesteps, encoder_hidden_states)?;
        // The inputs are data here: gradients flow to parameters (and, when asked, to the
        // context through a variable standing in for it).
        let mut inputs = inputs.map(|t| t.detach());
        let context = if context_grad {
            let var = Var::from_tensor(&inputs[2])?;
            inputs[2] = var.as_tensor().clone();
            Some(var)
        } else {
            None
        };
        Ok(Pass { unet: self, inputs, context, checkpointing })
    }
}

/// One training pass's inputs; `context` is the variable of the encoder hidden states when
/// their gradient is wanted.
struct Pass<'a> {
    unet: &'a UNet,
    inputs: [Tensor; 3],
    context: Option<Var>,
    checkpointing: bool,
}

type PassResult = (Tensor, GradStore, Option<Tensor>);

impl Pass<'_> {
    fn run<F>(self, loss_fn: F) -> Result<PassResult, UNetError>
    where
        F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    {
        if self.checkpointing {
            self.unet.checkpointed(&self.inputs, self.context.as_ref(), loss_fn)
        } else {
            self.unet.plain(&self.inputs, self.context.as_ref(), loss_fn)
        }
    }
}

impl UNet {
    fn plain<F>(
        &self,
        inputs: &[Tensor; 3],
        context: Option<&Var>,
        loss_fn: F,
    ) -> Result<PassResult, UNetError>
    where
        F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    {
        let out = self.run_plan(inputs, false)?;
        let loss = scalar_loss(loss_fn(&out)?)?;
        let mut all = loss.backward()?;
        let mut grads = GradStore::default();
        for var in self.vars().values() {
            if let Some(g) = all.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), g.detach());
            }
        }
        let context = context.and_then(|c| all.remove(c.as_tensor())).map(|g| g.detach());
        Ok((loss.detach(), grads, context))
    }

    fn checkpointed<F>(
        &self,
        inputs: &[Tensor; 3],
        context: Option<&Var>,
        loss_fn: F,
    ) -> Result<PassResult, UNetError>
    where
        F: Fn(&Tensor) -> candle_core::Result<Tensor>,
    {
        let plan = self.plan();
        let mut acts = self.run_plan_keep(inputs, true)?;
        let last = plan.last().expect("the plan is never empty").output;

        // The loss's own graph is small: back-propagate it to the prediction directly.
        let prediction =
            Var::from_tensor(acts[last].as_ref().expect("the output slot is written"))?;
        let loss = scalar_loss(loss_fn(prediction.as_tensor())?)?;
        let g_out =
            loss.backward()?.remove(prediction.as_tensor()).map(|g| g.detach()).ok_or_else(
                || UNetError::Input("the loss does not depend on the UNet's prediction".into()),
            )?;
        drop(prediction);

        let mut act_grads: Vec<Option<Tensor>> = vec![None; acts.len()];
        act_grads[last] = Some(g_out);
        let mut grads = GradStore::default();
        let mut context_grad: Option<Tensor> = None;
        for step in plan.iter().rev() {
            // Nothing reached this step's output (cannot happen for a connected plan): skip it.
            let Some(g) = act_grads[step.output].take().map(|g| g.detach()) else {
                acts[step.output] = None;
                continue;
            };
            let mut leaves: Vec<(usize, Var)> = Vec::new();
            let mut args = Vec::with_capacity(step.inputs.len());
            for slot in &step.inputs {
                match *slot {
                    Slot::Act(i) => {
                        let leaf = Var::from_tensor(&resolve(*slot, inputs, &acts)?)?;
                        args.push(leaf.as_tensor().clone());
                        leaves.push((i, leaf));
                    }
                    other => args.push(resolve(other, inputs, &acts)?),
                }
            }
            let out = self.run_step(step.op, &args)?;
            drop(args);
            let mut step_grads = (out * g)?.sum_all()?.backward()?;
            for (i, leaf) in leaves {
                if let Some(gi) = step_grads.remove(leaf.as_tensor()).map(|g| g.detach()) {
                    act_grads[i] = Some(match act_grads[i].take() {
                        Some(previous) => (previous + gi)?,
                        None => gi,
                    });
                }
            }
            for var in self.vars().values() {
                if let Some(gp) = step_grads.remove(var.as_tensor()) {
                    accumulate(&mut grads, var.as_tensor(), gp.detach())?;
                }
            }
            // Every step reading the context recomputed it from the one variable, so its
            // gradient contributions land on that variable and are summed here.
            if let Some(gc) = context.and_then(|c| step_grads.remove(c.as_tensor())) {
                context_grad = Some(match context_grad.take() {
                    Some(previous) => (previous + gc.detach())?,
                    None => gc.detach(),
                });
            }
            // Every consumer of this step's output came later in the plan and is done.
            acts[step.output] = None;
        }
        Ok((loss.detach(), grads, context_grad))
    }
}

fn scalar_loss(loss: Tensor) -> Result<Tensor, UNetError> {
    if loss.elem_count() != 1 {
        return Err(UNetError::Input(format!(
            "the loss function must return a scalar, got shape {:?}",
            loss.dims()
        )));
    }
    Ok(loss.reshape(())?)
}
