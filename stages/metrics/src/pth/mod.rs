//! Reading the tensors of a PyTorch checkpoint (`torch.save` of a state dict), in both container
//! formats `torch.save` has written:
//!
//! - the zip archive (torch ≥ 1.6: `archive/data.pkl` + one file per storage): [`zip`];
//! - the legacy stream (magic number, protocol, system info, the pickled object, the storage
//!   keys, then the raw storages): [`legacy`]. lpips' shipped `alex.pth` is one (pickled by
//!   Python 2, storages tagged `cuda:0`), and so are files written with
//!   `_use_new_zipfile_serialization=False`.
//!
//! Both share one pickle machine ([`pickle`]). candle's `pickle` module reads neither the
//! legacy stream nor tensors stored as strided views, so it is not used.

pub mod legacy;
pub mod pickle;
pub mod zip;

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PyTorch checkpoint I can read: {message}")]
    Format { path: PathBuf, message: String },
}

/// Every tensor of the checkpoint's state dict (or of its `state_dict` entry), by name, in the
/// dtype it was saved in.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, PthError> {
    let mut magic = [0u8; 4];
    let mut file =
        std::fs::File::open(path).map_err(|source| PthError::Io { path: path.into(), source })?;
    let n = file.read(&mut magic).map_err(|source| PthError::Io { path: path.into(), source })?;
    let format_err = |message: String| PthError::Format { path: path.into(), message };
    if n == 4 && magic == *b"PK\x03\x04" {
        zip::read(path).map_err(|e| format_err(e.to_string()))
    } else {
        let bytes =
            std::fs::read(path).map_err(|source| PthError::Io { path: path.into(), source })?;
        legacy::read(&bytes).map_err(|e| format_err(e.to_string()))
    }
}
