//! A diffusers Stable Diffusion 1.x pipeline folder: its configs, its weight files, and the
//! candle modules loaded from them.
//!
//! The folder is the one `StableDiffusionPipeline.save_pretrained` writes (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; `safety_checker/` and
//! `feature_extractor/` are ignored). The UNet is sdpipe-unet's (the model training uses, with
//! diffusers' exact GELU), loaded for inference; the text encoder and the VAE are
//! candle-transformers' (their activations, quick-GELU and SiLU, are exact there). This module
//! owns the mapping from diffusers' configs to candle-transformers' module configs, and refuses
//! — naming the key — configs whose architecture those modules cannot express, instead of
//! loading a different model.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use sdpipe_stages::api::{Fetch, ParamType};
use sdpipe_stages::params::ParamValue;
use serde_json::Value;

use crate::clip_tokenizer::ClipTokenizer;
use crate::config::{
    read_json, ModelIndex, SchedulerConfig, TextEncoderConfig, UNetConfig, VaeConfig,
};
use crate::error::PipelineError;

pub const MODEL_INDEX: &str = "model_index.json";
/// The tokenizer files sdpipe reads: SD1.x ships `vocab.json` + `merges.txt`, transformers 5
/// writes `tokenizer.json` alone; either is enough (see [`crate::clip_tokenizer`]).
pub const TOKENIZER_FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The components whose weights sdpipe loads.
pub const WEIGHT_COMPONENTS: [&str; 3] = ["unet", "vae", "text_encoder"];

/// The names a component's weights can have, in the order diffusers prefers them: one
/// safetensors file, a sharded safetensors checkpoint (its index names the shards), a PyTorch
/// pickle. With a `variant` (diffusers' `variant="fp16"`) the variant's files only, named as
/// diffusers' `_add_variant` names them (`diffusion_pytorch_model.fp16.safetensors`,
/// `diffusion_pytorch_model.safetensors.index.fp16.json`, `diffusion_pytorch_model.fp16.bin`);
/// the text encoder follows transformers (`model…safetensors`, `pytorch_model….bin`).
pub fn weight_names(component: &str, variant: Option<&str>) -> [String; 3] {
    let (stem, bin_stem) = if component == "text_encoder" {
        ("model", "pytorch_model")
    } else {
        ("diffusion_pytorch_model", "diffusion_pytorch_model")
    };
    let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
    [
        format!("{stem}{v}.safetensors"),
        format!("{stem}.safetensors.index{v}.json"),
        format!("{bin_stem}{v}.bin"),
    ]
}

/// A `variant` as a pipeline may name it: a short name that becomes part of file names.
pub fn check_variant(variant: &str) -> Result<(), String> {
    let ok = !variant.is_empty()
        && variant.len() <= 32
        && variant.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{variant}` is not a weight variant name (diffusers' are like `fp16`, `bf16`, `ema`: \
             letters, digits, `_` and `-`)"
        ))
    }
}

/// A `variant` parameter's value as a typed parameter field (`Option<Variant>`, default
/// null): read only when [`check_variant`] accepts it, so an invalid name is refused naming
/// the parameter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Variant(String);

impl Variant {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Variant {
    type Error = String;
    fn try_from(variant: String) -> Result<Variant, String> {
        check_variant(&variant)?;
        Ok(Variant(variant))
    }
}

impl ParamValue for Variant {
    fn param_type() -> ParamType {
        ParamType::String
    }
}

/// Resolve `model` (a hub repo id or a local folder) at `revision` to a local pipeline folder
/// holding every file the loaders read — local folder, Hugging Face cache, then the hub — so
/// every stage that loads a pipeline sees the same files. `variant` picks diffusers' weight
/// variant (see [`weight_names`]). A sharded checkpoint takes two passes: the first finds its
/// index, the second fetches the shards the index lists. Under [`Fetch::LocalOnly`] nothing is
/// downloaded ([`sdpipe_hub::resolve_local`]).
pub fn resolve_folder(
    hub: &sdpipe_hub::HubConfig,
    model: &str,
    revision: &str,
    variant: Option<&str>,
    fetch: Fetch,
) -> Result<PathBuf, PipelineError> {
    let resolve = |wants: &[sdpipe_hub::Want<'_>]| {
        sdpipe_stages::model_fetch::resolve(hub, model, revision, wants, fetch)
    };
    let names: Vec<[String; 3]> = WEIGHT_COMPONENTS
        .iter()
        .map(|c| weight_names(c, variant).map(|name| format!("{c}/{name}")))
        .collect();
    let alternatives: Vec<Vec<&str>> =
        names.iter().map(|n| n.iter().map(String::as_str).collect()).collect();
    let mut wants = wanted_files();
    wants.extend(alternatives.iter().map(|a| sdpipe_hub::Want::OneOf(a)));
    let resolved = resolve(&wants)?;
    let mut shards = Vec::new();
    for (component, [_, index, _]) in WEIGHT_COMPONENTS.iter().zip(&names) {
        if let Some(path) = resolved.files.get(index) {
            for shard in shard_names(path)? {
                shards.push(format!("{component}/{shard}"));
            }
        }
    }
    if shards.is_empty() {
        return Ok(resolved.root);
    }
    wants.extend(shards.iter().map(|s| sdpipe_hub::Want::File(s)));
    Ok(resolve(&wants)?.root)
}

/// What [`resolve_folder`] asks of every model besides the weights: [`required_files`], the
/// tokenizer's vocabulary in either layout, and the optional tokenizer files.
fn wanted_files() -> Vec<sdpipe_hub::Want<'static>> {
    use sdpipe_hub::Want;
    let mut wants: Vec<Want<'static>> = required_files().into_iter().map(Want::File).collect();
    // The separate files first: a repo that has both was saved from them, and a tokenizer.json
    // beside them is derived. `merges.txt` is checked with the vocabulary when loading.
    wants.push(Want::OneOf(&["tokenizer/vocab.json", "tokenizer/tokenizer.json"]));
    wants.push(Want::Optional("tokenizer/merges.txt"));
    wants.push(Want::Optional("tokenizer/special_tokens_map.json"));
    wants
}

/// The shard file names a `*.safetensors.index*.json` lists (its `weight_map` values), sorted.
fn shard_names(index: &Path) -> Result<Vec<String>, PipelineError> {
    let value: Value = read_json(index)?;
    let bad = |message: &str| PipelineError::BadConfig {
        path: index.to_path_buf(),
        message: message.into(),
    };
    let map =
        value.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no `weight_map`"))?;
    let mut shards = Vec::new();
    for name in map.values() {
        let name = name.as_str().ok_or_else(|| bad("a `weight_map` value is not a file name"))?;
        // A shard is a file beside the index: anything else would read outside the component.
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            return Err(bad(&format!("shard `{name}` is not a file name in the index's folder")));
        }
        shards.push(name.to_string());
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// A pipeline folder's content as a kind's `external_deps`: `model/<relative path>` → file.
pub fn model_deps(
    root: &Path,
    variant: Option<&str>,
) -> Result<BTreeMap<String, PathBuf>, PipelineError> {
    Ok(SdPipeline::open_variant(root, variant)?
        .dependency_files()?
        .into_iter()
        .map(|(rel, path)| (format!("model/{rel}"), path))
        .collect())
}

/// The configs every pipeline folder has, relative to its root (the weights' names depend on
/// the layout and the variant: see [`weight_names`]; the tokenizer's vocabulary comes in two
/// layouts: see [`resolve_folder`]).
pub fn required_files() -> Vec<&'static str> {
    vec![
        MODEL_INDEX,
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ]
}

/// An opened pipeline folder: parsed configs; weights are loaded on demand.
#[derive(Debug, Clone)]
pub struct SdPipeline {
    pub root: PathBuf,
    pub model_index: ModelIndex,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: TextEncoderConfig,
    pub scheduler: SchedulerConfig,
    /// diffusers' weight variant to read (`fp16` reads `*.fp16.safetensors`), if any.
    pub variant: Option<String>,
}

/// The weight files a pipeline reads for one component.
struct ComponentWeights {
    /// One file, or the shards of a sharded checkpoint.
    files: Vec<PathBuf>,
    /// The shard index `files` came from, for a sharded checkpoint.
    index: Option<PathBuf>,
}

/// The CLIP text encoder; `encode` returns the last hidden state, what SD conditions on.
pub struct TextEncoder {
    model: ClipTextTransformer,
}

impl TextEncoder {
    /// `ids`: (batch, 77) u32 token ids → (batch, 77, hidden) embeddings.
    pub fn encode(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.model.forward_with_mask(ids, usize::MAX)
    }
}

impl SdPipeline {
    /// Open `root` and parse its configs. Fails with the file and the fix when something is
    /// missing or not an SD1.x pipeline.
    pub fn open(root: &Path) -> Result<SdPipeline, PipelineError> {
        Self::open_variant(root, None)
    }

    /// [`SdPipeline::open`], reading the weights of `variant` (see [`weight_names`]).
    pub fn open_variant(root: &Path, variant: Option<&str>) -> Result<SdPipeline, PipelineError> {
        if !root.is_dir() {
            return Err(PipelineError::Missing {
                path: root.to_path_buf(),
                hint: "expected a diffusers Stable Diffusion pipeline folder".into(),
            });
        }
        let index_path = root.join(MODEL_INDEX);
        require(&index_path, "every diffusers pipeline folder has one at its root")?;
        let model_index = ModelIndex::from_value(read_json::<Value>(&index_path)?)
            .map_err(|message| PipelineError::BadConfig { path: index_path.clone(), message })?;
        for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !model_index.has(part) {
                return Err(PipelineError::Unsupported {
                    path: index_path.clone(),
                    message: format!("no `{part}` component"),
                });
            }
        }
        let config = |dir: &str, file: &str| -> Result<PathBuf, PipelineError> {
            let path = root.join(dir).join(file);
            require(&path, &format!("the `{dir}` component's config"))?;
            Ok(path)
        };
        let pipeline = SdPipeline {
            root: root.to_path_buf(),
            unet: read_json(&config("unet", "config.json")?)?,
            vae: read_json(&config("vae", "config.json")?)?,
            text_encoder: read_json(&config("text_encoder", "config.json")?)?,
            scheduler: read_json(&config("scheduler", "scheduler_config.json")?)?,
            model_index,
            variant: variant.map(str::to_string),
        };
        pipeline.check_sizes()?;
        Ok(pipeline)
    }

    /// Every size the configs name within sdpipe's caps, and the tokenizer files of a sane
    /// size, so that a hostile folder is refused here (before a stage hashes its files or
    /// loads anything) with the file and the key.
    fn check_sizes(&self) -> Result<(), PipelineError> {
        let bad = |file: &str, message: String| PipelineError::BadConfig {
            path: self.root.join(file),
            message,
        };
        self.unet.check_sizes().map_err(|m| bad("unet/config.json", m))?;
        self.vae.check_sizes().map_err(|m| bad("vae/config.json", m))?;
        self.text_encoder.check_sizes().map_err(|m| bad("text_encoder/config.json", m))?;
        self.scheduler.check_sizes().map_err(|m| bad("scheduler/scheduler_config.json", m))?;
        for file in TOKENIZER_FILES {
            let path = self.root.join("tokenizer").join(file);
            if path.is_file() {
                crate::config::check_file_size(&path, crate::config::MAX_TOKENIZER_BYTES)?;
            }
        }
        Ok(())
    }

    /// Pixels per latent (8 for SD1.x).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// The weight files of a component (`unet`, `vae`, `text_encoder`): one safetensors file,
    /// the shards its index lists, or one PyTorch pickle, as [`weight_names`] orders them.
    pub fn weight_files(&self, component: &str) -> Result<Vec<PathBuf>, PipelineError> {
        Ok(self.weights(component)?.files)
    }

    /// Which of a component's weight files this pipeline reads (see
    /// [`SdPipeline::weight_files`]), with the shard index they came from.
    fn weights(&self, component: &str) -> Result<ComponentWeights, PipelineError> {
        let dir = self.root.join(component);
        let [single, index, bin] = weight_names(component, self.variant.as_deref());
        if dir.join(&single).is_file() {
            return Ok(ComponentWeights { files: vec![dir.join(single)], index: None });
        }
        let index = dir.join(index);
        if index.is_file() {
            let shards: Vec<PathBuf> =
                shard_names(&index)?.into_iter().map(|s| dir.join(s)).collect();
            for shard in &shards {
                require(shard, "listed in the shard index")?;
            }
            return Ok(ComponentWeights { files: shards, index: Some(index) });
        }
        if dir.join(&bin).is_file() {
            return Ok(ComponentWeights { files: vec![dir.join(bin)], index: None });
        }
        let hint = match &self.variant {
            Some(v) => format!(
                "the `{component}` weights of variant `{v}` ({single}, a sharded {single} or \
                 {bin}) are needed; leave `variant` unset to read the default weights"
            ),
            None => format!(
                "the `{component}` weights ({single}, a sharded {single} or {bin}) are needed"
            ),
        };
        Err(PipelineError::Missing { path: dir.join(single), hint })
    }

    /// Every file sampling reads, keyed by its path relative to the root: a stage's
    /// `external_deps` when the model comes from outside the pipeline.
    pub fn dependency_files(&self) -> Result<BTreeMap<String, PathBuf>, PipelineError> {
        let mut files = BTreeMap::new();
        let mut add = |path: PathBuf| {
            let rel = path.strip_prefix(&self.root).unwrap_or(&path).to_string_lossy().to_string();
            files.insert(rel, path);
        };
        add(self.root.join(MODEL_INDEX));
        for (dir, file) in [
            ("unet", "config.json"),
            ("vae", "config.json"),
            ("text_encoder", "config.json"),
            ("scheduler", "scheduler_config.json"),
        ] {
            add(self.root.join(dir).join(file));
        }
        for component in WEIGHT_COMPONENTS {
            let weights = self.weights(component)?;
            weights.files.into_iter().chain(weights.index).for_each(&mut add);
        }
        for file in TOKENIZER_FILES {
            let path = self.root.join("tokenizer").join(file);
            if path.is_file() {
                add(path);
            }
        }
        Ok(files)
    }

    /// candle-transformers' UNet config for this folder's `unet/config.json`. Sampling runs
    /// sdpipe-unet ([`SdPipeline::load_unet`]); this mapping serves [`crate::tiny`], which lays
    /// out random weights with candle's module, and comparisons against it.
    pub fn candle_unet_config(&self) -> Result<UNet2DConditionModelConfig, PipelineError> {
        unet_to_candle(&self.unet).map_err(|message| PipelineError::Unsupported {
            path: self.root.join("unet/config.json"),
            message,
        })
    }

    /// candle's VAE config for this folder's `vae/config.json`.
    pub fn candle_vae_config(&self) -> Result<AutoEncoderKLConfig, PipelineError> {
        vae_to_candle(&self.vae).map_err(|message| PipelineError::Unsupported {
            path: self.root.join("vae/config.json"),
            message,
        })
    }

    /// candle's CLIP text config for this folder's `text_encoder/config.json`.
    pub fn candle_clip_config(&self) -> Result<ClipTextConfig, PipelineError> {
        clip_to_candle(&self.text_encoder).map_err(|message| PipelineError::Unsupported {
            path: self.root.join("text_encoder/config.json"),
            message,
        })
    }

    /// The UNet for sampling: sdpipe-unet's model (the one training runs) with detached
    /// parameters, held in `dtype`. With f16 or bf16 it computes under autocast in that type
    /// (`sdpipe_unet::UNet::for_inference`; its prediction comes back in f32).
    pub fn load_unet(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<sdpipe_unet::UNet, PipelineError> {
        let files = self.weight_files("unet")?;
        sdpipe_unet::UNet::for_inference(&self.root.join("unet"), &files, dtype, device)
            .map_err(|e| PipelineError::UNet(e.to_string()))
    }

    /// [`SdPipeline::load_unet`] with each LoRA file merged into the weights it targets at its
    /// scale (diffusers' `fuse_lora(lora_scale)`): `W + scale·(alpha/rank)·B·A`, see
    /// [`sdpipe_unet::lora`]. Every LoRA layer is checked against the weight it targets from
    /// the headers alone, so a LoRA for another architecture is refused (naming its layers)
    /// before any weight is read. With no LoRA this is [`SdPipeline::load_unet`].
    pub fn load_unet_with_lora(
        &self,
        device: &Device,
        dtype: DType,
        loras: &[(&sdpipe_unet::LoraFile, f64)],
    ) -> Result<sdpipe_unet::UNet, PipelineError> {
        if loras.is_empty() {
            return self.load_unet(device, dtype);
        }
        let files = self.weight_files("unet")?;
        sdpipe_unet::UNet::for_inference_with_lora(
            &self.root.join("unet"),
            &files,
            loras,
            dtype,
            device,
        )
        .map_err(|e| PipelineError::UNet(e.to_string()))
    }

    /// The VAE in `dtype`; it computes in [`vae_compute_dtype`] (f32 for bf16 on the CPU), the
    /// dtype its input must have.
    pub fn load_vae(&self, device: &Device, dtype: DType) -> Result<AutoEncoderKL, PipelineError> {
        let config = self.candle_vae_config()?;
        let files = self.weight_files("vae")?;
        let weights = weight_headers(&files)?;
        vae_agrees_with(&self.vae, &weights).map_err(|message| PipelineError::ConfigDisagrees {
            config: self.root.join("vae/config.json"),
            weights: files[0].clone(),
            message,
        })?;
        let (vb, _) = vae_var_builder(&files, dtype, device)?;
        AutoEncoderKL::new(vb, self.vae.in_channels, self.vae.out_channels, config)
            .map_err(|source| PipelineError::Weights { path: files[0].clone(), source })
    }

    /// The text encoder. Reads both layouts: transformers 4 (and the published SD1.5 files)
    /// prefix every tensor with `text_model.`, transformers 5 saves without the prefix.
    pub fn load_text_encoder(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<TextEncoder, PipelineError> {
        let config = self.candle_clip_config()?;
        let files = self.weight_files("text_encoder")?;
        self.check_text_encoder_weights(&files)?;
        let vb = var_builder(&files, dtype, device)?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let model = ClipTextTransformer::new(vb, &config)
            .map_err(|source| PipelineError::Weights { path: files[0].clone(), source })?;
        Ok(TextEncoder { model })
    }

    /// The text encoder with trainable parameters (`train_text_encoder`): the same files and
    /// config as [`SdPipeline::load_text_encoder`], passing the same support checks.
    pub fn load_trainable_text_encoder(
        &self,
        device: &Device,
    ) -> Result<sdpipe_unet::ClipText, PipelineError> {
        self.candle_clip_config()?;
        let c = &self.text_encoder;
        let config = sdpipe_unet::clip_text::ClipTextConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            max_position_embeddings: c.max_position_embeddings,
            hidden_act: c.hidden_act.clone(),
            layer_norm_eps: c.layer_norm_eps,
        };
        let files = self.weight_files("text_encoder")?;
        self.check_text_encoder_weights(&files)?;
        sdpipe_unet::ClipText::from_files(config, &files, device)
            .map_err(|e| PipelineError::TrainableTextEncoder(e.to_string()))
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer, PipelineError> {
        ClipTokenizer::from_dir(&self.root.join("tokenizer"))
    }

    /// The text encoder's weights (`files`) hold the shapes its config implies, read from
    /// their headers (see [`text_encoder_agrees_with`]).
    fn check_text_encoder_weights(&self, files: &[PathBuf]) -> Result<(), PipelineError> {
        let weights = weight_headers(files)?;
        text_encoder_agrees_with(&self.text_encoder, &weights).map_err(|message| {
            PipelineError::ConfigDisagrees {
                config: self.root.join("text_encoder/config.json"),
                weights: files[0].clone(),
                message,
            }
        })
    }

    /// Whether the tokenizer's ids and lengths fit the text encoder: at most
    /// `max_position_embeddings` tokens per prompt, and no id past its vocabulary (either
    /// would fail, or index out of range, in the middle of sampling).
    pub fn check_tokenizer_fits(&self, tokenizer: &ClipTokenizer) -> Result<(), PipelineError> {
        let c = &self.text_encoder;
        let encoder_config = self.root.join("text_encoder/config.json");
        if tokenizer.max_length() > c.max_position_embeddings {
            return Err(PipelineError::Tokenizer {
                path: self.root.join("tokenizer/tokenizer_config.json"),
                message: format!(
                    "prompts are {} tokens long (`model_max_length`) but the text encoder reads \
                     at most {} (`max_position_embeddings` of {})",
                    tokenizer.max_length(),
                    c.max_position_embeddings,
                    encoder_config.display()
                ),
            });
        }
        if tokenizer.vocab_size() > c.vocab_size {
            return Err(PipelineError::BadConfig {
                path: encoder_config,
                message: format!(
                    "`vocab_size` = {} is smaller than the tokenizer's {} tokens ({})",
                    c.vocab_size,
                    tokenizer.vocab_size(),
                    self.root.join("tokenizer").display()
                ),
            });
        }
        Ok(())
    }
}

/// The tensor shapes of weight files, read from their headers alone (no data): a lying or
/// truncated header is refused here, naming the file and what is wrong.
fn weight_headers(files: &[PathBuf]) -> Result<sdpipe_unet::weights::WeightFiles, PipelineError> {
    sdpipe_unet::weights::WeightFiles::open(files).map_err(|e| match e {
        sdpipe_unet::UNetError::Weights { path, message } => {
            PipelineError::BadWeights { path, message }
        }
        e => PipelineError::BadWeights { path: files[0].clone(), message: e.to_string() },
    })
}

/// `name` has `want` as its shape in `weights`; the error says which setting implies it.
fn expect_shape(
    weights: &sdpipe_unet::weights::WeightFiles,
    name: &str,
    want: &[usize],
    setting: &str,
) -> Result<(), String> {
    match weights.shape(name) {
        Some(have) if have == want => Ok(()),
        Some(have) => Err(format!(
            "{setting} imply `{name}` of shape {want:?}, but the weights have {have:?}"
        )),
        None => Err(format!("{setting} imply a tensor `{name}` the weights do not have")),
    }
}

/// The VAE's config agrees with its weights' shapes at the points every size shows: the input
/// and output convolutions of the encoder and the decoder (channels, latent channels, first and
/// last widths), each encoder block's width, the number of blocks and of resnets per block.
/// Names are diffusers' (those of every SD VAE file, old or new; only the attention's changed).
pub fn vae_agrees_with(
    c: &VaeConfig,
    weights: &sdpipe_unet::weights::WeightFiles,
) -> Result<(), String> {
    let widths = &c.block_out_channels;
    let (Some(&first), Some(&last)) = (widths.first(), widths.last()) else {
        return Err("`block_out_channels` is empty".into());
    };
    let latent = c.latent_channels;
    expect_shape(
        weights,
        "encoder.conv_in.weight",
        &[first, c.in_channels, 3, 3],
        "`in_channels` and `block_out_channels`[0]",
    )?;
    expect_shape(
        weights,
        "encoder.conv_out.weight",
        &[2 * latent, last, 3, 3],
        "`latent_channels` and the last `block_out_channels`",
    )?;
    expect_shape(
        weights,
        "decoder.conv_in.weight",
        &[last, latent, 3, 3],
        "`latent_channels` and the last `block_out_channels`",
    )?;
    expect_shape(
        weights,
        "decoder.conv_out.weight",
        &[c.out_channels, first, 3, 3],
        "`out_channels` and `block_out_channels`[0]",
    )?;
    let layers = c.layers_per_block;
    for (i, &width) in widths.iter().enumerate() {
        // The last resnet's second convolution maps the block's width to itself.
        if let Some(j) = layers.checked_sub(1) {
            let name = format!("encoder.down_blocks.{i}.resnets.{j}.conv2.weight");
            let setting = format!("`block_out_channels`[{i}] and `layers_per_block`");
            expect_shape(weights, &name, &[width, width, 3, 3], &setting)?;
        }
        let past = format!("encoder.down_blocks.{i}.resnets.{}.", c.layers_per_block);
        if weights.tensors().keys().any(|k| k.starts_with(&past)) {
            return Err(format!(
                "`layers_per_block` = {} but the weights have more resnets in encoder block {i}",
                c.layers_per_block
            ));
        }
    }
    let past = format!("encoder.down_blocks.{}.", widths.len());
    if weights.tensors().keys().any(|k| k.starts_with(&past)) {
        return Err(format!(
            "`block_out_channels` lists {} blocks but the weights have more",
            widths.len()
        ));
    }
    Ok(())
}

/// The text encoder's config agrees with its weights' shapes: the token and position
/// embeddings (vocabulary, positions, width), the MLP's width, and the last layer's presence.
/// Both layouts of names are read (with and without transformers 4's `text_model.` prefix).
pub fn text_encoder_agrees_with(
    c: &TextEncoderConfig,
    weights: &sdpipe_unet::weights::WeightFiles,
) -> Result<(), String> {
    let p = if weights.shape("text_model.embeddings.token_embedding.weight").is_some() {
        "text_model."
    } else {
        ""
    };
    let d = c.hidden_size;
    expect_shape(
        weights,
        &format!("{p}embeddings.token_embedding.weight"),
        &[c.vocab_size, d],
        "`vocab_size` and `hidden_size`",
    )?;
    expect_shape(
        weights,
        &format!("{p}embeddings.position_embedding.weight"),
        &[c.max_position_embeddings, d],
        "`max_position_embeddings` and `hidden_size`",
    )?;
    expect_shape(
        weights,
        &format!("{p}encoder.layers.0.mlp.fc1.weight"),
        &[c.intermediate_size, d],
        "`intermediate_size` and `hidden_size`",
    )?;
    match c.num_hidden_layers.checked_sub(1) {
        Some(last) => expect_shape(
            weights,
            &format!("{p}encoder.layers.{last}.layer_norm1.weight"),
            &[d],
            "`num_hidden_layers` and `hidden_size`",
        ),
        None => Err("`num_hidden_layers` is 0".into()),
    }
}

fn require(path: &Path, what: &str) -> Result<(), PipelineError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(PipelineError::Missing { path: path.to_path_buf(), hint: what.to_string() })
    }
}

/// A candle `VarBuilder` over a component's weight files (from [`SdPipeline::weight_files`]):
/// memory-mapped safetensors (one file or shards), or a PyTorch pickle (`.bin`, read with
/// candle's pickle reader). Tensors are converted to `dtype` as they are read, so an fp16
/// variant loads into f32.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, PipelineError> {
    Ok(VarBuilder::from_backend(weights_backend(files)?, dtype, device.clone()))
}

/// The tensors of a component's weight files (see [`var_builder`]).
fn weights_backend(files: &[PathBuf]) -> Result<Box<dyn SimpleBackend>, PipelineError> {
    let weights_error = |source| PipelineError::Weights { path: files[0].clone(), source };
    match files {
        [one] if sdpipe_unet::is_pickle(one) => {
            Ok(Box::new(candle_core::pickle::PthTensors::new(one, None).map_err(weights_error)?))
        }
        // SAFETY: the files are mmapped read-only; sdpipe never writes a pipeline folder it is
        // reading, and the engine's cached outputs are immutable.
        _ => Ok(Box::new(
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
                .map_err(weights_error)?,
        )),
    }
}

/// The dtype a VAE loaded in `dtype` computes in on `device`: `dtype`, except bf16 on the CPU.
/// candle 0.11.1 has no bf16 convolution on the CPU (its CPU matmul widens bf16 to f32, its
/// convolution refuses bf16), and the VAE is mostly convolutions; there a bf16 VAE keeps
/// bf16-rounded weights and inputs but computes in f32 (see [`vae_var_builder`]). fp16 has
/// CPU kernels, and every dtype has CUDA ones.
pub fn vae_compute_dtype(dtype: DType, device: &Device) -> DType {
    if dtype == DType::BF16 && device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

/// A VAE's weights for `dtype` on `device` and the dtype the VAE computes in
/// ([`vae_compute_dtype`]): a [`var_builder`] in `dtype`, or, where the VAE cannot compute in
/// `dtype`, one whose tensors are rounded to `dtype` and then widened to the compute dtype
/// (exactly: bf16 values are f32 values), so the weights are the bf16 model's.
pub fn vae_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, DType), PipelineError> {
    let compute = vae_compute_dtype(dtype, device);
    if compute == dtype {
        return Ok((var_builder(files, dtype, device)?, dtype));
    }
    let rounded = RoundedThrough { inner: weights_backend(files)?, through: dtype };
    Ok((VarBuilder::from_backend(Box::new(rounded), compute, device.clone()), compute))
}

/// Weights read in `through` and then converted to the dtype asked for.
struct RoundedThrough {
    inner: Box<dyn SimpleBackend>,
    through: DType,
}

impl SimpleBackend for RoundedThrough {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.inner.get(shape, name, init, self.through, device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, self.through, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Keys of `extra` that change the architecture, with the only value candle's modules support.
const UNET_FIXED: &[(&str, &str)] = &[
    ("class_embed_type", "null"),
    ("addition_embed_type", "null"),
    ("time_cond_proj_dim", "null"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("time_embedding_dim", "null"),
    ("timestep_post_act", "null"),
    ("time_embedding_act_fn", "null"),
    ("num_class_embeds", "null"),
    ("reverse_transformer_layers_per_block", "null"),
    ("cross_attention_norm", "null"),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("time_embedding_type", "\"positional\""),
    ("resnet_time_scale_shift", "\"default\""),
    ("only_cross_attention", "false"),
    ("dual_cross_attention", "false"),
    ("attention_type", "\"default\""),
    ("resnet_skip_time_act", "false"),
    ("resnet_out_scale_factor", "1.0"),
    ("class_embeddings_concat", "false"),
    ("mid_block_only_cross_attention", "null"),
];

fn check_fixed(
    extra: &serde_json::Map<String, Value>,
    fixed: &[(&str, &str)],
) -> Result<(), String> {
    for (key, expected) in fixed {
        if let Some(value) = extra.get(*key) {
            let want: Value = serde_json::from_str(expected).expect("valid literal");
            let same = match (value, &want) {
                (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                (a, b) => a == b,
            };
            if !same {
                return Err(format!("`{key}` is {value}; only {expected} is supported"));
            }
        }
    }
    Ok(())
}

/// Map diffusers' UNet config onto candle's, refusing what candle would silently build wrong.
pub fn unet_to_candle(c: &UNetConfig) -> Result<UNet2DConditionModelConfig, String> {
    check_fixed(&c.extra, UNET_FIXED)?;
    let n = c.block_out_channels.len();
    if n == 0 {
        return Err("`block_out_channels` is empty".into());
    }
    if c.down_block_types.len() != n || c.up_block_types.len() != n {
        return Err(format!(
            "{} down and {} up block types for {n} `block_out_channels`",
            c.down_block_types.len(),
            c.up_block_types.len()
        ));
    }
    if c.act_fn != "silu" {
        return Err(format!("`act_fn` is {:?}; only \"silu\" is supported", c.act_fn));
    }
    match c.mid_block_type.as_deref() {
        Some("UNetMidBlock2DCrossAttn") => {}
        other => return Err(format!("`mid_block_type` {other:?} is not supported")),
    }
    let mut blocks = Vec::with_capacity(n);
    for (i, down) in c.down_block_types.iter().enumerate() {
        // candle builds the up path as the mirror of the down path; accept only configs that
        // are that mirror.
        let (cross, mirror) = match down.as_str() {
            "CrossAttnDownBlock2D" => (true, "CrossAttnUpBlock2D"),
            "DownBlock2D" => (false, "UpBlock2D"),
            other => return Err(format!("down block type {other:?} is not supported")),
        };
        if c.up_block_types[n - 1 - i] != mirror {
            return Err(format!(
                "up block {} is {:?} but mirrors down block {i} ({down:?}); expected {mirror:?}",
                n - 1 - i,
                c.up_block_types[n - 1 - i]
            ));
        }
        let heads = c.heads(i).ok_or_else(|| format!("no attention head count for block {i}"))?;
        let layers = c
            .transformer_layers_per_block
            .get(i)
            .ok_or_else(|| format!("no `transformer_layers_per_block` for block {i}"))?;
        blocks.push(BlockConfig {
            out_channels: c.block_out_channels[i],
            use_cross_attn: cross.then_some(layers),
            attention_head_dim: heads,
        });
    }
    Ok(UNet2DConditionModelConfig {
        center_input_sample: c.center_input_sample,
        flip_sin_to_cos: c.flip_sin_to_cos,
        freq_shift: c.freq_shift,
        blocks,
        layers_per_block: c.layers_per_block,
        downsample_padding: c.downsample_padding,
        mid_block_scale_factor: c.mid_block_scale_factor,
        norm_num_groups: c.norm_num_groups,
        norm_eps: c.norm_eps,
        cross_attention_dim: c.cross_attention_dim,
        sliced_attention_size: None,
        use_linear_projection: c.use_linear_projection,
    })
}

pub fn vae_to_candle(c: &VaeConfig) -> Result<AutoEncoderKLConfig, String> {
    if c.block_out_channels.is_empty() {
        return Err("`block_out_channels` is empty".into());
    }
    let n = c.block_out_channels.len();
    let all = |types: &[String], want: &str| types.is_empty() || types.iter().all(|t| t == want);
    if !all(&c.down_block_types, "DownEncoderBlock2D") || c.down_block_types.len() > n {
        return Err(format!("down block types {:?} are not supported", c.down_block_types));
    }
    if !all(&c.up_block_types, "UpDecoderBlock2D") || c.up_block_types.len() > n {
        return Err(format!("up block types {:?} are not supported", c.up_block_types));
    }
    if c.act_fn != "silu" {
        return Err(format!("`act_fn` is {:?}; only \"silu\" is supported", c.act_fn));
    }
    if !c.mid_block_add_attention {
        return Err("`mid_block_add_attention` false is not supported".into());
    }
    Ok(AutoEncoderKLConfig {
        block_out_channels: c.block_out_channels.clone(),
        layers_per_block: c.layers_per_block,
        latent_channels: c.latent_channels,
        norm_num_groups: c.norm_num_groups,
        use_quant_conv: c.use_quant_conv,
        use_post_quant_conv: c.use_post_quant_conv,
    })
}

pub fn clip_to_candle(c: &TextEncoderConfig) -> Result<ClipTextConfig, String> {
    if c.hidden_act != "quick_gelu" {
        return Err(format!(
            "`hidden_act` is {:?}; only \"quick_gelu\" (SD1.x's CLIP ViT-L/14) is supported",
            c.hidden_act
        ));
    }
    if (c.layer_norm_eps - 1e-5).abs() > 1e-12 {
        return Err(format!("`layer_norm_eps` is {}; only 1e-5 is supported", c.layer_norm_eps));
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(format!(
            "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
            c.hidden_size, c.num_attention_heads
        ));
    }
    Ok(ClipTextConfig {
        vocab_size: c.vocab_size,
        embed_dim: c.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: c.intermediate_size,
        max_position_embeddings: c.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        projection_dim: c.projection_dim,
    })
}

/// Copy a pipeline's `model_index.json` and every component folder except those named in
/// `except` (e.g. `&["unet"]` for a trainer that writes its own UNet). Files are hard-linked
/// when possible (pipeline weights are gigabytes and never modified in place), else copied;
/// symlinks (as in the Hugging Face cache) are followed, so `to` holds real files.
///
/// Of a component's weights only those the pipeline reads are copied, under the default names
/// (`vae/diffusion_pytorch_model.fp16.safetensors` of variant `fp16` becomes
/// `vae/diffusion_pytorch_model.safetensors`, as diffusers' `save_pretrained` writes a pipeline
/// loaded with a variant): the copy opens without a variant, and other weights the source
/// folder may hold (another variant, a pickle beside safetensors) are not duplicated.
pub fn copy_components(
    pipeline: &SdPipeline,
    to: &Path,
    except: &[&str],
) -> Result<(), PipelineError> {
    let from = pipeline.root.as_path();
    let index = from.join(MODEL_INDEX);
    require(&index, "every diffusers pipeline folder has one at its root")?;
    fs::create_dir_all(to).map_err(|source| PipelineError::Write { path: to.into(), source })?;
    link_or_copy(&index, &to.join(MODEL_INDEX))?;
    let entries = fs::read_dir(from)
        .map_err(|source| PipelineError::Read { path: from.to_path_buf(), source })?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PipelineError::Read { path: from.into(), source })?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() && !except.contains(&name.as_str()) && !name.starts_with('.') {
            dirs.push((path, name));
        }
    }
    for (path, name) in dirs {
        let dest = to.join(&name);
        if !WEIGHT_COMPONENTS.contains(&name.as_str()) {
            copy_tree(&path, &dest, &|_| true)?;
            continue;
        }
        copy_tree(&path, &dest, &|file| !is_weight_file(file))?;
        let [single, index, bin] = weight_names(&name, None);
        let ComponentWeights { files, index: source_index } = pipeline.weights(&name)?;
        if let Some(source_index) = source_index {
            link_or_copy(&source_index, &dest.join(index))?;
            for shard in &files {
                link_or_copy(shard, &dest.join(shard.file_name().expect("a shard is a file")))?;
            }
        } else {
            let plain = if sdpipe_unet::is_pickle(&files[0]) { bin } else { single };
            link_or_copy(&files[0], &dest.join(plain))?;
        }
    }
    Ok(())
}

/// Whether a file in a component folder holds weights (of any layout or framework).
fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".index.json"]
        .iter()
        .any(|ext| name.ends_with(ext))
        || (name.contains(".safetensors.index.") && name.ends_with(".json"))
}

/// Copy `from` into `to`, files for which `keep(file name)` holds (at the top level).
fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&str) -> bool) -> Result<(), PipelineError> {
    fs::create_dir_all(to).map_err(|source| PipelineError::Write { path: to.into(), source })?;
    let entries =
        fs::read_dir(from).map_err(|source| PipelineError::Read { path: from.into(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| PipelineError::Read { path: from.into(), source })?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &dest, &|_| true)?;
        } else if keep(&entry.file_name().to_string_lossy()) {
            link_or_copy(&path, &dest)?;
        }
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), PipelineError> {
    let real = fs::canonicalize(from)
        .map_err(|source| PipelineError::Read { path: from.to_path_buf(), source })?;
    if fs::hard_link(&real, to).is_ok() {
        return Ok(());
    }
    fs::copy(&real, to)
        .map(|_| ())
        .map_err(|source| PipelineError::Write { path: to.to_path_buf(), source })
}

/// Write weights as diffusers and transformers do: one safetensors file, metadata
/// `{"format": "pt"}`, tensors contiguous in their own dtype.
pub fn write_weights(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), PipelineError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|source| PipelineError::Write { path: parent.to_path_buf(), source })?;
    }
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|source| PipelineError::Weights { path: path.to_path_buf(), source })?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| PipelineError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{write_tiny, TinySpec};

    fn tiny_unet() -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32,
        }))
        .unwrap()
    }

    #[test]
    fn an_sd1_unet_config_maps_onto_candles_blocks() {
        let config = unet_to_candle(&tiny_unet()).unwrap();
        assert_eq!(config.blocks.len(), 2);
        assert_eq!(config.blocks[0].use_cross_attn, Some(1));
        assert_eq!(config.blocks[1].use_cross_attn, None);
        assert_eq!(config.blocks[1].attention_head_dim, 8);
    }

    #[test]
    fn architecture_keys_candle_cannot_express_are_refused_by_name() {
        let mut config = tiny_unet();
        config.extra.insert("class_embed_type".into(), serde_json::json!("timestep"));
        let err = unet_to_candle(&config).unwrap_err();
        assert!(err.contains("class_embed_type"), "{err}");
    }

    #[test]
    fn up_blocks_that_do_not_mirror_the_down_blocks_are_refused() {
        let mut config = tiny_unet();
        config.up_block_types.reverse();
        let err = unet_to_candle(&config).unwrap_err();
        assert!(err.contains("mirrors"), "{err}");
    }

    #[test]
    fn a_gelu_text_encoder_is_refused() {
        let mut config: TextEncoderConfig = serde_json::from_str("{}").unwrap();
        config.hidden_act = "gelu".into();
        assert!(clip_to_candle(&config).unwrap_err().contains("hidden_act"));
    }

    #[test]
    fn copy_components_leaves_out_the_excepted_parts() {
        let from = tempfile::tempdir().unwrap();
        write_tiny(from.path(), &TinySpec::default()).unwrap();
        let to = tempfile::tempdir().unwrap();
        let pipeline = SdPipeline::open(from.path()).unwrap();
        copy_components(&pipeline, to.path(), &["unet"]).unwrap();
        assert!(to.path().join(MODEL_INDEX).is_file());
        assert!(to.path().join("vae/diffusion_pytorch_model.safetensors").is_file());
        assert!(to.path().join("tokenizer/merges.txt").is_file());
        assert!(!to.path().join("unet").exists());
    }

    #[test]
    fn missing_weights_name_every_layout_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        std::fs::remove_file(dir.path().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let err = pipeline.weight_files("vae").unwrap_err().to_string();
        assert!(err.contains("diffusion_pytorch_model.bin"), "{err}");
        let err = SdPipeline::open_variant(dir.path(), Some("fp16"))
            .unwrap()
            .weight_files("unet")
            .unwrap_err()
            .to_string();
        assert!(err.contains("diffusion_pytorch_model.fp16.safetensors"), "{err}");
        assert!(err.contains("leave `variant` unset"), "{err}");
    }

    #[test]
    fn weight_names_follow_diffusers_and_transformers() {
        assert_eq!(
            weight_names("unet", Some("fp16")),
            [
                "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.safetensors.index.fp16.json",
                "diffusion_pytorch_model.fp16.bin",
            ]
        );
        assert_eq!(
            weight_names("text_encoder", None),
            ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
        );
    }

    #[test]
    fn a_shard_index_naming_a_path_outside_its_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(&index, r#"{"weight_map": {"a": "../../etc/passwd"}}"#).unwrap();
        let err = shard_names(&index).unwrap_err().to_string();
        assert!(err.contains("not a file name"), "{err}");
    }

    #[test]
    fn a_bf16_vae_on_the_cpu_computes_in_f32_on_bf16_rounded_weights() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        let files = SdPipeline::open(dir.path()).unwrap().weight_files("vae").unwrap();
        let name = "encoder.conv_in.weight";
        let get = |dtype: DType| {
            let (vb, compute) = vae_var_builder(&files, dtype, &Device::Cpu).unwrap();
            (vb.get_unchecked(name).unwrap(), compute)
        };
        let (full, compute) = get(DType::F32);
        assert_eq!(compute, DType::F32);
        let (half, compute) = get(DType::F16);
        assert_eq!((half.dtype(), compute), (DType::F16, DType::F16), "fp16 has CPU kernels");
        let (rounded, compute) = get(DType::BF16);
        assert_eq!((rounded.dtype(), compute), (DType::F32, DType::F32));
        let expected = full.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&rounded), values(&expected));
        assert_ne!(values(&rounded), values(&full), "the weights are rounded");
    }

    /// A tiny pipeline with `edit` applied to the JSON of `file`.
    fn tiny_with(file: &str, edit: impl Fn(&mut Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        let path = dir.path().join(file);
        let mut value: Value = read_json(&path).unwrap();
        edit(&mut value);
        std::fs::write(&path, value.to_string()).unwrap();
        dir
    }

    #[test]
    fn open_refuses_a_config_size_over_its_cap_naming_the_file() {
        let dir = tiny_with("unet/config.json", |c| {
            c["block_out_channels"] = serde_json::json!([1_000_000_000u64, 1_000_000_000u64])
        });
        let err = SdPipeline::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unet/config.json: not a valid config"), "{err}");
        assert!(err.contains("`block_out_channels`[0] = 1000000000"), "{err}");
    }

    #[test]
    fn open_refuses_a_huge_tokenizer_file_before_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        let vocab = dir.path().join("tokenizer/vocab.json");
        std::fs::File::create(&vocab).unwrap().set_len(1 << 40).unwrap();
        let err = SdPipeline::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer/vocab.json: not a valid config: 1099511627776 bytes"));
    }

    #[test]
    fn a_vae_config_whose_widths_disagree_with_the_weights_is_refused_before_loading() {
        let dir = tiny_with("vae/config.json", |c| {
            c["block_out_channels"] = serde_json::json!([64, 64, 128])
        });
        let err = SdPipeline::open(dir.path())
            .unwrap()
            .load_vae(&Device::Cpu, DType::F32)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("vae/config.json: `in_channels` and `block_out_channels`[0]"));
        assert!(err.contains("vae/diffusion_pytorch_model.safetensors"), "{err}");
    }

    #[test]
    fn a_vae_config_with_fewer_blocks_than_the_weights_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec { vae_channels: vec![32, 32, 32], ..TinySpec::default() };
        write_tiny(dir.path(), &spec).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let weights = weight_headers(&pipeline.weight_files("vae").unwrap()).unwrap();
        let mut config = pipeline.vae.clone();
        let widths = &mut config.block_out_channels;
        widths.truncate(widths.len() - 1);
        let err = vae_agrees_with(&config, &weights).unwrap_err();
        assert!(err.contains("blocks but the weights have more"), "{err}");
    }

    #[test]
    fn a_vae_config_with_fewer_resnets_than_the_weights_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec { layers_per_block: 2, ..TinySpec::default() }).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let weights = weight_headers(&pipeline.weight_files("vae").unwrap()).unwrap();
        let config = VaeConfig { layers_per_block: 1, ..pipeline.vae.clone() };
        let err = vae_agrees_with(&config, &weights).unwrap_err();
        assert!(err.contains("the weights have more resnets in encoder block 0"), "{err}");
    }

    #[test]
    fn a_text_encoder_config_whose_vocabulary_disagrees_with_the_weights_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let weights = weight_headers(&pipeline.weight_files("text_encoder").unwrap()).unwrap();
        let config = TextEncoderConfig { vocab_size: 1000, ..pipeline.text_encoder.clone() };
        let err = text_encoder_agrees_with(&config, &weights).unwrap_err();
        assert!(err.contains("imply `text_model.embeddings.token_embedding.weight` of shape [1000"));
    }

    #[test]
    fn a_text_encoder_config_with_more_layers_than_the_weights_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let weights = weight_headers(&pipeline.weight_files("text_encoder").unwrap()).unwrap();
        let config = TextEncoderConfig { num_hidden_layers: 60, ..pipeline.text_encoder.clone() };
        let err = text_encoder_agrees_with(&config, &weights).unwrap_err();
        assert!(
            err.contains("a tensor `text_model.encoder.layers.59.layer_norm1.weight`"),
            "{err}"
        );
    }

    #[test]
    fn the_trainable_text_encoder_is_checked_against_its_weights_too() {
        let dir =
            tiny_with("text_encoder/config.json", |c| c["max_position_embeddings"] = 99.into());
        let err = SdPipeline::open(dir.path())
            .unwrap()
            .load_trainable_text_encoder(&Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("text_encoder/config.json: `max_position_embeddings`"), "{err}");
    }

    #[test]
    fn a_tokenizer_longer_than_the_text_encoder_reads_is_refused() {
        let dir =
            tiny_with("tokenizer/tokenizer_config.json", |c| c["model_max_length"] = 1000.into());
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let err = pipeline.check_tokenizer_fits(&pipeline.tokenizer().unwrap()).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("tokenizer_config.json: bad tokenizer files: prompts are 1000"));
    }

    #[test]
    fn a_text_encoder_vocabulary_smaller_than_the_tokenizer_is_refused() {
        let dir = tiny_with("text_encoder/config.json", |c| c["vocab_size"] = 10.into());
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let err = pipeline.check_tokenizer_fits(&pipeline.tokenizer().unwrap()).unwrap_err();
        assert!(err.to_string().contains("`vocab_size` = 10 is smaller than the tokenizer's"));
    }

    #[test]
    fn a_lying_weights_header_is_refused_naming_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &TinySpec::default()).unwrap();
        let path = dir.path().join("vae/diffusion_pytorch_model.safetensors");
        let header = r#"{"encoder.conv_in.weight": {"dtype": "F32", "shape": [9, 9], "data_offsets": [0, 8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 8]);
        std::fs::write(&path, bytes).unwrap();
        let err = SdPipeline::open(dir.path())
            .unwrap()
            .load_vae(&Device::Cpu, DType::F32)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("vae/diffusion_pytorch_model.safetensors: not a readable"), "{err}");
        assert!(err.contains("tensor `encoder.conv_in.weight`: shape [9, 9] of F32 is 324 bytes"));
    }

    #[test]
    fn variant_names_are_checked() {
        assert!(check_variant("fp16").is_ok());
        assert!(check_variant("../x").is_err());
        assert!(check_variant("").is_err());
    }

    #[test]
    fn a_variant_field_reads_only_names_check_variant_accepts() {
        let read = |v: &str| serde_json::from_value::<Variant>(serde_json::json!(v));
        assert_eq!(read("fp16").unwrap().as_str(), "fp16");
        let e = read("../x").unwrap_err().to_string();
        assert_eq!(e, check_variant("../x").unwrap_err());
    }
}
