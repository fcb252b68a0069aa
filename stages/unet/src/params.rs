//! The UNet's trainable parameters: one `Var` per tensor of diffusers' state dict, under the same
//! name, loaded from and saved to `diffusion_pytorch_model.safetensors`.
//!
//! Modules ask a [`ParamBuilder`] for each parameter by full name and shape while they are
//! constructed. The builder either takes it from weights files (converting f16/bf16 to f32 and
//! collecting every missing, unexpected or mis-shaped tensor into one error) or draws it from a
//! seeded generator with torch's default initialisation, so random models are reproducible.
//!
//! A builder for an inference model ([`ParamBuilder::frozen`]) hands the modules *detached*
//! views of the same storage: ops on them record no graph, so a sampling forward neither
//! builds backward state nor pays for the copies the differentiable ops make to attach one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::UNetError;

/// How a parameter is initialised when it is not loaded from a file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// torch's default for `nn.Linear`/`nn.Conv2d` weights and biases: U(−1/√fan_in, 1/√fan_in)
    /// (kaiming-uniform with a = √5 reduces to exactly this bound).
    Uniform {
        fan_in: usize,
    },
    Ones,
    Zeros,
}

/// Whether a weight file is a PyTorch pickle (`.bin`, `.pt`, `.pth`) rather than safetensors,
/// by its name, as diffusers and transformers name them.
pub fn is_pickle(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
}

enum Source {
    /// Tensors of one or more safetensors files (shards); `path` names them in errors.
    File {
        path: PathBuf,
        tensors: HashMap<String, Tensor>,
    },
    Random(Box<ChaCha8Rng>),
}

/// Hands out named parameters while the model is built; see the module docs.
pub(crate) struct ParamBuilder {
    source: Source,
    device: Device,
    vars: BTreeMap<String, Var>,
    problems: Vec<String>,
    /// Hand out tracked tensors (training) or detached ones (inference).
    tracked: bool,
}

impl ParamBuilder {
    /// Parameters read from a safetensors file in diffusers' layout.
    pub(crate) fn from_file(path: &Path, device: &Device) -> Result<Self, UNetError> {
        Self::from_files(&[path.to_path_buf()], device)
    }

    /// Parameters read from the shards of one state dict (or a single file); a tensor found in
    /// two shards is an error. Files are safetensors, or PyTorch pickles (`.bin`, `.pt`,
    /// `.pth`: diffusers' `safe_serialization=False`), told apart by extension.
    pub(crate) fn from_files(paths: &[PathBuf], device: &Device) -> Result<Self, UNetError> {
        let Some(first) = paths.first() else {
            return Err(UNetError::Input("no UNet weights file given".into()));
        };
        let mut tensors = HashMap::new();
        for path in paths {
            let weights_error =
                |message: String| UNetError::Weights { path: path.to_path_buf(), message };
            if !path.is_file() {
                return Err(weights_error("weights file not found".into()));
            }
            let shard: Vec<(String, Tensor)> = if is_pickle(path) {
                candle_core::pickle::read_all(path)
                    .map_err(|e| weights_error(format!("not a readable PyTorch state dict: {e}")))?
            } else {
                candle_core::safetensors::load(path, &Device::Cpu)
                    .map_err(|e| weights_error(format!("not a readable safetensors file: {e}")))?
                    .into_iter()
                    .collect()
            };
            for (name, tensor) in shard {
                if tensors.insert(name.clone(), tensor).is_some() {
                    return Err(weights_error(format!(
                        "tensor `{name}` is also in another shard of the same weights"
                    )));
                }
            }
        }
        Ok(ParamBuilder {
            source: Source::File { path: first.clone(), tensors },
            device: device.clone(),
            vars: BTreeMap::new(),
            problems: Vec::new(),
            tracked: true,
        })
    }

    /// Parameters drawn from a ChaCha8 generator seeded with `seed`.
    pub(crate) fn random(seed: u64, device: &Device) -> Self {
        ParamBuilder {
            source: Source::Random(Box::new(ChaCha8Rng::seed_from_u64(seed))),
            device: device.clone(),
            vars: BTreeMap::new(),
            problems: Vec::new(),
            tracked: true,
        }
    }

    /// The same parameters handed out detached, for a model that only runs inference.
    pub(crate) fn frozen(mut self) -> Self {
        self.tracked = false;
        self
    }

    /// Whether the tensors handed out are tracked (trainable).
    pub(crate) fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// Whether the file holds a tensor `name` (always false for random parameters).
    pub(crate) fn contains(&self, name: &str) -> bool {
        matches!(&self.source, Source::File { tensors, .. } if tensors.contains_key(name))
    }

    /// Drops the file's tensor `name`, if any: a buffer saved beside the parameters that the
    /// model does not use, so [`ParamBuilder::finish`] does not report it as unexpected.
    pub(crate) fn discard(&mut self, name: &str) {
        if let Source::File { tensors, .. } = &mut self.source {
            tensors.remove(name);
        }
    }

    /// The parameter `name` of the given shape, as a tracked tensor (detached when
    /// [`ParamBuilder::frozen`]; it shares the variable's storage either way).
    ///
    /// Problems (missing or mis-shaped in the file) are recorded and reported together by
    /// [`ParamBuilder::finish`]; a zero placeholder keeps construction going until then.
    pub(crate) fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> candle_core::Result<Tensor> {
        let value = match &mut self.source {
            Source::File { tensors, .. } => match tensors.remove(name) {
                None => {
                    self.problems.push(format!("missing tensor `{name}` (shape {shape:?})"));
                    None
                }
                Some(t) if t.dims() != shape => {
                    self.problems.push(format!(
                        "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                        t.dims()
                    ));
                    None
                }
                Some(t) if !t.dtype().is_float() => {
                    self.problems
                        .push(format!("tensor `{name}` has non-float dtype {:?}", t.dtype()));
                    None
                }
                Some(t) => Some(t.to_dtype(DType::F32)?.to_device(&self.device)?),
            },
            Source::Random(rng) => Some(random_tensor(rng, shape, init, &self.device)?),
        };
        let value = match value {
            Some(v) => v,
            None => Tensor::zeros(shape, DType::F32, &self.device)?,
        };
        let var = Var::from_tensor(&value)?;
        let tensor = if self.tracked { var.as_tensor().clone() } else { var.as_tensor().detach() };
        if self.vars.insert(name.to_string(), var).is_some() {
            candle_core::bail!(
                "parameter `{name}` requested twice (a bug in the model definition)"
            );
        }
        Ok(tensor)
    }

    /// All parameters, or one error listing everything that did not match the file.
    pub(crate) fn finish(self) -> Result<BTreeMap<String, Var>, UNetError> {
        let mut problems = self.problems;
        if let Source::File { path, tensors } = self.source {
            let mut unexpected: Vec<&String> = tensors.keys().collect();
            unexpected.sort();
            problems.extend(unexpected.iter().map(|n| format!("unexpected tensor `{n}`")));
            if !problems.is_empty() {
                let total = problems.len();
                let mut message = format!(
                    "the weights do not match the UNet described by config.json ({total} problems; \
                     is config.json from the same model?):"
                );
                for p in problems.iter().take(12) {
                    message.push_str("\n  - ");
                    message.push_str(p);
                }
                if total > 12 {
                    message.push_str(&format!("\n  - ... and {} more", total - 12));
                }
                return Err(UNetError::Weights { path, message });
            }
        }
        Ok(self.vars)
    }
}

/// A tensor drawn per `init`; uniform values use the top 24 bits of ChaCha8 words.
fn random_tensor(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    init: Init,
    device: &Device,
) -> candle_core::Result<Tensor> {
    match init {
        Init::Ones => Tensor::ones(shape, DType::F32, device),
        Init::Zeros => Tensor::zeros(shape, DType::F32, device),
        Init::Uniform { fan_in } => {
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let unit = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
                    (2.0 * unit - 1.0) * bound
                })
                .collect();
            Tensor::from_vec(values, shape, device)
        }
    }
}

/// Writes `vars` (by name, f32) to a safetensors file with diffusers' `{"format": "pt"}`
/// metadata, atomically: a temporary file in the same folder renamed into place.
pub(crate) fn save(vars: &BTreeMap<String, Var>, path: &Path) -> Result<(), UNetError> {
    let io_error = |source| UNetError::Io { path: path.to_path_buf(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let tensors: Vec<(&String, Tensor)> = vars
        .iter()
        .map(|(name, var)| Ok((name, var.as_tensor().to_dtype(DType::F32)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (*n, t)), Some(metadata), &tmp)
        .map_err(|e| UNetError::Weights {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        })?;
    std::fs::rename(&tmp, path).map_err(io_error)
}
