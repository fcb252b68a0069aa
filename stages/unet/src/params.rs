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
//!
//! A builder may also carry LoRA work ([`ParamBuilder::with_lora`], see [`crate::lora`]):
//! trainable adapters handed to the linear layers it targets, or LoRA files whose products are
//! merged into the weights they target as those are loaded. Its shapes are checked in the same
//! header-only dry run as the weights'.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::autocast::Autocast;
use crate::error::UNetError;
use crate::lora::{LoraAdapter, LoraBuild, TrainedAdapters};
use crate::weights::WeightFiles;

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
    /// N(0, std²) (peft's "gaussian" LoRA init), by the Box–Muller transform.
    Normal {
        std: f32,
    },
}

/// Whether a weight file is a PyTorch pickle (`.bin`, `.pt`, `.pth`) rather than safetensors,
/// by its name, as diffusers and transformers name them.
pub fn is_pickle(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
}

enum Source {
    /// Tensors of one or more weight files (shards), read one at a time when asked for.
    File {
        weights: Arc<WeightFiles>,
        /// The files' tensors not yet handed out (or discarded).
        remaining: HashSet<String>,
        /// Check names and shapes against the headers only: nothing is read or allocated.
        dry: bool,
    },
    Random(Box<ChaCha8Rng>),
}

/// Hands out named parameters while the model is built; see the module docs.
pub(crate) struct ParamBuilder {
    source: Source,
    device: Device,
    vars: BTreeMap<String, Var>,
    /// Every name asked for (a name asked twice is a bug in the model definition).
    requested: HashSet<String>,
    problems: Vec<String>,
    /// Hand out tracked tensors (training) or detached ones (inference).
    tracked: bool,
    /// What is being built, for errors (`UNet`, `VAE`, `text encoder`).
    model: &'static str,
    /// LoRA adapters to create or LoRA files to merge, if any.
    lora: Option<LoraBuild>,
    /// The model's autocast setting, handed to each layer built.
    autocast: Autocast,
    /// What the tensors handed out are held in (f32 unless [`ParamBuilder::held_in`]).
    held_in: DType,
}

impl ParamBuilder {
    /// Parameters read from a safetensors file in diffusers' layout.
    pub(crate) fn from_file(path: &Path, device: &Device) -> Result<Self, UNetError> {
        Self::from_files(&[path.to_path_buf()], device)
    }

    /// Parameters read from the shards of one state dict (or a single file); a tensor found in
    /// two shards is an error. Files are safetensors, or PyTorch pickles (`.bin`, `.pt`,
    /// `.pth`: diffusers' `safe_serialization=False`), told apart by extension. Only the
    /// files' headers are read here (see [`WeightFiles`]); each tensor's data is read when the
    /// model asks for it, after its shape has been checked.
    pub(crate) fn from_files(paths: &[PathBuf], device: &Device) -> Result<Self, UNetError> {
        let weights = WeightFiles::open(paths).map_err(|e| match e {
            UNetError::Input(_) => UNetError::Input("no UNet weights file given".into()),
            e => e,
        })?;
        let remaining = weights.tensors().keys().cloned().collect();
        Ok(ParamBuilder {
            source: Source::File { weights: Arc::new(weights), remaining, dry: false },
            device: device.clone(),
            vars: BTreeMap::new(),
            requested: HashSet::new(),
            problems: Vec::new(),
            tracked: true,
            model: "UNet",
            lora: None,
            autocast: Autocast::default(),
            held_in: DType::F32,
        })
    }

    /// Parameters drawn from a ChaCha8 generator seeded with `seed`.
    pub(crate) fn random(seed: u64, device: &Device) -> Self {
        ParamBuilder {
            source: Source::Random(Box::new(ChaCha8Rng::seed_from_u64(seed))),
            device: device.clone(),
            vars: BTreeMap::new(),
            requested: HashSet::new(),
            problems: Vec::new(),
            tracked: true,
            model: "UNet",
            lora: None,
            autocast: Autocast::default(),
            held_in: DType::F32,
        }
    }

    /// The parameters held in `dtype` (converted after any LoRA merge, which is done in f32):
    /// a half type for an inference model, as diffusers' `torch_dtype` holds them.
    pub(crate) fn held_in(mut self, dtype: DType) -> Self {
        self.held_in = dtype;
        self
    }

    /// The same parameters handed out detached, for a model that only runs inference.
    pub(crate) fn frozen(mut self) -> Self {
        self.tracked = false;
        self
    }

    /// Adds LoRA work: adapters for [`ParamBuilder::adapter`] or files to merge into weights.
    pub(crate) fn with_lora(mut self, lora: LoraBuild) -> Self {
        self.lora = Some(lora);
        self
    }

    /// Names the model in errors (default `UNet`).
    pub(crate) fn for_model(mut self, model: &'static str) -> Self {
        self.model = model;
        self
    }

    /// The autocast handle every layer of the model shares (see [`crate::autocast`]).
    pub(crate) fn autocast(&self) -> Autocast {
        self.autocast.clone()
    }

    /// Whether the tensors handed out are tracked (trainable).
    pub(crate) fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// Whether the file holds a tensor `name` (always false for random parameters).
    pub(crate) fn contains(&self, name: &str) -> bool {
        matches!(&self.source, Source::File { remaining, .. } if remaining.contains(name))
    }

    /// Drops the file's tensor `name`, if any: a buffer saved beside the parameters that the
    /// model does not use, so [`ParamBuilder::finish`] does not report it as unexpected.
    pub(crate) fn discard(&mut self, name: &str) {
        if let Source::File { remaining, .. } = &mut self.source {
            remaining.remove(name);
        }
    }

    /// Builds the model with `build` twice when the parameters come from files: first over the
    /// files' headers alone, so every missing, unexpected or mis-shaped tensor is reported
    /// before any tensor data is read and nothing is allocated from the config's sizes; then
    /// for real. (Building is cheap: the modules only hold the tensors handed out.)
    pub(crate) fn build_checked<T>(
        self,
        build: impl Fn(ParamBuilder) -> Result<T, UNetError>,
    ) -> Result<T, UNetError> {
        if let Source::File { weights, remaining, .. } = &self.source {
            let dry = ParamBuilder {
                source: Source::File {
                    weights: weights.clone(),
                    remaining: remaining.clone(),
                    dry: true,
                },
                device: self.device.clone(),
                vars: BTreeMap::new(),
                requested: HashSet::new(),
                problems: Vec::new(),
                tracked: self.tracked,
                model: self.model,
                lora: self.lora.as_ref().map(LoraBuild::for_dry_run),
                autocast: Autocast::default(),
                held_in: self.held_in,
            };
            build(dry)?;
        }
        build(self)
    }

    /// The parameter `name` of the given shape, as a tracked tensor (detached when
    /// [`ParamBuilder::frozen`]; it shares the variable's storage either way).
    ///
    /// Problems (missing or mis-shaped in the file) are recorded and reported together by
    /// [`ParamBuilder::finish`]; until then a placeholder keeps construction going: zeros
    /// broadcast to the shape, which allocate nothing whatever the shape (nor does a dry run's
    /// placeholder for a tensor that is fine).
    pub(crate) fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> candle_core::Result<Tensor> {
        if !self.requested.insert(name.to_string()) {
            candle_core::bail!(
                "parameter `{name}` requested twice (a bug in the model definition)"
            );
        }
        if let Some(lora) = &mut self.lora {
            lora.check(name, shape);
        }
        let failing =
            !self.problems.is_empty() || self.lora.as_ref().is_some_and(LoraBuild::failing);
        let value = match &mut self.source {
            Source::File { weights, remaining, dry } => {
                let stored =
                    if remaining.remove(name) { weights.tensors().get(name) } else { None };
                match stored {
                    None => {
                        self.problems.push(format!("missing tensor `{name}` (shape {shape:?})"));
                        None
                    }
                    Some(t) if t.shape != shape => {
                        self.problems.push(format!(
                            "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                            t.shape
                        ));
                        None
                    }
                    Some(t) if !t.dtype.as_ref().is_ok_and(|d| d.is_float()) => {
                        let dtype = match &t.dtype {
                            Ok(d) => format!("{d:?}"),
                            Err(name) => name.clone(),
                        };
                        self.problems.push(format!("tensor `{name}` has non-float dtype {dtype}"));
                        None
                    }
                    // Nothing is read once the build is known to fail.
                    Some(_) if *dry || failing => None,
                    Some(_) => Some(
                        weights
                            .load(name)
                            .map_err(candle_core::Error::wrap)?
                            .to_dtype(DType::F32)?
                            .to_device(&self.device)?,
                    ),
                }
            }
            Source::Random(rng) => Some(random_tensor(rng, shape, init, &self.device)?),
        };
        let Some(mut value) = value else {
            return placeholder(shape, &self.device);
        };
        if let Some(lora) = &self.lora {
            value = lora.merge(name, value)?;
        }
        let value = value.to_dtype(self.held_in)?;
        let var = Var::from_tensor(&value)?;
        let tensor = if self.tracked { var.as_tensor().clone() } else { var.as_tensor().detach() };
        self.vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    /// The LoRA adapter of the linear layer `module` (`inputs` → `outputs`) when the builder
    /// trains adapters and one of its targets names that layer; see [`crate::lora`].
    pub(crate) fn adapter(
        &mut self,
        module: &str,
        inputs: usize,
        outputs: usize,
    ) -> candle_core::Result<Option<LoraAdapter>> {
        match &mut self.lora {
            Some(lora) => lora.adapter(module, inputs, outputs, &self.device),
            None => Ok(None),
        }
    }

    /// All parameters, or one error listing everything that did not match the file. (A dry
    /// run's are none: it only checks.)
    pub(crate) fn finish(self) -> Result<BTreeMap<String, Var>, UNetError> {
        self.finish_with_lora().map(|(vars, _)| vars)
    }

    /// [`ParamBuilder::finish`], then the LoRA work's own checks (a target that matched
    /// nothing, a LoRA layer that fits no weight), and the trained adapters if any.
    pub(crate) fn finish_with_lora(
        self,
    ) -> Result<(BTreeMap<String, Var>, Option<TrainedAdapters>), UNetError> {
        let mut problems = self.problems;
        if let Source::File { weights, remaining, .. } = self.source {
            let path = weights.paths()[0].clone();
            let mut unexpected: Vec<&String> = remaining.iter().collect();
            unexpected.sort();
            problems.extend(unexpected.iter().map(|n| format!("unexpected tensor `{n}`")));
            if !problems.is_empty() {
                let model = self.model;
                let message = problem_list(
                    &format!(
                        "the weights do not match the {model} described by config.json ({} \
                         problems; is config.json from the same model?):",
                        problems.len()
                    ),
                    &problems,
                );
                return Err(UNetError::Weights { path, message });
            }
        }
        let adapters = match self.lora {
            Some(lora) => lora.finish()?,
            None => None,
        };
        Ok((self.vars, adapters))
    }
}

/// `header` followed by the first dozen `problems`, one per line, and how many more there are.
pub(crate) fn problem_list(header: &str, problems: &[String]) -> String {
    let mut message = header.to_string();
    for p in problems.iter().take(12) {
        message.push_str("\n  - ");
        message.push_str(p);
    }
    if problems.len() > 12 {
        message.push_str(&format!("\n  - ... and {} more", problems.len() - 12));
    }
    message
}

/// Zeros broadcast to `shape`: a stand-in that allocates nothing whatever the shape, for a
/// build that only checks shapes or is already known to fail.
pub(crate) fn placeholder(shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), DType::F32, device)?.broadcast_as(shape)
}

/// A uniform value in [0, 1) from the top 24 bits of a ChaCha8 word (exact in f32).
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// A tensor drawn per `init`; uniform values use the top 24 bits of ChaCha8 words.
pub(crate) fn random_tensor(
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
            let values: Vec<f32> = (0..n).map(|_| (2.0 * unit(rng) - 1.0) * bound).collect();
            Tensor::from_vec(values, shape, device)
        }
        Init::Normal { std } => {
            let n: usize = shape.iter().product();
            let mut values = Vec::with_capacity(n + 1);
            while values.len() < n {
                // 1 - u is in (0, 1]: the logarithm stays finite.
                let radius = (-2.0 * (1.0 - unit(rng)).ln()).sqrt();
                let angle = std::f32::consts::TAU * unit(rng);
                values.push(radius * angle.cos() * std);
                values.push(radius * angle.sin() * std);
            }
            values.truncate(n);
            Tensor::from_vec(values, shape, device)
        }
    }
}

/// Writes `vars` (by name, f32) to a safetensors file with diffusers' `{"format": "pt"}`
/// metadata, atomically: a temporary file in the same folder renamed into place.
pub(crate) fn save(vars: &BTreeMap<String, Var>, path: &Path) -> Result<(), UNetError> {
    save_with_metadata(vars, path, HashMap::new())
}

/// [`save`] with further `metadata` entries beside `format`.
pub(crate) fn save_with_metadata(
    vars: &BTreeMap<String, Var>,
    path: &Path,
    mut metadata: HashMap<String, String>,
) -> Result<(), UNetError> {
    let io_error = |source| UNetError::Io { path: path.to_path_buf(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let tensors: Vec<(&String, Tensor)> = vars
        .iter()
        .map(|(name, var)| Ok((name, var.as_tensor().to_dtype(DType::F32)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    metadata.insert("format".to_string(), "pt".to_string());
    let cannot_write = |message: String| UNetError::Weights { path: path.to_path_buf(), message };
    // Streamed to the file (a UNet is gigabytes), then only the header is rewritten.
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (*n, t)), Some(metadata), &tmp)
        .map_err(|e| cannot_write(format!("cannot write: {e}")))?;
    sort_header_in_place(&tmp).map_err(|e| match e {
        HeaderError::Io(source) => UNetError::Io { path: tmp.clone(), source },
        HeaderError::Malformed(message) => cannot_write(message),
    })?;
    std::fs::rename(&tmp, path).map_err(io_error)
}

enum HeaderError {
    Io(std::io::Error),
    Malformed(String),
}

/// Rewrites a safetensors file's header with its keys in sorted order. The `safetensors` crate
/// writes the metadata from a `HashMap`, so two saves of the same tensors and metadata could
/// differ in bytes; outputs must depend on their inputs alone. The sorted header holds the same
/// compact JSON, so it has the same length: it is padded with spaces to exactly the old one,
/// and the data (and every offset in the header) stays where it is.
fn sort_header_in_place(path: &Path) -> Result<(), HeaderError> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let bad = || HeaderError::Malformed("the written safetensors header is malformed".into());
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(HeaderError::Io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(HeaderError::Io)?;
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| bad())?;
    let mut header = vec![0u8; len];
    file.read_exact(&mut header).map_err(HeaderError::Io)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|_| bad())?;
    // Each value written through a BTreeMap too, so nested keys (the metadata's, a tensor's
    // `dtype`/`shape`/`data_offsets`) come out sorted whatever serde_json's map type is.
    let mut text = String::from("{");
    for (i, (key, value)) in header.iter().enumerate() {
        let inner: BTreeMap<String, serde_json::Value> =
            serde_json::from_value(value.clone()).map_err(|_| bad())?;
        if i > 0 {
            text.push(',');
        }
        text.push_str(&serde_json::to_string(key).expect("strings serialise"));
        text.push(':');
        text.push_str(&serde_json::to_string(&inner).expect("maps serialise"));
    }
    text.push('}');
    if text.len() > len {
        return Err(bad());
    }
    text.extend(std::iter::repeat_n(' ', len - text.len()));
    file.seek(SeekFrom::Start(8)).map_err(HeaderError::Io)?;
    file.write_all(text.as_bytes()).map_err(HeaderError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_files_have_the_same_bytes_whatever_the_metadata_order() {
        let dir = tempfile::tempdir().unwrap();
        let var = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap());
        let vars = BTreeMap::from([("w".to_string(), var.unwrap())]);
        let metadata: HashMap<String, String> =
            (0..16).map(|i| (format!("key{i}"), format!("value{i}"))).collect();
        let save = |name: &str| {
            let path = dir.path().join(name);
            save_with_metadata(&vars, &path, metadata.clone()).unwrap();
            std::fs::read(path).unwrap()
        };
        let first = save("a.safetensors");
        for n in 0..8 {
            assert_eq!(save(&format!("{n}.safetensors")), first);
        }
        let loaded = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(loaded.tensor("w").unwrap().shape(), [2, 2]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["key3"], "value3");
    }

    /// A safetensors file holding `a` = [[0, 1, 2], [3, 4, 5]] (f32).
    fn weights(dir: &Path) -> PathBuf {
        let path = dir.join("w.safetensors");
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a", a)]), &path).unwrap();
        path
    }

    fn is_broadcast_zeros(t: &Tensor) -> bool {
        t.layout().stride().iter().all(|&s| s == 0)
    }

    #[test]
    fn a_tensor_the_config_makes_huge_gets_a_placeholder_that_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut pb = ParamBuilder::from_file(&weights(dir.path()), &Device::Cpu).unwrap();
        // 9.7 GB if it were allocated.
        let t = pb.get("a", &[16384, 16384, 3, 3], Init::Zeros).unwrap();
        assert_eq!(t.dims(), &[16384, 16384, 3, 3]);
        assert!(is_broadcast_zeros(&t), "{:?}", t.layout());
        let err = pb.finish().unwrap_err().to_string();
        assert!(
            err.contains("tensor `a` has shape [2, 3], the config implies [16384, 16384, 3, 3]")
        );
    }

    #[test]
    fn a_missing_tensor_gets_a_placeholder_that_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut pb = ParamBuilder::from_file(&weights(dir.path()), &Device::Cpu).unwrap();
        let t = pb.get("b", &[1 << 20, 1 << 20], Init::Zeros).unwrap();
        assert!(is_broadcast_zeros(&t));
        pb.discard("a");
        let err = pb.finish().unwrap_err().to_string();
        assert!(err.contains("missing tensor `b`"), "{err}");
    }

    #[test]
    fn a_checked_build_runs_first_over_the_headers_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pb = ParamBuilder::from_file(&weights(dir.path()), &Device::Cpu).unwrap();
        let seen = std::cell::RefCell::new(Vec::new());
        pb.build_checked(|mut pb| {
            let t = pb.get("a", &[2, 3], Init::Zeros)?;
            seen.borrow_mut().push(is_broadcast_zeros(&t));
            pb.finish()
        })
        .unwrap();
        assert_eq!(*seen.borrow(), vec![true, false], "dry run first, then the real load");
    }

    #[test]
    fn a_checked_build_stops_at_the_dry_run_when_the_shapes_disagree() {
        let dir = tempfile::tempdir().unwrap();
        let pb = ParamBuilder::from_file(&weights(dir.path()), &Device::Cpu).unwrap();
        let calls = std::cell::Cell::new(0);
        let err = pb
            .build_checked(|mut pb| {
                calls.set(calls.get() + 1);
                pb.get("a", &[3, 2], Init::Zeros)?;
                pb.finish()
            })
            .unwrap_err();
        assert_eq!(calls.get(), 1, "nothing is loaded after a failed dry run: {err}");
    }
}
