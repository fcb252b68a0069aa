//! Errors of loading, running and saving the UNet.

use std::path::PathBuf;

/// What went wrong, with the file involved where there is one.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `config.json` is unreadable or describes an architecture we do not build.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// The weights file does not match the config (missing, unexpected or mis-shaped tensors), or
    /// is not a readable safetensors file.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    /// The inputs of a forward pass do not fit the model.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
