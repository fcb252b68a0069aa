//! LoRA adapters for the UNet as diffusers' `examples/text_to_image/train_text_to_image_lora.py`
//! sets them up with peft, and LoRA files in the format diffusers saves and loads.
//!
//! # Training
//!
//! [`LoraConfig`] is peft's `LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
//! target_modules=targets)`. [`UNet::for_lora_training`] loads the base weights frozen (detached,
//! as [`UNet::for_inference`] does) and gives every linear layer whose state-dict name is a target
//! or ends with `.<target>` (peft's rule for a list of targets) two trainable matrices, no biases:
//!
//! - `A` (peft's `lora_A`, diffusers' `lora.down`), `[rank, in]`, drawn from N(0, (1/rank)²):
//!   peft's "gaussian" std is `1/r`, not `1/√r`. sdpipe draws it from ChaCha8 seeded with the
//!   given seed (Box–Muller), so a run is reproducible; torch's generator is not reproduced.
//! - `B` (`lora_B`, `lora.up`), `[out, rank]`, zeros: a fresh adapter changes nothing.
//!
//! The layer computes `y = x Wᵀ + b + (alpha/rank)·(x Aᵀ) Bᵀ` (peft's unmerged `lora.Linear`).
//! [`UNet::vars`] then holds the adapters alone, under exactly the keys the file stores them with
//! (`unet.<module>.lora.down.weight`, `unet.<module>.lora.up.weight`), so the training loop, its
//! checkpoints, optimiser and clipping see only them; [`UNet::is_trainable`] is true and
//! [`UNet::loss_and_grads`] (plain or checkpointed) returns their gradients.
//! [`UNet::load_lora`] sets them from a file (parity tests, resuming).
//!
//! # The file
//!
//! [`UNet::save_lora`] writes `pytorch_lora_weights.safetensors` as diffusers 0.42.1's
//! `StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=convert_state_dict_to_diffusers(
//! get_peft_model_state_dict(unet)), unet_lora_adapter_metadata={"r": .., "lora_alpha": ..,
//! "target_modules": [..]})` does:
//!
//! - tensors, f32: `unet.<module>.lora.down.weight` `[rank, in]` and `unet.<module>.lora.up.weight`
//!   `[out, rank]` (`convert_state_dict_to_diffusers` renames peft's `lora_A`/`lora_B`);
//! - metadata: `format: pt`, and `lora_adapter_metadata`, the JSON (keys sorted, two-space
//!   indent) of `{"unet.lora_alpha", "unet.r", "unet.target_modules"}`.
//!
//! Alpha travels only in that metadata. Without it diffusers' loader assumes alpha = rank (scale
//! 1), which is what the script itself writes (it passes no metadata and trains with alpha =
//! rank), so a file with alpha ≠ rank must carry it. It carries the three fields of
//! [`LoraConfig`] rather than the whole `LoraConfig.to_dict()` that diffusers' newer scripts pass
//! (`_collate_lora_metadata`): diffusers builds `LoraConfig(**metadata)`, so a dict of one peft
//! version's ~40 fields fails under a peft that lacks any of them, while these three exist in all.
//! Entries the caller adds (the base model's identity) go beside `format`; diffusers reads only
//! `lora_adapter_metadata`.
//!
//! # Reading and merging
//!
//! [`LoraFile::open`] reads a file's header alone (as hostile input, see [`crate::weights`]):
//! diffusers' naming or peft's (`<module>.lora_A.weight`, `.lora_B.weight`), with or without the
//! `unet.` prefix; alpha from `lora_adapter_metadata` (peft's defaults r = alpha = 8 for a field
//! it lacks, as `LoraConfig(**metadata)` gives), otherwise alpha = rank. Anything else — another
//! key, a half-missing pair, a shape that is no `[r, in]`/`[out, r]` pair, a rank outside
//! 1..=16384, metadata asking for what sdpipe does not compute (DoRA, rsLoRA, per-module patterns)
//! — is refused naming the key. [`UNet::for_inference_with_lora`] merges each file at load time,
//! `W' = W + scale·(alpha/rank)·B·A` (diffusers' `fuse_lora(lora_scale=scale)`, equal to its
//! unfused `cross_attention_kwargs={"scale": scale}`), after checking every LoRA layer against the
//! shape the config gives its weight in the same header-only dry run as the weights.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::error::UNetError;
use crate::limits::{self, MAX_CHANNELS};
use crate::params::{self, placeholder, problem_list, random_tensor, Init};
use crate::unet::UNet;
use crate::weights::WeightFiles;

/// The file diffusers' `save_lora_weights` writes and `load_lora_weights(dir)` reads.
pub const LORA_WEIGHTS_NAME: &str = "pytorch_lora_weights.safetensors";

/// `train_text_to_image_lora.py`'s targets: the attention projections.
pub const DEFAULT_TARGETS: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];

/// The metadata entry diffusers reads an adapter's `LoraConfig` from.
const ADAPTER_METADATA: &str = "lora_adapter_metadata";
/// The UNet's prefix in a pipeline's LoRA file (diffusers' `unet_name`).
const PREFIX: &str = "unet.";

/// Which matrix of an adapter a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    /// `A`: `[rank, in]`.
    Down,
    /// `B`: `[out, rank]`.
    Up,
}

impl Half {
    /// The suffix sdpipe writes (diffusers' naming).
    fn suffix(self) -> &'static str {
        match self {
            Half::Down => ".lora.down.weight",
            Half::Up => ".lora.up.weight",
        }
    }
}

/// The file key (and [`UNet::vars`] name) of an adapter matrix.
fn key(module: &str, half: Half) -> String {
    format!("{PREFIX}{module}{}", half.suffix())
}

/// The module and half a LoRA file key names, in diffusers' or peft's naming.
fn parse_key(key: &str) -> Result<(&str, Half), String> {
    if key.starts_with("text_encoder") {
        return Err(format!(
            "`{key}` is a text encoder's LoRA layer; sdpipe reads the UNet's only"
        ));
    }
    if key.starts_with("lora_unet_") || key.starts_with("lora_te") {
        return Err(format!(
            "`{key}` is in kohya's naming, which sdpipe does not read (diffusers converts it: \
             load it into a pipeline and save it again with save_lora_weights)"
        ));
    }
    let rest = key.strip_prefix(PREFIX).unwrap_or(key);
    let suffixes = [
        (Half::Down.suffix(), Half::Down),
        (".lora_A.weight", Half::Down),
        (Half::Up.suffix(), Half::Up),
        (".lora_B.weight", Half::Up),
    ];
    for (suffix, half) in suffixes {
        if let Some(module) = rest.strip_suffix(suffix).filter(|m| !m.is_empty()) {
            return Ok((module, half));
        }
    }
    Err(format!(
        "unexpected tensor `{key}`: not a LoRA weight in diffusers' naming \
         (`<module>.lora.down.weight`, `<module>.lora.up.weight`) or peft's (`.lora_A.weight`, \
         `.lora_B.weight`)"
    ))
}

/// The LoRA setup of peft's `LoraConfig` as the training script uses it; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`: the adapters' inner width.
    pub rank: usize,
    /// `lora_alpha`: adapter outputs are scaled by `alpha / rank`.
    pub alpha: f64,
    /// Module names, or their trailing dotted parts, whose linear layers get adapters.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// `rank` and `alpha` on [`DEFAULT_TARGETS`].
    pub fn new(rank: usize, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            target_modules: DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// peft's `scaling`: `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Refuses a rank outside 1..=16384 (no layer is wider: [`crate::limits::MAX_CHANNELS`]),
    /// a non-finite alpha and an empty or blank target.
    pub fn validate(&self) -> Result<(), UNetError> {
        let bad = |m: String| Err(UNetError::Input(format!("LoRA config: {m}")));
        if let Err(m) = limits::check("rank", self.rank, MAX_CHANNELS) {
            return bad(m);
        }
        if !self.alpha.is_finite() {
            return bad(format!("alpha = {} is not a finite number", self.alpha));
        }
        if self.target_modules.is_empty() {
            return bad("no target modules".into());
        }
        if let Some(t) = self.target_modules.iter().find(|t| t.trim().is_empty()) {
            return bad(format!("the target module {t:?} is blank"));
        }
        Ok(())
    }

    /// The `lora_adapter_metadata` diffusers writes when given this config: Python's
    /// `json.dumps(indent=2, sort_keys=True)` of the `unet.`-prefixed fields. (Inserted in
    /// sorted order so the output is the same whether or not serde_json keeps insertion order.)
    fn metadata_json(&self) -> String {
        // peft's `lora_alpha` is an int in every config the scripts write: 8, not 8.0.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 2f64.powi(53) {
            Value::from(self.alpha as i64)
        } else {
            Value::from(self.alpha)
        };
        let mut map = serde_json::Map::new();
        map.insert(format!("{PREFIX}lora_alpha"), alpha);
        map.insert(format!("{PREFIX}r"), Value::from(self.rank));
        map.insert(format!("{PREFIX}target_modules"), Value::from(self.target_modules.clone()));
        serde_json::to_string_pretty(&Value::Object(map)).expect("JSON values serialise")
    }
}

/// Whether `target` names `module`: peft's `key == target or key.endswith("." + target)`.
fn targets(target: &str, module: &str) -> bool {
    module.strip_suffix(target).is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// The adapter of one linear layer: `s·(x Aᵀ) Bᵀ` is added to its output.
#[derive(Debug, Clone)]
pub(crate) struct LoraAdapter {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

impl LoraAdapter {
    /// The adapter's contribution for 2-D input rows `x` (`[rows, in]` → `[rows, out]`), in
    /// `x`'s type (its layer's compute type under autocast).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (down, up) = (self.down.to_dtype(x.dtype())?, self.up.to_dtype(x.dtype())?);
        // Through the rank-wide bottleneck, never forming the [out, in] product: that is what
        // makes the adapters cheap to train.
        x.matmul(&down.t()?)?.matmul(&up.t()?)? * self.scale
    }
}

/// The LoRA work of a [`ParamBuilder`].
pub(crate) enum LoraBuild {
    Train(Adapters),
    Merge(Merges),
}

/// The adapters a LoRA-training build made, for [`UNet::vars`].
pub(crate) struct TrainedAdapters {
    pub config: LoraConfig,
    pub vars: BTreeMap<String, Var>,
}

/// Trainable adapters for the targeted linear layers.
pub(crate) struct Adapters {
    config: LoraConfig,
    /// Draws the `A` matrices; `None` in the dry run, which hands out placeholders.
    rng: Option<Box<ChaCha8Rng>>,
    /// Whether each target named a linear layer.
    matched: Vec<bool>,
    vars: BTreeMap<String, Var>,
}

/// LoRA files to merge into the weights they target, each with its user scale.
pub(crate) struct Merges {
    files: Vec<(LoraFile, f64)>,
    /// Per file, its layers whose weights the model asked for (the rest fit nothing).
    used: Vec<HashSet<String>>,
    /// Per file, what does not fit.
    problems: Vec<Vec<String>>,
}

impl LoraBuild {
    fn training(config: LoraConfig, seed: u64) -> Self {
        let matched = vec![false; config.target_modules.len()];
        LoraBuild::Train(Adapters {
            config,
            rng: Some(Box::new(ChaCha8Rng::seed_from_u64(seed))),
            matched,
            vars: BTreeMap::new(),
        })
    }

    fn merging(files: &[(&LoraFile, f64)]) -> Self {
        LoraBuild::Merge(Merges {
            files: files.iter().map(|(f, s)| ((*f).clone(), *s)).collect(),
            used: vec![HashSet::new(); files.len()],
            problems: vec![Vec::new(); files.len()],
        })
    }

    /// The same work for a header-only dry run: nothing drawn, nothing merged.
    pub(crate) fn for_dry_run(&self) -> Self {
        match self {
            LoraBuild::Train(a) => LoraBuild::Train(Adapters {
                config: a.config.clone(),
                rng: None,
                matched: vec![false; a.matched.len()],
                vars: BTreeMap::new(),
            }),
            LoraBuild::Merge(m) => {
                let files: Vec<(&LoraFile, f64)> = m.files.iter().map(|(f, s)| (f, *s)).collect();
                LoraBuild::merging(&files)
            }
        }
    }

    /// Checks the LoRA layers that target the parameter `name` against its `shape`.
    pub(crate) fn check(&mut self, name: &str, shape: &[usize]) {
        let (LoraBuild::Merge(m), Some(module)) = (self, name.strip_suffix(".weight")) else {
            return;
        };
        for (i, (file, _)) in m.files.iter().enumerate() {
            let Some(layer) = file.modules.get(module) else { continue };
            m.used[i].insert(module.to_string());
            if shape != [layer.outputs, layer.inputs] {
                m.problems[i].push(format!(
                    "LoRA layer `{module}` maps {} features to {} (rank {}), but the UNet's \
                     `{name}` has shape {shape:?}{}",
                    layer.inputs,
                    layer.outputs,
                    layer.rank,
                    if shape.len() == 2 { "" } else { ": only linear layers take LoRA here" }
                ));
            }
        }
    }

    /// Whether a LoRA layer already failed to fit (nothing more is read then).
    pub(crate) fn failing(&self) -> bool {
        matches!(self, LoraBuild::Merge(m) if m.problems.iter().any(|p| !p.is_empty()))
    }

    /// `value` (the loaded parameter `name`) plus the products of the LoRA layers targeting it.
    pub(crate) fn merge(&self, name: &str, value: Tensor) -> candle_core::Result<Tensor> {
        let (LoraBuild::Merge(m), Some(module)) = (self, name.strip_suffix(".weight")) else {
            return Ok(value);
        };
        let mut value = value;
        for (file, scale) in &m.files {
            let Some(layer) = file.modules.get(module) else { continue };
            let load = |key: &str| -> candle_core::Result<Tensor> {
                file.weights
                    .load(key)
                    .map_err(candle_core::Error::wrap)?
                    .to_dtype(DType::F32)?
                    .to_device(value.device())
            };
            let delta = load(&layer.up)?.matmul(&load(&layer.down)?)?;
            value = (value + (delta * (scale * layer.alpha / layer.rank as f64))?)?;
        }
        Ok(value)
    }

    /// The adapter of linear layer `module` when training adapters and a target names it.
    pub(crate) fn adapter(
        &mut self,
        module: &str,
        inputs: usize,
        outputs: usize,
        device: &Device,
    ) -> candle_core::Result<Option<LoraAdapter>> {
        let LoraBuild::Train(a) = self else { return Ok(None) };
        let mut hit = false;
        for (matched, target) in a.matched.iter_mut().zip(&a.config.target_modules) {
            if targets(target, module) {
                *matched = true;
                hit = true;
            }
        }
        if !hit {
            return Ok(None);
        }
        let rank = a.config.rank;
        let scale = a.config.scale();
        let Some(rng) = &mut a.rng else {
            let down = placeholder(&[rank, inputs], device)?;
            let up = placeholder(&[outputs, rank], device)?;
            return Ok(Some(LoraAdapter { down, up, scale }));
        };
        let std = 1.0 / rank as f32;
        let down =
            Var::from_tensor(&random_tensor(rng, &[rank, inputs], Init::Normal { std }, device)?)?;
        let up = Var::zeros((outputs, rank), DType::F32, device)?;
        let adapter =
            LoraAdapter { down: down.as_tensor().clone(), up: up.as_tensor().clone(), scale };
        a.vars.insert(key(module, Half::Down), down);
        a.vars.insert(key(module, Half::Up), up);
        Ok(Some(adapter))
    }

    /// The trained adapters, or the error of a target that named no linear layer or a LoRA
    /// layer that fits no weight.
    pub(crate) fn finish(self) -> Result<Option<TrainedAdapters>, UNetError> {
        match self {
            LoraBuild::Train(a) => {
                let unmatched: Vec<&String> = a
                    .config
                    .target_modules
                    .iter()
                    .zip(&a.matched)
                    .filter(|(_, m)| !**m)
                    .map(|(t, _)| t)
                    .collect();
                if let Some(t) = unmatched.first() {
                    return Err(UNetError::Input(format!(
                        "LoRA target `{t}` names no linear layer of this UNet (a target names \
                         each layer whose state-dict name is it or ends with `.{t}`; sdpipe \
                         adapts linear layers only; unmatched: {unmatched:?})"
                    )));
                }
                Ok(Some(TrainedAdapters { config: a.config, vars: a.vars }))
            }
            LoraBuild::Merge(m) => {
                for (((file, _), used), mut problems) in m.files.iter().zip(&m.used).zip(m.problems)
                {
                    problems.extend(file.modules.keys().filter(|k| !used.contains(*k)).map(|k| {
                        format!("LoRA layer `{k}` targets nothing in this UNet (no `{k}.weight`)")
                    }));
                    if !problems.is_empty() {
                        let header = format!(
                            "the LoRA does not fit this UNet ({} problems; is it a LoRA for \
                             another model?):",
                            problems.len()
                        );
                        return Err(file.error(problem_list(&header, &problems)));
                    }
                }
                Ok(None)
            }
        }
    }
}

/// One adapter of a LoRA file.
#[derive(Debug, Clone)]
struct LoraLayer {
    /// The file keys of `A` and `B`.
    down: String,
    up: String,
    rank: usize,
    inputs: usize,
    outputs: usize,
    alpha: f64,
}

/// A LoRA file's header, checked: see the module docs. Cheap to clone; tensors are read when
/// merged or loaded.
#[derive(Clone)]
pub struct LoraFile {
    weights: Arc<WeightFiles>,
    /// By module name (the state-dict name of the targeted layer, without `unet.`).
    modules: BTreeMap<String, LoraLayer>,
}

impl std::fmt::Debug for LoraFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraFile")
            .field("path", &self.path())
            .field("layers", &self.modules.len())
            .finish()
    }
}

impl LoraFile {
    /// Reads and checks the header of a LoRA file, or of `pytorch_lora_weights.safetensors` in
    /// a folder (diffusers' `load_lora_weights(dir)`). No tensor data is read.
    pub fn open(path: &Path) -> Result<LoraFile, UNetError> {
        let path = if path.is_dir() { path.join(LORA_WEIGHTS_NAME) } else { path.to_path_buf() };
        let weights = Arc::new(WeightFiles::open(std::slice::from_ref(&path))?);
        let error = |message: String| UNetError::Weights { path: path.clone(), message };
        let (meta_rank, meta_alpha) =
            adapter_metadata(weights.metadata(0).get(ADAPTER_METADATA)).map_err(error)?;

        let mut problems = Vec::new();
        let mut halves: BTreeMap<&str, [Option<&str>; 2]> = BTreeMap::new();
        let mut names: Vec<&String> = weights.tensors().keys().collect();
        names.sort();
        for name in names {
            let (module, half) = match parse_key(name) {
                Ok(parsed) => parsed,
                Err(problem) => {
                    problems.push(problem);
                    continue;
                }
            };
            let slot = &mut halves.entry(module).or_default()[half as usize];
            if let Some(other) = slot.replace(name) {
                problems.push(format!("`{other}` and `{name}` are the same LoRA weight"));
            }
            let stored = &weights.tensors()[name];
            if !stored.dtype.as_ref().is_ok_and(|d| d.is_float()) {
                problems.push(format!("`{name}` has non-float dtype {:?}", stored.dtype));
            }
        }
        let mut modules = BTreeMap::new();
        for (module, [down, up]) in halves {
            let (Some(down), Some(up)) = (down, up) else {
                let (has, lacks) = if down.is_some() { ("A", "B") } else { ("B", "A") };
                problems.push(format!("LoRA layer `{module}` has its {has} matrix but no {lacks}"));
                continue;
            };
            let (a, b) = (weights.shape(down).unwrap_or(&[]), weights.shape(up).unwrap_or(&[]));
            let &[rank, inputs] = a else {
                problems.push(format!("`{down}` has shape {a:?}, not [rank, in_features]"));
                continue;
            };
            let &[outputs, up_rank] = b else {
                problems.push(format!("`{up}` has shape {b:?}, not [out_features, rank]"));
                continue;
            };
            if rank != up_rank {
                problems.push(format!(
                    "LoRA layer `{module}`: `{down}` has rank {rank} but `{up}` rank {up_rank}"
                ));
                continue;
            }
            if let Err(m) = limits::check(&format!("rank of `{module}`"), rank, MAX_CHANNELS) {
                problems.push(m);
                continue;
            }
            if let Some(r) = meta_rank.filter(|r| *r != rank) {
                problems.push(format!(
                    "LoRA layer `{module}` has rank {rank}, but `{ADAPTER_METADATA}` says r = {r}"
                ));
                continue;
            }
            let alpha = meta_alpha.unwrap_or(rank as f64);
            let layer =
                LoraLayer { down: down.into(), up: up.into(), rank, inputs, outputs, alpha };
            modules.insert(module.to_string(), layer);
        }
        if !problems.is_empty() {
            let header =
                format!("not a UNet LoRA file sdpipe can read ({} problems):", problems.len());
            return Err(error(problem_list(&header, &problems)));
        }
        if modules.is_empty() {
            return Err(error("holds no LoRA weights".into()));
        }
        Ok(LoraFile { weights, modules })
    }

    pub fn path(&self) -> &Path {
        &self.weights.paths()[0]
    }

    /// The file's safetensors metadata (`format`, `lora_adapter_metadata`, and what the writer
    /// added).
    pub fn metadata(&self) -> &HashMap<String, String> {
        self.weights.metadata(0)
    }

    /// The targeted layers' state-dict names (without `unet.`), sorted.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// Each targeted layer's name with its rank and alpha (as [`LoraFile::open`] read them:
    /// the metadata's `lora_alpha`, else the rank), sorted by name.
    pub fn layers(&self) -> impl Iterator<Item = (&str, usize, f64)> {
        self.modules.iter().map(|(name, layer)| (name.as_str(), layer.rank, layer.alpha))
    }

    fn error(&self, message: String) -> UNetError {
        UNetError::Weights { path: self.path().to_path_buf(), message }
    }
}

/// The UNet's `r` and `lora_alpha` from the `lora_adapter_metadata` JSON, if any: diffusers
/// builds `LoraConfig(**fields)` from its `unet.` fields, so a field it lacks takes peft's
/// default (8 for both). Fields that change the arithmetic in ways sdpipe does not compute are
/// refused; the rest (dropout, init, peft bookkeeping) do not change a loaded adapter's output.
fn adapter_metadata(raw: Option<&String>) -> Result<(Option<usize>, Option<f64>), String> {
    let Some(raw) = raw else { return Ok((None, None)) };
    let json: serde_json::Map<String, Value> = serde_json::from_str(raw)
        .map_err(|e| format!("`{ADAPTER_METADATA}` is not a JSON object: {e}"))?;
    let fields: HashMap<&str, &Value> =
        json.iter().filter_map(|(k, v)| Some((k.strip_prefix(PREFIX)?, v))).collect();
    if fields.is_empty() {
        return Ok((None, None));
    }
    let refuse = |field: &str, v: &Value| {
        format!("`{ADAPTER_METADATA}` sets {PREFIX}{field} = {v}, which sdpipe does not implement")
    };
    for field in ["use_dora", "use_rslora", "lora_bias", "fan_in_fan_out"] {
        match fields.get(field) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(v) => return Err(refuse(field, v)),
        }
    }
    for field in ["rank_pattern", "alpha_pattern", "layer_replication"] {
        match fields.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => return Err(refuse(field, v)),
        }
    }
    let rank = match fields.get("r") {
        None => 8,
        Some(v) => v
            .as_u64()
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| format!("`{ADAPTER_METADATA}`: {PREFIX}r = {v} is not a rank"))?,
    };
    let alpha = match fields.get("lora_alpha") {
        None => 8.0,
        Some(v) => v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
            format!("`{ADAPTER_METADATA}`: {PREFIX}lora_alpha = {v} is not a number")
        })?,
    };
    Ok((Some(rank), Some(alpha)))
}

impl UNet {
    /// Loads a diffusers UNet (as [`UNet::from_files`]) for LoRA training: its weights frozen,
    /// an adapter on every linear layer `config` targets (`A` drawn from N(0, (1/rank)²) with
    /// ChaCha8 seeded by `seed`, `B` = 0), [`UNet::vars`] the adapters alone. A target that names
    /// no linear layer is an error, reported with the weights' problems before any is read.
    pub fn for_lora_training(
        dir: &Path,
        weights: &[PathBuf],
        config: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, UNetError> {
        config.validate()?;
        let lora = LoraBuild::training(config.clone(), seed);
        Self::load(dir, weights, device, |pb| pb.frozen().with_lora(lora))
    }

    /// Loads a diffusers UNet for inference (as [`UNet::for_inference`], held in `dtype`) with
    /// each LoRA file merged into the weights it targets at its `scale` (diffusers'
    /// `lora_scale`): `W + scale·(alpha/rank)·B·A`, in f32 before the conversion. Every LoRA
    /// layer is checked against the weight it targets before anything is read.
    pub fn for_inference_with_lora(
        dir: &Path,
        weights: &[PathBuf],
        loras: &[(&LoraFile, f64)],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, UNetError> {
        if let Some((file, scale)) = loras.iter().find(|(_, s)| !s.is_finite()) {
            return Err(file.error(format!("LoRA scale {scale} is not a finite number")));
        }
        let autocast = crate::unet::autocast_for_held(dtype)?;
        let lora = LoraBuild::merging(loras);
        let unet =
            Self::load(dir, weights, device, |pb| pb.frozen().with_lora(lora).held_in(dtype))?;
        unet.set_autocast(autocast)?;
        Ok(unet)
    }

    fn lora_or_refuse(&self) -> Result<&LoraConfig, UNetError> {
        self.lora_config().ok_or_else(|| {
            UNetError::Input("this UNet has no LoRA adapters (UNet::for_lora_training)".into())
        })
    }

    /// Sets the adapters of a [`UNet::for_lora_training`] model to the weights of `file`: one
    /// for every adapter, of the same shape and alpha, nothing else (or an error listing every
    /// difference, before anything is set).
    pub fn load_lora(&self, file: &LoraFile) -> Result<(), UNetError> {
        let config = self.lora_or_refuse()?;
        let mut problems = Vec::new();
        let mut pairs = Vec::new();
        for (module, layer) in &file.modules {
            for (half, stored) in [(Half::Down, &layer.down), (Half::Up, &layer.up)] {
                let name = key(module, half);
                let Some(var) = self.vars().get(&name) else {
                    problems.push(format!("`{stored}`: this model has no adapter `{module}`"));
                    continue;
                };
                let shape = file.weights.shape(stored).unwrap_or(&[]);
                if var.dims() != shape {
                    problems.push(format!(
                        "`{stored}` has shape {shape:?}, the adapter {:?}",
                        var.dims()
                    ));
                }
                pairs.push((var, stored));
            }
            if layer.alpha != config.alpha {
                problems.push(format!(
                    "LoRA layer `{module}` has alpha {}, this model's adapters {}{}",
                    layer.alpha,
                    config.alpha,
                    if file.metadata().contains_key(ADAPTER_METADATA) {
                        ""
                    } else {
                        " (the file has no `lora_adapter_metadata`: alpha = rank)"
                    }
                ));
            }
        }
        let missing = self.vars().keys().filter_map(|name| {
            let (module, _) = parse_key(name).ok()?;
            (!file.modules.contains_key(module)).then(|| format!("no weights for `{name}`"))
        });
        problems.extend(missing);
        if !problems.is_empty() {
            let header = format!(
                "the LoRA does not match this model's adapters ({} problems):",
                problems.len()
            );
            return Err(file.error(problem_list(&header, &problems)));
        }
        for (var, stored) in pairs {
            let value =
                file.weights.load(stored)?.to_dtype(DType::F32)?.to_device(self.device())?;
            var.set(&value)?;
        }
        Ok(())
    }

    /// Writes the adapters of a [`UNet::for_lora_training`] model to
    /// `dir/pytorch_lora_weights.safetensors` as diffusers does (see the module docs), with
    /// `metadata` entries beside diffusers' own (which they may not replace). Returns the path.
    pub fn save_lora(&self, dir: &Path, metadata: &[(&str, &str)]) -> Result<PathBuf, UNetError> {
        let config = self.lora_or_refuse()?;
        let mut entries = HashMap::new();
        for (k, v) in metadata {
            if *k == "format" || *k == ADAPTER_METADATA {
                return Err(UNetError::Input(format!(
                    "LoRA file metadata: `{k}` is diffusers' own entry and cannot be replaced"
                )));
            }
            entries.insert(k.to_string(), v.to_string());
        }
        entries.insert(ADAPTER_METADATA.to_string(), config.metadata_json());
        std::fs::create_dir_all(dir)
            .map_err(|source| UNetError::Io { path: dir.to_path_buf(), source })?;
        let path = dir.join(LORA_WEIGHTS_NAME);
        params::save_with_metadata(self.vars(), &path, entries)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_names_a_module_equal_to_it_or_ending_in_dot_it() {
        assert!(targets("to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
        assert!(targets("to_out.0", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"));
        assert!(targets("attn1.to_q", "x.attn1.to_q"));
        assert!(targets("to_q", "to_q"));
        assert!(!targets("q", "x.to_q"), "a suffix must start at a dot");
        assert!(!targets("to_out", "x.to_out.0"));
    }

    #[test]
    fn keys_in_diffusers_and_peft_naming_parse_to_the_same_module() {
        let module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        for (key, half) in [
            (format!("unet.{module}.lora.down.weight"), Half::Down),
            (format!("{module}.lora_A.weight"), Half::Down),
            (format!("unet.{module}.lora_B.weight"), Half::Up),
        ] {
            assert_eq!(parse_key(&key).unwrap(), (module, half));
        }
        assert!(parse_key("unet.x.lora_A.default.weight").is_err());
        assert!(parse_key("unet..lora.down.weight").is_err());
        assert!(parse_key("lora_unet_down_blocks_0.lora_down.weight")
            .unwrap_err()
            .contains("kohya"));
    }

    #[test]
    fn gaussian_init_has_std_one_over_rank() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let t =
            random_tensor(&mut rng, &[200, 500], Init::Normal { std: 0.25 }, &Device::Cpu).unwrap();
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        // 100,000 draws: the standard error of the mean is 8e-4, of the std about 6e-4.
        assert!(mean.abs() < 4e-3, "mean {mean}");
        assert!((var.sqrt() - 0.25).abs() < 3e-3, "std {}", var.sqrt());
    }

    #[test]
    fn metadata_json_is_what_python_json_dumps_writes() {
        let config = LoraConfig::new(4, 8.0);
        assert_eq!(
            config.metadata_json(),
            "{\n  \"unet.lora_alpha\": 8,\n  \"unet.r\": 4,\n  \"unet.target_modules\": [\n    \
             \"to_k\",\n    \"to_q\",\n    \"to_v\",\n    \"to_out.0\"\n  ]\n}"
        );
        assert!(LoraConfig::new(2, 1.5).metadata_json().contains("\"unet.lora_alpha\": 1.5"));
    }

    #[test]
    fn adapter_metadata_takes_peft_defaults_and_refuses_what_sdpipe_does_not_compute() {
        let m = |s: &str| adapter_metadata(Some(&s.to_string()));
        assert_eq!(m(r#"{"unet.r": 4, "unet.lora_alpha": 8}"#).unwrap(), (Some(4), Some(8.0)));
        assert_eq!(m(r#"{"unet.r": 4}"#).unwrap(), (Some(4), Some(8.0)));
        assert_eq!(m(r#"{"text_encoder.r": 4}"#).unwrap(), (None, None));
        assert_eq!(adapter_metadata(None).unwrap(), (None, None));
        let full = r#"{"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": false,
                       "unet.rank_pattern": {}, "unet.layer_replication": null}"#;
        assert_eq!(m(full).unwrap(), (Some(4), Some(4.0)));
        assert!(m(r#"{"unet.use_dora": true}"#).unwrap_err().contains("use_dora = true"));
        assert!(m(r#"{"unet.alpha_pattern": {"x": 2}}"#).unwrap_err().contains("alpha_pattern"));
        assert!(m(r#"{"unet.r": -1}"#).unwrap_err().contains("not a rank"));
        assert!(m("[1]").unwrap_err().contains("not a JSON object"));
    }

    #[test]
    fn configs_with_a_bad_rank_alpha_or_target_are_refused() {
        let refused = |c: LoraConfig| c.validate().unwrap_err().to_string();
        let err = refused(LoraConfig::new(0, 1.0));
        assert!(err.contains("LoRA config: `rank` = 0 is outside 1..="), "{err}");
        assert!(refused(LoraConfig::new(1 << 40, 1.0)).contains("outside 1..=16384"));
        assert!(refused(LoraConfig::new(4, f64::NAN)).contains("alpha"));
        let mut c = LoraConfig::new(4, 4.0);
        c.target_modules = vec![];
        assert!(refused(c.clone()).contains("no target modules"));
        c.target_modules = vec![" ".into()];
        assert!(refused(c).contains("blank"));
    }
}
