//! Errors of the captioning model, kept apart from stage errors so callers outside a stage (the
//! benchmark) can use the model too.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    /// The model folder is incomplete or inconsistent (config, weights, tokenizer).
    #[error("BLIP model: {0}")]
    Model(String),
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
