//! `UNet2DConditionModel`: construction from a config and weights, the forward pass, saving.
//!
//! The forward is described once, as a *plan*: a topologically ordered list of steps (time
//! embedding, `conv_in`, each resnet, each transformer, each down/upsampler, the output head),
//! each reading named activation slots and writing one. Running the plan with tracked tensors is
//! the ordinary differentiable forward; [`crate::checkpoint`] runs the same plan keeping only
//! slot values and recomputes each step in the backward. The plan also encodes the UNet's skip
//! connections: an up-block resnet reads the slot of the down-path activation diffusers would pop
//! from `down_block_res_samples`.
//!
//! One model serves training and sampling: [`UNet::from_pretrained`] builds it with trainable
//! parameters, [`UNet::for_inference`] with the same parameters detached (no graph is recorded,
//! so a sampling forward costs only the forward arithmetic), and [`UNet::predict`] frees each
//! activation as soon as its last reader has run. [`crate::lora`] builds the same model with
//! the base detached and trainable LoRA adapters, or with LoRA files merged into its weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::autocast::Autocast;
use crate::blocks::{
    timestep_embedding, Downsample2D, ResnetBlock2D, ResnetSettings, TimestepEmbedding,
    Transformer2D, TransformerSettings, Upsample2D,
};
use crate::config::{BlockKind, UNetConfig};
use crate::error::UNetError;
use crate::layers::{Conv2d, GroupNorm};
use crate::lora::LoraConfig;
use crate::params::{self, ParamBuilder};
use crate::pointwise;

/// Where a step's input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The noisy latents.
    Sample,
    /// The timesteps, shape `(B,)`.
    Timesteps,
    /// The encoder hidden states (text embeddings).
    Context,
    /// The output of an earlier step.
    Act(usize),
}

/// What a step computes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepOp {
    /// Sinusoidal projection + `time_embedding` MLP: `[Timesteps]`.
    TimeEmbedding,
    /// `conv_in`: `[Sample]`.
    ConvIn,
    /// A resnet: `[h, temb]`, or `[h, skip, temb]` in the up path (concatenated on channels).
    Resnet(usize),
    /// A transformer: `[h, Context]`.
    Transformer(usize),
    Downsample(usize),
    Upsample(usize),
    /// `conv_norm_out`, SiLU, `conv_out`: `[h]`.
    Out,
}

#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub op: StepOp,
    pub inputs: Vec<Slot>,
    /// Index of the activation slot this step writes.
    pub output: usize,
}

/// A Stable Diffusion `UNet2DConditionModel` whose parameters are trainable `Var`s named as in
/// diffusers' state dict.
pub struct UNet {
    config: UNetConfig,
    /// The config JSON as read, written back verbatim by [`UNet::save_pretrained`].
    config_json: Value,
    /// The trainable parameters: every weight, or the LoRA adapters alone when `lora` is set.
    vars: BTreeMap<String, Var>,
    /// The adapters' config for a model built by [`UNet::for_lora_training`].
    lora: Option<LoraConfig>,
    time_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    resnets: Vec<ResnetBlock2D>,
    transformers: Vec<Transformer2D>,
    downsamplers: Vec<Downsample2D>,
    upsamplers: Vec<Upsample2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    plan: Vec<Step>,
    /// For each activation slot, the index of the last plan step that reads it.
    last_reader: Vec<usize>,
    /// False for a model built by [`UNet::for_inference`]: its forward records no graph.
    /// (True with LoRA adapters: the graph then reaches only them.)
    trainable: bool,
    /// Shared with every layer: [`UNet::set_autocast`].
    autocast: Autocast,
    device: Device,
}

/// The autocast type of an inference model held in `dtype`: none for f32, the half type itself.
pub(crate) fn autocast_for_held(dtype: DType) -> Result<Option<DType>, UNetError> {
    match dtype {
        DType::F32 => Ok(None),
        DType::F16 | DType::BF16 => Ok(Some(dtype)),
        other => Err(UNetError::Input(format!(
            "an inference UNet is held in f32, f16 or bf16, not {other:?}"
        ))),
    }
}

impl std::fmt::Debug for UNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UNet")
            .field("config", &self.config)
            .field("parameters", &self.parameter_count())
            .field("trainable", &self.trainable)
            .field("lora", &self.lora)
            .finish()
    }
}

/// The modules and plan under construction.
struct Parts {
    resnets: Vec<ResnetBlock2D>,
    transformers: Vec<Transformer2D>,
    downsamplers: Vec<Downsample2D>,
    upsamplers: Vec<Upsample2D>,
    plan: Vec<Step>,
    next_slot: usize,
}

impl Parts {
    fn push(&mut self, op: StepOp, inputs: Vec<Slot>) -> Slot {
        let output = self.next_slot;
        self.next_slot += 1;
        self.plan.push(Step { op, inputs, output });
        Slot::Act(output)
    }

    /// A resnet `prefix` (weights from `pb`) applied to `inputs` (activation, [skip,] emb).
    fn resnet(
        &mut self,
        pb: &mut ParamBuilder,
        prefix: &str,
        channels: (usize, usize),
        settings: ResnetSettings,
        inputs: Vec<Slot>,
    ) -> Result<Slot, UNetError> {
        let block = ResnetBlock2D::new(pb, prefix, channels.0, channels.1, settings)?;
        self.resnets.push(block);
        Ok(self.push(StepOp::Resnet(self.resnets.len() - 1), inputs))
    }

    /// A transformer `prefix` applied to `h`, attending to the context.
    fn transformer(
        &mut self,
        pb: &mut ParamBuilder,
        prefix: &str,
        settings: TransformerSettings,
        h: Slot,
    ) -> Result<Slot, UNetError> {
        self.transformers.push(Transformer2D::new(pb, prefix, settings)?);
        Ok(self.push(StepOp::Transformer(self.transformers.len() - 1), vec![h, Slot::Context]))
    }
}

impl UNet {
    /// Loads a diffusers UNet folder: `config.json` + `diffusion_pytorch_model.safetensors`.
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self, UNetError> {
        let config_path = dir.join("config.json");
        let (config, json) = UNetConfig::read(&config_path)?;
        Self::from_safetensors(
            config,
            json,
            &dir.join("diffusion_pytorch_model.safetensors"),
            device,
        )
    }

    /// Builds the model for `config` with weights from a safetensors file in diffusers' naming.
    pub fn from_safetensors(
        config: UNetConfig,
        config_json: Value,
        weights: &Path,
        device: &Device,
    ) -> Result<Self, UNetError> {
        let pb = ParamBuilder::from_file(weights, device)?;
        pb.build_checked(|pb| Self::build(config.clone(), config_json.clone(), pb, device))
    }

    /// Loads a diffusers UNet for training: `config.json` from `dir` and the weights from
    /// `weights` (one safetensors file, the shards of a sharded checkpoint, or a `.bin`).
    pub fn from_files(dir: &Path, weights: &[PathBuf], device: &Device) -> Result<Self, UNetError> {
        Self::load(dir, weights, device, |pb| pb)
    }

    /// `config.json` from `dir`, the weights from `weights`, through a builder that `prepare`
    /// sets up (frozen, with LoRA work), checked against the headers before anything is read.
    pub(crate) fn load(
        dir: &Path,
        weights: &[PathBuf],
        device: &Device,
        prepare: impl FnOnce(ParamBuilder) -> ParamBuilder,
    ) -> Result<Self, UNetError> {
        let (config, json) = UNetConfig::read(&dir.join("config.json"))?;
        let pb = prepare(ParamBuilder::from_files(weights, device)?);
        pb.build_checked(|pb| Self::build(config.clone(), json.clone(), pb, device))
    }

    /// Loads a diffusers UNet for inference only (sampling): `config.json` from `dir` and the
    /// weights from `weights` (one file, or the shards of a sharded checkpoint), held in
    /// `dtype`: f32, or f16/bf16 as diffusers' `torch_dtype` holds them, and then computing
    /// under autocast in that type ([`UNet::set_autocast`]: norms in f32, the prediction
    /// returned in f32). The parameters are not trainable: the forward records no graph, and
    /// [`UNet::loss_and_grads`] refuses.
    pub fn for_inference(
        dir: &Path,
        weights: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, UNetError> {
        let autocast = autocast_for_held(dtype)?;
        let unet = Self::load(dir, weights, device, |pb| pb.frozen().held_in(dtype))?;
        unet.set_autocast(autocast)?;
        Ok(unet)
    }

    /// A randomly initialised model (torch's default initialisation), reproducible from `seed`.
    pub fn random(config: UNetConfig, seed: u64, device: &Device) -> Result<Self, UNetError> {
        let json = config.to_json();
        Self::build(config, json, ParamBuilder::random(seed, device), device)
    }

    fn build(
        config: UNetConfig,
        config_json: Value,
        mut builder: ParamBuilder,
        device: &Device,
    ) -> Result<Self, UNetError> {
        let c = &config;
        let n = c.block_out_channels.len();
        let temb = c.time_embed_dim();
        let settings = |scale: f64| ResnetSettings {
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor: scale,
        };
        let transformer = |i: usize, channels: usize| TransformerSettings {
            channels,
            heads: c.attention_heads[i],
            layers: c.transformer_layers_per_block[i],
            context_dim: c.cross_attention_dim[i],
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
        };
        let tracked = builder.is_tracked();
        let pb = &mut builder;

        let time_embedding =
            TimestepEmbedding::new(pb, "time_embedding", c.block_out_channels[0], temb)?;
        let conv_in = Conv2d::new(pb, "conv_in", c.in_channels, c.block_out_channels[0], 3, 1, 1)?;
        let mut parts = Parts {
            resnets: Vec::new(),
            transformers: Vec::new(),
            downsamplers: Vec::new(),
            upsamplers: Vec::new(),
            plan: Vec::new(),
            next_slot: 0,
        };
        let emb = parts.push(StepOp::TimeEmbedding, vec![Slot::Timesteps]);
        let mut h = parts.push(StepOp::ConvIn, vec![Slot::Sample]);
        // diffusers' `down_block_res_samples`: every activation the up path will concatenate.
        let mut skips = vec![(h, c.block_out_channels[0])];

        let mut channels = c.block_out_channels[0];
        for (i, kind) in c.down_blocks.iter().enumerate() {
            let out = c.block_out_channels[i];
            let prefix = format!("down_blocks.{i}");
            for j in 0..c.layers_per_block[i] {
                let inputs = if j == 0 { channels } else { out };
                let name = format!("{prefix}.resnets.{j}");
                h = parts.resnet(pb, &name, (inputs, out), settings(1.0), vec![h, emb])?;
                if *kind == BlockKind::CrossAttn {
                    let name = format!("{prefix}.attentions.{j}");
                    h = parts.transformer(pb, &name, transformer(i, out), h)?;
                }
                skips.push((h, out));
            }
            if i + 1 < n {
                let down = Downsample2D::new(
                    pb,
                    &format!("{prefix}.downsamplers.0"),
                    out,
                    c.downsample_padding,
                )?;
                parts.downsamplers.push(down);
                h = parts.push(StepOp::Downsample(parts.downsamplers.len() - 1), vec![h]);
                skips.push((h, out));
            }
            channels = out;
        }

        // Mid block: resnet, transformer, resnet.
        let mid = c.block_out_channels[n - 1];
        for j in 0..2 {
            let name = format!("mid_block.resnets.{j}");
            let scale = settings(c.mid_block_scale_factor);
            h = parts.resnet(pb, &name, (mid, mid), scale, vec![h, emb])?;
            if j == 0 {
                h = parts.transformer(pb, "mid_block.attentions.0", transformer(n - 1, mid), h)?;
            }
        }

        // Up blocks mirror the down path: block i has the settings of down block n-1-i.
        let mut prev_out = c.block_out_channels[n - 1];
        for (i, kind) in c.up_blocks.iter().enumerate() {
            let r = n - 1 - i;
            let out = c.block_out_channels[r];
            let prefix = format!("up_blocks.{i}");
            let layers = c.layers_per_block[r] + 1;
            for j in 0..layers {
                let (skip, skip_channels) = skips.pop().ok_or_else(|| {
                    UNetError::Input(
                        "the up path consumes more skip connections than the down path makes \
                     (layers_per_block mismatch)"
                            .into(),
                    )
                })?;
                let inputs = if j == 0 { prev_out } else { out };
                let name = format!("{prefix}.resnets.{j}");
                let channels = (inputs + skip_channels, out);
                h = parts.resnet(pb, &name, channels, settings(1.0), vec![h, skip, emb])?;
                if *kind == BlockKind::CrossAttn {
                    let name = format!("{prefix}.attentions.{j}");
                    h = parts.transformer(pb, &name, transformer(r, out), h)?;
                }
            }
            if i + 1 < n {
                let up = Upsample2D::new(pb, &format!("{prefix}.upsamplers.0"), out)?;
                parts.upsamplers.push(up);
                h = parts.push(StepOp::Upsample(parts.upsamplers.len() - 1), vec![h]);
            }
            prev_out = out;
        }
        let conv_norm_out = GroupNorm::new(
            pb,
            "conv_norm_out",
            c.norm_num_groups,
            c.block_out_channels[0],
            c.norm_eps,
        )?;
        let conv_out =
            Conv2d::new(pb, "conv_out", c.block_out_channels[0], c.out_channels, 3, 1, 1)?;
        parts.push(StepOp::Out, vec![h]);

        let Parts { resnets, transformers, downsamplers, upsamplers, plan, next_slot } = parts;
        let mut last_reader = vec![0; next_slot];
        for (index, step) in plan.iter().enumerate() {
            for slot in &step.inputs {
                if let Slot::Act(i) = slot {
                    last_reader[*i] = index;
                }
            }
        }
        let autocast = builder.autocast();
        let (vars, adapters) = builder.finish_with_lora()?;
        // A LoRA model trains its adapters only: the base weights' variables are dropped (the
        // modules hold their detached tensors).
        let (vars, lora, trainable) = match adapters {
            Some(adapters) => (adapters.vars, Some(adapters.config), true),
            None => (vars, None, tracked),
        };
        Ok(UNet {
            config,
            config_json,
            vars,
            lora,
            time_embedding,
            conv_in,
            resnets,
            transformers,
            downsamplers,
            upsamplers,
            conv_norm_out,
            conv_out,
            plan,
            last_reader,
            trainable,
            autocast,
            device: device.clone(),
        })
    }

    /// Computes in `dtype` (f16 or bf16) under autocast, as diffusers' `--mixed_precision`:
    /// the weights (and so the gradients, the optimiser state and what is saved) stay as they
    /// are, the products compute in `dtype`, the normalisations and the output in f32 (see
    /// [`crate::autocast`]). `None` (the default) computes in the weights' type.
    pub fn set_autocast(&self, dtype: Option<DType>) -> Result<(), UNetError> {
        Ok(self.autocast.set(dtype)?)
    }

    /// The autocast compute type, if on.
    pub fn autocast(&self) -> Option<DType> {
        self.autocast.dtype()
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the parameters are trainable (false for [`UNet::for_inference`]; true for
    /// [`UNet::for_lora_training`], whose adapters are).
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// The trainable parameters by diffusers state-dict name; for [`UNet::for_lora_training`]
    /// the adapters alone, by the keys [`UNet::save_lora`] writes (see [`crate::lora`]).
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The LoRA config of a model built by [`UNet::for_lora_training`].
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The total number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Writes `diffusion_pytorch_model.safetensors` (f32, diffusers names) to `path`. A model
    /// that trains LoRA adapters is refused: its adapters are saved with [`UNet::save_lora`].
    pub fn save(&self, path: &Path) -> Result<(), UNetError> {
        self.refuse_lora()?;
        params::save(&self.vars, path)
    }

    /// Saving the full weights of a LoRA-training model would write its adapters under the
    /// base's file name: refused before anything is written.
    fn refuse_lora(&self) -> Result<(), UNetError> {
        match self.lora {
            Some(_) => Err(UNetError::Input(
                "this UNet trains LoRA adapters over frozen weights: save them with \
                 UNet::save_lora"
                    .into(),
            )),
            None => Ok(()),
        }
    }

    /// Writes a diffusers UNet folder: `config.json` (as loaded) and the weights.
    pub fn save_pretrained(&self, dir: &Path) -> Result<(), UNetError> {
        self.refuse_lora()?;
        std::fs::create_dir_all(dir)
            .map_err(|source| UNetError::Io { path: dir.to_path_buf(), source })?;
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config_json).expect("JSON values serialise");
        std::fs::write(&config_path, text + "\n")
            .map_err(|source| UNetError::Io { path: config_path, source })?;
        self.save(&dir.join("diffusion_pytorch_model.safetensors"))
    }

    /// The plan; see the module docs.
    pub(crate) fn plan(&self) -> &[Step] {
        &self.plan
    }

    /// Checks the inputs and brings them to the shapes the plan expects: f32 sample
    /// `(B, C, H, W)`, f32 timesteps `(B,)` (a scalar or one value is broadcast), f32 context
    /// `(B, L, D)`.
    pub(crate) fn prepare_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<[Tensor; 3], UNetError> {
        let c = &self.config;
        let bad = |m: String| Err(UNetError::Input(m));
        let (b, ch, h, w) = match sample.dims4() {
            Ok(d) => d,
            Err(_) => {
                return bad(format!(
                    "the sample must be (batch, channels, height, width), got {:?}",
                    sample.dims()
                ))
            }
        };
        if ch != c.in_channels {
            return bad(format!("the sample has {ch} channels, the UNet takes {}", c.in_channels));
        }
        let factor = 1usize << c.downsamples();
        if h % factor != 0 || w % factor != 0 {
            return bad(format!(
                "the sample's height and width ({h}×{w}) must be multiples of {factor} \
                 (the UNet halves them {} times)",
                c.downsamples()
            ));
        }
        let timesteps = match timesteps.dims() {
            [] | [1] => timesteps.reshape(1)?.broadcast_as(b)?.contiguous()?,
            [n] if *n == b => timesteps.clone(),
            d => return bad(format!("timesteps must be a scalar or have shape ({b},), got {d:?}")),
        };
        let (cb, _, cd) = match context.dims3() {
            Ok(d) => d,
            Err(_) => {
                return bad(format!(
                    "encoder hidden states must be (batch, tokens, dim), got {:?}",
                    context.dims()
                ))
            }
        };
        if cb != b {
            return bad(format!("encoder hidden states have batch {cb}, the sample has {b}"));
        }
        // Widths the cross-attentions read: the mid block's and every cross-attention block's.
        let n = c.block_out_channels.len();
        let down = c.down_blocks.iter().enumerate().map(|(i, k)| (i, *k));
        let up = c.up_blocks.iter().enumerate().map(|(i, k)| (n - 1 - i, *k));
        let used = down.chain(up).filter(|(_, k)| *k == BlockKind::CrossAttn).map(|(i, _)| i);
        if let Some(i) = used.chain([n - 1]).find(|&i| c.cross_attention_dim[i] != cd) {
            return bad(format!(
                "encoder hidden states have width {cd}, the UNet's cross-attention expects {}",
                c.cross_attention_dim[i]
            ));
        }
        Ok([
            sample.to_dtype(DType::F32)?,
            timesteps.to_dtype(DType::F32)?,
            context.to_dtype(DType::F32)?,
        ])
    }

    /// Runs one step on its resolved inputs.
    pub(crate) fn run_step(&self, op: StepOp, inputs: &[Tensor]) -> candle_core::Result<Tensor> {
        match op {
            StepOp::TimeEmbedding => {
                let c = &self.config;
                let t_emb = timestep_embedding(
                    &inputs[0],
                    c.block_out_channels[0],
                    c.flip_sin_to_cos,
                    c.freq_shift,
                )?;
                self.time_embedding.forward(&t_emb)
            }
            StepOp::ConvIn => {
                if self.config.center_input_sample {
                    self.conv_in.forward(&((&inputs[0] * 2.0)? - 1.0)?)
                } else {
                    self.conv_in.forward(&inputs[0])
                }
            }
            StepOp::Resnet(i) => match inputs {
                [h, temb] => self.resnets[i].forward(h, temb),
                [h, skip, temb] => self.resnets[i].forward(&Tensor::cat(&[h, skip], 1)?, temb),
                _ => candle_core::bail!("resnet step with {} inputs", inputs.len()),
            },
            StepOp::Transformer(i) => self.transformers[i].forward(&inputs[0], &inputs[1]),
            StepOp::Downsample(i) => self.downsamplers[i].forward(&inputs[0]),
            StepOp::Upsample(i) => self.upsamplers[i].forward(&inputs[0]),
            StepOp::Out => {
                let out = self
                    .conv_out
                    .forward(&pointwise::silu(&self.conv_norm_out.forward(&inputs[0])?)?)?;
                // Under autocast the prediction comes back in f32 (the script's
                // `model_pred.float()`).
                self.autocast.full(&out)
            }
        }
    }

    /// The noise prediction for `sample` (`(B, C, H, W)`) at `timesteps` (`(B,)` or a scalar)
    /// given `encoder_hidden_states` (`(B, L, D)`). Differentiable with respect to
    /// [`UNet::vars`].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, UNetError> {
        let inputs = self.prepare_inputs(sample, timesteps, encoder_hidden_states)?;
        Ok(self.run_plan(&inputs, false)?)
    }

    /// The noise prediction without building a graph for the backward: each step's output is
    /// detached, so only one step's intermediates are alive at a time, and each activation is
    /// freed once its last reader has run (for evaluation and sampling). On a model built by
    /// [`UNet::for_inference`] no graph is recorded at all.
    pub fn predict(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, UNetError> {
        let inputs = self.prepare_inputs(sample, timesteps, encoder_hidden_states)?;
        Ok(self.run_plan(&inputs, true)?)
    }

    /// The time embedding `emb` for `timesteps` (diffusers' `time_embedding(time_proj(t))`).
    pub fn time_embedding(&self, timesteps: &Tensor) -> Result<Tensor, UNetError> {
        Ok(self.run_step(StepOp::TimeEmbedding, &[timesteps.to_dtype(DType::F32)?])?)
    }

    /// The sinusoidal projection `time_proj(t)` alone.
    pub fn time_proj(&self, timesteps: &Tensor) -> Result<Tensor, UNetError> {
        let c = &self.config;
        Ok(timestep_embedding(
            &timesteps.to_dtype(DType::F32)?,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
        )?)
    }

    /// Runs the plan on prepared inputs, dropping each activation after its last reader. With
    /// `detach`, every step output is detached, so only one step's graph is alive at a time and
    /// the result carries no graph.
    pub(crate) fn run_plan(
        &self,
        inputs: &[Tensor; 3],
        detach: bool,
    ) -> candle_core::Result<Tensor> {
        let mut acts: Vec<Option<Tensor>> = vec![None; self.last_reader.len()];
        for (index, step) in self.plan.iter().enumerate() {
            let args = step
                .inputs
                .iter()
                .map(|slot| resolve(*slot, inputs, &acts))
                .collect::<candle_core::Result<Vec<_>>>()?;
            for slot in &step.inputs {
                if let Slot::Act(i) = slot {
                    if self.last_reader[*i] == index {
                        acts[*i] = None;
                    }
                }
            }
            let out = self.run_step(step.op, &args)?;
            acts[step.output] = Some(if detach { out.detach() } else { out });
        }
        let last = self.plan.last().expect("the plan ends with the output step").output;
        Ok(acts[last].take().expect("the output step writes its slot"))
    }

    /// Like [`UNet::run_plan`] but returns every activation slot.
    pub(crate) fn run_plan_keep(
        &self,
        inputs: &[Tensor; 3],
        detach: bool,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut acts: Vec<Option<Tensor>> = vec![None; self.plan.len()];
        for step in &self.plan {
            let args = step
                .inputs
                .iter()
                .map(|slot| resolve(*slot, inputs, &acts))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let out = self.run_step(step.op, &args)?;
            acts[step.output] = Some(if detach { out.detach() } else { out });
        }
        Ok(acts)
    }
}

/// The tensor a slot names, given the model inputs `[sample, timesteps, context]`.
pub(crate) fn resolve(
    slot: Slot,
    inputs: &[Tensor; 3],
    acts: &[Option<Tensor>],
) -> candle_core::Result<Tensor> {
    match slot {
        Slot::Sample => Ok(inputs[0].clone()),
        Slot::Timesteps => Ok(inputs[1].clone()),
        Slot::Context => Ok(inputs[2].clone()),
        Slot::Act(i) => acts[i].clone().ok_or_else(|| {
            candle_core::Error::Msg(format!("activation {i} read before it is written"))
        }),
    }
}
