//! CLIP's text transformer (transformers' `CLIPTextModel`) with trainable parameters, for
//! training the text encoder together with the UNet (diffusers' `--train_text_encoder`).
//!
//! Frozen inference keeps candle-transformers' `ClipTextTransformer`; this is the same
//! computation over tracked tensors whose every op has a backward (candle's fused layer norm has
//! none): token + position embeddings, pre-norm blocks of causal self-attention and a
//! `quick_gelu` (or exact `gelu`) MLP, and the final layer norm, whose output (the last hidden
//! state) is what Stable Diffusion conditions on. Weights load from a pipeline's
//! `text_encoder/` files and save to `model.safetensors` under transformers' names, with or
//! without the `text_model.` prefix, as the files had them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::UNetError;
use crate::layers::{LayerNorm, Linear};
use crate::ops;
use crate::params::{self, Init, ParamBuilder};

/// The sizes the computation depends on: the fields of `text_encoder/config.json` (which
/// sdpipe-diffusion parses, with transformers' defaults) that shape the network.
#[derive(Debug, Clone)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP's) or `gelu` (exact).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// Every size within sdpipe's caps ([`crate::limits`]), so a lying config allocates
    /// nothing before the weights are read.
    fn validate(&self) -> Result<(), String> {
        use crate::limits::{MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB};
        let sizes = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_CHANNELS),
            ("intermediate_size", self.intermediate_size, 4 * MAX_CHANNELS),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_CHANNELS),
            ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
        ];
        for (name, value, max) in sizes {
            crate::limits::check(name, value, max)?;
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !["quick_gelu", "gelu"].contains(&self.hidden_act.as_str()) {
            return Err(format!("hidden_act `{}`: expected quick_gelu or gelu", self.hidden_act));
        }
        Ok(())
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A CLIP text encoder whose parameters are candle variables.
pub struct ClipText {
    config: ClipTextConfig,
    vars: BTreeMap<String, Var>,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipText {
    /// The encoder described by `config` with its weights from `files` (one safetensors or
    /// PyTorch file, or the shards of one state dict: a pipeline's `text_encoder/` weights).
    pub fn from_files(
        config: ClipTextConfig,
        files: &[PathBuf],
        device: &Device,
    ) -> Result<Self, UNetError> {
        let path = files.first().cloned().unwrap_or_default();
        config.validate().map_err(|message| UNetError::Weights { path, message })?;
        let mut pb = ParamBuilder::from_files(files, device)?.for_model("text encoder");
        let prefix = if pb.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        // A buffer older transformers versions saved with the weights; not a parameter.
        pb.discard(&format!("{prefix}embeddings.position_ids"));
        pb.build_checked(|pb| Self::build(config.clone(), pb, prefix))
    }

    /// A randomly initialised encoder (for tests).
    pub fn random(config: ClipTextConfig, seed: u64, device: &Device) -> Result<Self, UNetError> {
        config.validate().map_err(UNetError::Input)?;
        Self::build(config, ParamBuilder::random(seed, device), "text_model.")
    }

    fn build(config: ClipTextConfig, mut pb: ParamBuilder, p: &str) -> Result<Self, UNetError> {
        let c = &config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let embedding = Init::Uniform { fan_in: 1 };
        let token_embedding = pb.get(
            &format!("{p}embeddings.token_embedding.weight"),
            &[c.vocab_size, d],
            embedding,
        )?;
        let position_embedding = pb.get(
            &format!("{p}embeddings.position_embedding.weight"),
            &[c.max_position_embeddings, d],
            embedding,
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = format!("{p}encoder.layers.{i}");
            let pb = &mut pb;
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::new(pb, &format!("{l}.layer_norm1"), d, eps)?,
                q_proj: Linear::new(pb, &format!("{l}.self_attn.q_proj"), d, d, true)?,
                k_proj: Linear::new(pb, &format!("{l}.self_attn.k_proj"), d, d, true)?,
                v_proj: Linear::new(pb, &format!("{l}.self_attn.v_proj"), d, d, true)?,
                out_proj: Linear::new(pb, &format!("{l}.self_attn.out_proj"), d, d, true)?,
                layer_norm2: LayerNorm::new(pb, &format!("{l}.layer_norm2"), d, eps)?,
                fc1: Linear::new(pb, &format!("{l}.mlp.fc1"), d, c.intermediate_size, true)?,
                fc2: Linear::new(pb, &format!("{l}.mlp.fc2"), c.intermediate_size, d, true)?,
            });
        }
        let final_layer_norm = LayerNorm::new(&mut pb, &format!("{p}final_layer_norm"), d, eps)?;
        let vars = pb.finish()?;
        Ok(ClipText { config, vars, token_embedding, position_embedding, layers, final_layer_norm })
    }

    /// The trainable parameters under their state-dict names.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The last hidden state `(B, L, hidden)` for token ids `(B, L)` (u32).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let c = &self.config;
        if l > c.max_position_embeddings {
            candle_core::bail!(
                "{l} tokens, the text encoder takes at most {}",
                c.max_position_embeddings
            )
        }
        let d = c.hidden_size;
        let tokens =
            self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, d))?;
        let mut x = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?;
        let mask = causal_mask(l, x.device())?;
        for layer in &self.layers {
            x = (&x + self.attention(layer, &layer.layer_norm1.forward(&x)?, &mask)?)?;
            let h = layer.fc1.forward(&layer.layer_norm2.forward(&x)?)?;
            let h = match c.hidden_act.as_str() {
                "gelu" => h.gelu_erf()?,
                _ => (&h * candle_nn::ops::sigmoid(&h.affine(1.702, 0.0)?)?)?,
            };
            x = (&x + layer.fc2.forward(&h)?)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// Causal multi-head self-attention of `x` `(B, L, hidden)`.
    fn attention(
        &self,
        layer: &EncoderLayer,
        x: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let split = |t: Tensor| t.reshape((b, l, heads, d / heads))?.transpose(1, 2)?.contiguous();
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let q = split(layer.q_proj.forward(x)?.affine(scale, 0.0)?)?;
        let k = split(layer.k_proj.forward(x)?)?;
        let v = split(layer.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        layer.out_proj.forward(&out)
    }

    /// Writes `model.safetensors` (f32, the names it was loaded with) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), UNetError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| UNetError::Io { path: dir.to_path_buf(), source })?;
        params::save(&self.vars, &dir.join("model.safetensors"))
    }
}

/// `(L, L)`: 0 on and below the diagonal, −∞ above (a token sees itself and what precedes it).
fn causal_mask(l: usize, device: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (l, l), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;

    fn tiny() -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 12,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }

    fn ids() -> Tensor {
        Tensor::new(&[[1u32, 5, 9, 2, 39, 39], [1, 7, 7, 3, 2, 39]], &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_candle_transformers_clip_on_the_same_weights() {
        let dir = tempfile::tempdir().unwrap();
        let model = ClipText::random(tiny(), 3, &Device::Cpu).unwrap();
        model.save(dir.path()).unwrap();
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.path().join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        };
        let c = tiny();
        let reference = candle_transformers::models::clip::text_model::ClipTextTransformer::new(
            vb.pp("text_model"),
            &candle_transformers::models::clip::text_model::ClipTextConfig {
                vocab_size: c.vocab_size,
                embed_dim: c.hidden_size,
                activation: candle_transformers::models::clip::text_model::Activation::QuickGelu,
                intermediate_size: c.intermediate_size,
                max_position_embeddings: c.max_position_embeddings,
                pad_with: None,
                num_hidden_layers: c.num_hidden_layers,
                num_attention_heads: c.num_attention_heads,
                projection_dim: c.hidden_size,
            },
        )
        .unwrap();
        let want = reference.forward_with_mask(&ids(), usize::MAX).unwrap();
        let got = model.forward(&ids()).unwrap();
        let diff =
            (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let model = ClipText::random(tiny(), 4, &Device::Cpu).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 6, 16), &Device::Cpu).unwrap();
        let loss =
            |m: &ClipText| (m.forward(&ids()).unwrap() * &weights).unwrap().sum_all().unwrap();
        let mut grads: GradStore = loss(&model).backward().unwrap();
        let h = 1e-2f32;
        for name in [
            "text_model.encoder.layers.0.self_attn.k_proj.weight",
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.1.mlp.fc1.bias",
        ] {
            let var = &model.vars()[name];
            let analytic =
                grads.remove(var.as_tensor()).expect("a gradient").flatten_all().unwrap();
            let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let analytic = analytic.to_vec1::<f32>().unwrap();
            // The entries with the largest gradients, where the difference quotient is reliable.
            let mut order: Vec<usize> = (0..original.len()).collect();
            order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
            for &i in order.iter().take(3) {
                let at = |delta: f32| {
                    let mut values = original.clone();
                    values[i] += delta;
                    var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    loss(&model).to_scalar::<f32>().unwrap()
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let tolerance = 2e-2 * analytic[i].abs().max(1.0);
                assert!(
                    (numeric - analytic[i]).abs() < tolerance,
                    "{name}[{i}]: numeric {numeric}, analytic {}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn loads_what_it_saved_under_the_same_names() {
        let dir = tempfile::tempdir().unwrap();
        let model = ClipText::random(tiny(), 5, &Device::Cpu).unwrap();
        model.save(dir.path()).unwrap();
        let files = [dir.path().join("model.safetensors")];
        let loaded = ClipText::from_files(tiny(), &files, &Device::Cpu).unwrap();
        assert_eq!(
            loaded.vars().keys().collect::<Vec<_>>(),
            model.vars().keys().collect::<Vec<_>>()
        );
        let same = (loaded.forward(&ids()).unwrap() - model.forward(&ids()).unwrap()).unwrap();
        assert_eq!(same.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn refuses_a_config_that_claims_absurd_sizes() {
        let config = ClipTextConfig { hidden_size: 1_000_000_000, ..tiny() };
        let files = [PathBuf::from("model.safetensors")];
        let error = ClipText::from_files(config, &files, &Device::Cpu).err().expect("refused");
        assert!(error.to_string().contains("hidden_size"), "{error}");
    }

    #[test]
    fn weights_that_disagree_with_the_config_are_named_from_their_header() {
        let dir = tempfile::tempdir().unwrap();
        ClipText::random(tiny(), 5, &Device::Cpu).unwrap().save(dir.path()).unwrap();
        let files = [dir.path().join("model.safetensors")];
        let config = ClipTextConfig { vocab_size: 900_000, ..tiny() };
        let error = ClipText::from_files(config, &files, &Device::Cpu).err().expect("refused");
        let error = error.to_string();
        assert!(error.contains("do not match the text encoder"), "{error}");
        assert!(error.contains("token_embedding.weight` has shape [40, 16]"), "{error}");
    }
}
