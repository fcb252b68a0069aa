//! sdpipe's image-quality metric stages, computed exactly as the reference tools do:
//! `fid` (FID as pytorch-fid, plus KID as clean-fid), `lpips` (LPIPS v0.1 as the `lpips`
//! package), `cmmd` (CMMD as google-research/cmmd) and `clip-score` (CLIPScore as
//! torchmetrics), and the weights conversion behind `sdpipe convert-weights`.
//!
//! Modules: [`inception`] and [`lpips`] are the networks (their convolutions in [`conv`], their
//! max pooling in [`pool`]; [`device_path`] chooses between the CPU kernels and candle's ops,
//! which run on any device), [`frechet`] and [`kid`] the statistics, [`images`] the image inputs
//! and their deterministic resizing, [`weights`], [`convert`] and [`pth`] the weights files,
//! [`recipe`] the deterministic random stand-in weights; [`clip`] the CLIP model the `cmmd` and
//! `clip-score` kinds share (a hub model in the transformers layout, with its preprocessing),
//! [`mmd`] CMMD's statistic; the kinds live in `fid_stage`, `lpips_stage`, `cmmd_stage` and
//! `clip_score_stage`, and `tiny_clip_stage` holds `tiny-clip`, which writes a random-weight
//! CLIP folder for those two kinds to load offline (the demo).

use std::sync::Arc;

use sdpipe_stages::api::StageKind;

pub mod clip;
mod clip_score_stage;
mod cmmd_stage;
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
pub mod mmd;
pub mod pool;
pub mod pth;
pub mod recipe;
mod stage_common;
mod tiny_clip_stage;
pub mod weights;

pub use clip_score_stage::ClipScore;
pub use cmmd_stage::Cmmd;
pub use convert::{convert_weights, ConvertError, Converted, WeightsKind};
pub use fid_stage::Fid;
pub use lpips_stage::LpipsKind;
pub use tiny_clip_stage::{
    write_tiny_clip, TinyClip, TinyClipSpec, WrittenClip, LOGIT_SCALE_INIT, TRANSFORMERS_VERSION,
};

/// The stage kinds of this crate, for registration in the binary.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![
        Arc::new(Fid),
        Arc::new(LpipsKind),
        Arc::new(Cmmd::default()),
        Arc::new(ClipScore::default()),
        Arc::new(TinyClip),
    ]
}
