//! BLIP image captioning for sdpipe: the `caption` stage kind and the model behind it.
//!
//! - [`preprocess`]: images to pixel tensors exactly as transformers' `BlipImageProcessor`
//!   (Pillow backend) makes them (with `sdpipe_stages::pillow`'s bicubic);
//! - [`model`]: a BLIP model folder loaded into candle (vision transformer from
//!   candle-transformers, text decoder from [`decoder`]);
//! - [`generate`]: transformers' beam search and greedy decoding;
//! - [`caption_stage`]: the `caption` kind.

pub mod caption_stage;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod model;
pub mod preprocess;

use std::sync::Arc;

use sdpipe_stages::api::StageKind;

pub use caption_stage::Caption;
pub use error::CaptionError;
pub use model::{Blip, Decoding, ModelFiles};

/// The stage kinds this crate provides.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![Arc::new(Caption::default())]
}
