//! sdpipe's data stage kinds: `unsplash-lite` (the Unsplash Lite release and its photos),
//! `synthetic` (captioned scenes of a small grammar, for the offline demo), `scene-accuracy`
//! (judging samples of those captions) and `imagefolder` (a Hugging Face imagefolder).
//!
//! Apart from the stage API crate so that the ML crates do not compile an HTTP client, zip and
//! CSV readers they never use.

use std::sync::Arc;

use sdpipe_stages::api::StageKind;

pub mod imagefolder;
pub mod synthetic;
pub mod unsplash;

/// The stage kinds of this crate, for registration in the binary.
pub fn kinds() -> Vec<Arc<dyn StageKind>> {
    vec![
        Arc::new(synthetic::Synthetic),
        Arc::new(synthetic::SceneAccuracy),
        Arc::new(imagefolder::ImageFolder),
        Arc::new(unsplash::UnsplashLite),
    ]
}
