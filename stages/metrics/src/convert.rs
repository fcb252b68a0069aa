//! Converting the published weights files (PyTorch checkpoints) into the safetensors files the
//! metric stages read: the tensors the architecture needs, under the reference tool's names,
//! checked for shape, as f32. Everything else in the checkpoint (Inception's 1008-class `fc`,
//! AlexNet's classifier, BatchNorm's `num_batches_tracked`) is left out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Tensor};

use crate::lpips::{self, Net};
use crate::pth::{self, PthError};
use crate::weights::TensorSpec;

/// A published weights file the stages can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsKind {
    /// pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (FID/KID).
    FidInception,
    /// lpips' `weights/v0.1/alex.pth`: the five linear layers for the AlexNet trunk.
    LpipsAlex,
    /// lpips' `weights/v0.1/vgg.pth`: the five linear layers for the VGG16 trunk.
    LpipsVgg,
    /// torchvision's ImageNet AlexNet `alexnet-owt-7be5be79.pth` (the LPIPS alex trunk).
    Alexnet,
    /// torchvision's ImageNet VGG16 `vgg16-397923af.pth` (the LPIPS vgg trunk).
    Vgg16,
}

impl WeightsKind {
    pub const ALL: [WeightsKind; 5] = [
        WeightsKind::FidInception,
        WeightsKind::LpipsAlex,
        WeightsKind::LpipsVgg,
        WeightsKind::Alexnet,
        WeightsKind::Vgg16,
    ];

    /// The name `sdpipe convert-weights` takes.
    pub fn cli_name(self) -> &'static str {
        match self {
            WeightsKind::FidInception => "fid-inception",
            WeightsKind::LpipsAlex => "lpips-alex",
            WeightsKind::LpipsVgg => "lpips-vgg",
            WeightsKind::Alexnet => "alexnet",
            WeightsKind::Vgg16 => "vgg16",
        }
    }

    /// The converted file's name, which the stages look for by default.
    pub fn default_file_name(self) -> &'static str {
        match self {
            WeightsKind::FidInception => "pt_inception-2015-12-05.safetensors",
            WeightsKind::LpipsAlex => "lpips-v0.1-alex.safetensors",
            WeightsKind::LpipsVgg => "lpips-v0.1-vgg.safetensors",
            WeightsKind::Alexnet => "alexnet-owt-7be5be79.safetensors",
            WeightsKind::Vgg16 => "vgg16-397923af.safetensors",
        }
    }

    /// The published file it is converted from.
    pub fn published_file_name(self) -> &'static str {
        match self {
            WeightsKind::FidInception => "pt_inception-2015-12-05-6726825d.pth",
            WeightsKind::LpipsAlex => "alex.pth",
            WeightsKind::LpipsVgg => "vgg.pth",
            WeightsKind::Alexnet => "alexnet-owt-7be5be79.pth",
            WeightsKind::Vgg16 => "vgg16-397923af.pth",
        }
    }

    /// Where the published file comes from, for error messages.
    pub fn published_from(self) -> &'static str {
        match self {
            WeightsKind::FidInception => {
                "pytorch-fid's release asset: https://github.com/mseitzer/pytorch-fid/releases/\
                 download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
            }
            WeightsKind::LpipsAlex => "shipped in the lpips Python package: lpips/weights/v0.1/",
            WeightsKind::LpipsVgg => "shipped in the lpips Python package: lpips/weights/v0.1/",
            WeightsKind::Alexnet => {
                "torchvision's AlexNet_Weights.IMAGENET1K_V1 (the torch hub checkpoint cache)"
            }
            WeightsKind::Vgg16 => {
                "torchvision's VGG16_Weights.IMAGENET1K_V1 (the torch hub checkpoint cache)"
            }
        }
    }

    /// What the file is, in words.
    pub fn what(self) -> &'static str {
        match self {
            WeightsKind::FidInception => "FID Inception",
            WeightsKind::LpipsAlex => "LPIPS v0.1 alex linear-layer",
            WeightsKind::LpipsVgg => "LPIPS v0.1 vgg linear-layer",
            WeightsKind::Alexnet => "torchvision AlexNet",
            WeightsKind::Vgg16 => "torchvision VGG16",
        }
    }

    /// The tensors the stages read from the converted file.
    pub fn specs(self) -> Vec<TensorSpec> {
        match self {
            WeightsKind::FidInception => crate::inception::tensor_specs(),
            WeightsKind::LpipsAlex => lpips::lin_specs(Net::Alex),
            WeightsKind::LpipsVgg => lpips::lin_specs(Net::Vgg16),
            WeightsKind::Alexnet => lpips::trunk_specs(Net::Alex),
            WeightsKind::Vgg16 => lpips::trunk_specs(Net::Vgg16),
        }
    }
}

impl FromStr for WeightsKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WeightsKind::ALL.into_iter().find(|k| k.cli_name() == s).ok_or_else(|| {
            let names: Vec<_> = WeightsKind::ALL.iter().map(|k| k.cli_name()).collect();
            format!("unknown weights kind `{s}`; expected one of {}", names.join(", "))
        })
    }
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Read(#[from] PthError),
    #[error(
        "{input} has no tensor `{name}`: is it the {what} file ({published})? Found {found} \
         tensors{sample}"
    )]
    Missing {
        input: PathBuf,
        name: String,
        what: &'static str,
        published: &'static str,
        found: usize,
        sample: String,
    },
    #[error("{input}: tensor `{name}` has shape {found:?}, the {what} file has {expected:?}")]
    Shape {
        input: PathBuf,
        name: String,
        what: &'static str,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("cannot write {output}: {message}")]
    Write { output: PathBuf, message: String },
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// Tensors written.
    pub written: usize,
    /// Tensors of the checkpoint left out (unused by the stages).
    pub dropped: Vec<String>,
}

/// Convert a published checkpoint `input` of `kind` into the safetensors file `output`.
pub fn convert_weights(
    kind: WeightsKind,
    input: &Path,
    output: &Path,
) -> Result<Converted, ConvertError> {
    let tensors = pth::read_tensors(input)?;
    // Checkpoints saved from a DataParallel wrapper prefix every name with `module.`.
    let mut by_name: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name.strip_prefix("module.").unwrap_or(&name).to_string(), t))
        .collect();
    let found = by_name.len();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for spec in kind.specs() {
        let Some(tensor) = by_name.remove(&spec.name) else {
            let mut names: Vec<&String> = by_name.keys().collect();
            names.sort();
            let sample = if names.is_empty() {
                String::new()
            } else {
                let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
                format!(", e.g. {}", shown.join(", "))
            };
            return Err(ConvertError::Missing {
                input: input.to_owned(),
                name: spec.name,
                what: kind.what(),
                published: kind.published_file_name(),
                found,
                sample,
            });
        };
        if tensor.dims() != spec.shape.as_slice() {
            return Err(ConvertError::Shape {
                input: input.to_owned(),
                name: spec.name,
                what: kind.what(),
                found: tensor.dims().to_vec(),
                expected: spec.shape,
            });
        }
        let write_err = |e: candle_core::Error| ConvertError::Write {
            output: output.to_owned(),
            message: e.to_string(),
        };
        let tensor = tensor.to_dtype(DType::F32).and_then(|t| t.contiguous()).map_err(write_err)?;
        out.insert(spec.name, tensor);
    }
    let mut dropped: Vec<String> = by_name.into_keys().collect();
    dropped.sort();
    // Write beside the target and rename, so a failed write never leaves a half file in place.
    let tmp = output.with_extension("safetensors.partial");
    candle_core::safetensors::save(&out, &tmp)
        .map_err(|e| ConvertError::Write { output: output.to_owned(), message: e.to_string() })?;
    std::fs::rename(&tmp, output)
        .map_err(|e| ConvertError::Write { output: output.to_owned(), message: e.to_string() })?;
    Ok(Converted { written: out.len(), dropped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_cli_name() {
        for kind in WeightsKind::ALL {
            assert_eq!(kind.cli_name().parse::<WeightsKind>().unwrap(), kind);
        }
        let err = "inception".parse::<WeightsKind>().unwrap_err();
        assert!(err.contains("fid-inception"), "{err}");
    }

    #[test]
    fn inception_needs_94_conv_units_of_five_tensors() {
        // torchvision's Inception3 without AuxLogits has 94 BasicConv2d units.
        assert_eq!(WeightsKind::FidInception.specs().len(), 94 * 5);
    }

    #[test]
    fn lpips_alex_linear_layers_hold_1152_weights() {
        let n: usize =
            WeightsKind::LpipsAlex.specs().iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert_eq!(n, 1152);
    }
}
