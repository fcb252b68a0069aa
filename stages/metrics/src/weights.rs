//! Network weights as the metric stages read them: a safetensors file per published weights
//! file, tensors named as in the reference tool's state dict, checked against the architecture's
//! list of tensors before any number is computed; or the deterministic random stand-in of
//! [`crate::recipe`].
//!
//! Also where a weights file is looked for: a value with a path separator is a path; a bare file
//! name is looked up in `$SDPIPE_WEIGHTS_DIR`, then in `~/.cache/sdpipe/weights/`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::convert::WeightsKind;
use crate::recipe::{self, Init};

/// One tensor an architecture needs: its state-dict name, shape, and random-recipe role.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        TensorSpec { name: name.into(), shape: shape.to_vec(), init }
    }
}

/// A weights file that is not where it was looked for.
#[derive(Debug, thiserror::Error)]
#[error(
    "weights file `{file}` not found (looked in: {}). Convert the published file with \
     `sdpipe convert-weights {kind} {published} {suggested}` ({source_hint}), or set the \
     `weights` parameter to its path (or to `random` for a random stand-in network)",
    looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    suggested = suggested.display()
)]
pub struct NotFound {
    pub file: String,
    pub looked: Vec<PathBuf>,
    pub kind: &'static str,
    pub published: &'static str,
    pub source_hint: &'static str,
    pub suggested: PathBuf,
}

/// What went wrong finding or reading weights; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    NotFound(Box<NotFound>),
    #[error("cannot read weights file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot write weights file {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(
        "weights file {path} lacks tensor `{name}` (is it the converted {what} file? convert \
         the published file with `sdpipe convert-weights`)"
    )]
    Missing { path: PathBuf, name: String, what: &'static str },
    #[error("weights file {path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("weights file {path}: tensor `{name}` holds non-finite values")]
    NotFinite { path: PathBuf, name: String },
}

/// Where a set of weights came from, for `metrics.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    Random { seed: u64 },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Random { seed } => {
                write!(f, "random (deterministic stand-in, seed {seed}: NOT the published weights)")
            }
        }
    }
}

/// A validated set of named f32 tensors.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    pub source: Source,
}

impl Weights {
    /// Read `path` and check that it holds every tensor of `specs` with the right shape.
    pub fn load(
        path: &Path,
        specs: &[TensorSpec],
        what: &'static str,
    ) -> Result<Weights, WeightsError> {
        let read_err = |message: String| WeightsError::Read { path: path.to_owned(), message };
        let mut all = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| read_err(e.to_string()))?;
        let mut tensors = HashMap::with_capacity(specs.len());
        for spec in specs {
            let tensor = all.remove(&spec.name).ok_or_else(|| WeightsError::Missing {
                path: path.to_owned(),
                name: spec.name.clone(),
                what,
            })?;
            if tensor.dims() != spec.shape.as_slice() {
                return Err(WeightsError::Shape {
                    path: path.to_owned(),
                    name: spec.name.clone(),
                    found: tensor.dims().to_vec(),
                    expected: spec.shape.clone(),
                });
            }
            let tensor = tensor.to_dtype(DType::F32).map_err(|e| read_err(e.to_string()))?;
            let finite = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| read_err(e.to_string()))?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                return Err(WeightsError::NotFinite {
                    path: path.to_owned(),
                    name: spec.name.clone(),
                });
            }
            tensors.insert(spec.name.clone(), tensor);
        }
        Ok(Weights { tensors, source: Source::File(path.to_owned()) })
    }

    /// Write the tensors as a converted weights file (what `sdpipe convert-weights` writes):
    /// f32 safetensors, through a temporary file renamed into place. Tests use it to put the
    /// random stand-in where a user puts the converted published weights.
    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        let write_err = |e: &dyn fmt::Display| WeightsError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let tmp = path.with_extension("safetensors.partial");
        candle_core::safetensors::save(&self.tensors, &tmp).map_err(|e| write_err(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| write_err(&e))
    }

    /// The deterministic random stand-in for `specs` (see [`crate::recipe`]).
    pub fn random(specs: &[TensorSpec], seed: u64) -> Weights {
        let tensors = specs
            .iter()
            .map(|spec| {
                let n = spec.shape.iter().product();
                let values = recipe::values(&spec.name, n, spec.init, seed);
                let tensor = Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)
                    .expect("shape and length agree by construction");
                (spec.name.clone(), tensor)
            })
            .collect();
        Weights { tensors, source: Source::Random { seed } }
    }

    /// Merge two validated sets (LPIPS: trunk + linear layers).
    pub fn merged(mut self, other: Weights) -> Weights {
        self.tensors.extend(other.tensors);
        self
    }

    /// A tensor the specs promised. Asking for another name is a programming error, reported as
    /// an error rather than a panic all the same.
    pub fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("weights lack tensor `{name}`")))
    }
}

/// The directories a bare weights file name is looked up in, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("SDPIPE_WEIGHTS_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        dirs.push(Path::new(&home).join(".cache").join("sdpipe").join("weights"));
    }
    dirs
}

/// Resolve a `weights` parameter value (not `random`) to an existing file.
pub fn locate(value: &str, kind: WeightsKind) -> Result<PathBuf, WeightsError> {
    let value = if value.is_empty() { kind.default_file_name() } else { value };
    let is_path = value.contains(std::path::MAIN_SEPARATOR) || value.contains('/');
    let looked: Vec<PathBuf> = if is_path {
        vec![PathBuf::from(value)]
    } else {
        search_dirs().into_iter().map(|dir| dir.join(value)).collect()
    };
    if let Some(found) = looked.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let suggested = if is_path {
        PathBuf::from(value)
    } else {
        search_dirs().first().cloned().unwrap_or_else(|| PathBuf::from(".")).join(value)
    };
    Err(WeightsError::NotFound(Box::new(NotFound {
        file: value.to_string(),
        looked,
        kind: kind.cli_name(),
        published: kind.published_file_name(),
        source_hint: kind.published_from(),
        suggested,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("a.weight", &[2, 3], Init::Conv { fan_in: 3 }),
            TensorSpec::new("a.bias", &[2], Init::Bias),
        ]
    }

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> =
            tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn random_weights_follow_the_specs_shapes() {
        let w = Weights::random(&specs(), 3);
        assert_eq!(w.get("a.weight").unwrap().dims(), &[2, 3]);
        assert_eq!(w.source, Source::Random { seed: 3 });
    }

    #[test]
    fn a_file_missing_a_tensor_is_an_error_naming_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save(&path, &[("a.weight", Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap())]);
        let err = Weights::load(&path, &specs(), "test").err().unwrap().to_string();
        assert!(err.contains("a.bias") && err.contains("w.safetensors"), "{err}");
    }

    #[test]
    fn a_tensor_of_the_wrong_shape_is_an_error_with_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save(
            &path,
            &[
                ("a.weight", Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap()),
                ("a.bias", Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()),
            ],
        );
        let err = Weights::load(&path, &specs(), "test").err().unwrap().to_string();
        assert!(err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");
    }

    #[test]
    fn f16_weights_are_widened_to_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save(
            &path,
            &[
                ("a.weight", Tensor::ones((2, 3), DType::F16, &Device::Cpu).unwrap()),
                ("a.bias", Tensor::ones(2, DType::F16, &Device::Cpu).unwrap()),
            ],
        );
        let w = Weights::load(&path, &specs(), "test").unwrap();
        assert_eq!(w.get("a.bias").unwrap().dtype(), DType::F32);
    }

    #[test]
    fn a_missing_file_error_names_the_places_looked_and_the_convert_command() {
        let err = locate("/nonexistent/dir/inception.safetensors", WeightsKind::FidInception)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/dir/inception.safetensors"), "{err}");
        assert!(err.contains("sdpipe convert-weights fid-inception"), "{err}");
        assert!(err.contains("pt_inception-2015-12-05-6726825d.pth"), "{err}");
    }
}
