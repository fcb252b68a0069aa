//! sdpipe's image-quality metric stages, computed exactly as the reference tools do:
//! `fid` (FID as pytorch-fid, plus KID as clean-fid) and `lpips` (LPIPS v0.1 as the `lpips`
//! package), and the weights conversion behind `sdpipe convert-weights`.
//!
//! Modules: [`inception`] and [`lpips`] are the networks (their convolutions in [`conv`], their
//! max pooling in [`pool`]; [`device_path`] chooses between the CPU kernels and candle's ops,
//! which run on any device), [`frechet`] and [`kid`] the statistics, [`images`] the image inputs
//! and their deterministic resizing, [`weights`], [`convert`] and [`pth`] the weights files,
//! [`recipe`] the deterministic random stand-in weights; the kinds live in `fid_stage` and
//! `lpips_stage`.

use std::sync::Arc;

use sdpipe_stages::api::StageKind;

pub mod conv;
pub mod convert;
/// The CPU-kernel-or-generic-path rule, shared with the other computing crates.
pub use sdpipe_stages::device_path;
mod fid_stage;
pub mod frechet;
pub mod images;
pub mod inception;
pub mod kid;
pub mod lpips;
mod lpips_stage;
pub mod pool;
pub mod pth;
pub mod recipe;
mod stage_common;
pub mod weights;

pub use convert::{convert_weights, ConvertError, Converted, WeightsKind};
pub use fid_stage::Fid;
pub use lpips_stage::LpipsKind;

/// The stage kinds of this crate, for registration in the binary.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![Arc::new(Fid), Arc::new(LpipsKind)]
}
