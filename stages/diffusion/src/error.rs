//! Errors from reading, loading and writing Stable Diffusion pipeline folders. Each names the
//! file involved and, where there is one, what to do about it.

use std::path::PathBuf;

use sdpipe_stages::api::StageError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: missing; {hint}")]
    Missing { path: PathBuf, hint: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid config: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("{path}: {message} (sdpipe runs Stable Diffusion 1.x-shaped models)")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: cannot load the weights: {source}")]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// The UNet folder could not be loaded (the message names the file and what is wrong).
    #[error("loading the UNet: {0}")]
    UNet(String),
    /// The text encoder could not be loaded for training (the message names the file).
    #[error("loading the text encoder for training: {0}")]
    TrainableTextEncoder(String),
    /// The model could not be found or fetched (local folder, Hugging Face cache, hub).
    /// Boxed: a hub error is 120 bytes, and every `Result` of this crate would carry that.
    #[error(transparent)]
    Hub(Box<sdpipe_hub::HubError>),
    #[error("{path}: bad tokenizer files: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A weight file that is not what it claims to be (a lying or truncated header).
    #[error("{path}: {message}")]
    BadWeights { path: PathBuf, message: String },
    /// A config whose sizes disagree with the shapes its weight files hold (read from their
    /// headers, before anything is loaded).
    #[error("{config}: {message}, in {weights} (is config.json from the same model?)")]
    ConfigDisagrees { config: PathBuf, weights: PathBuf, message: String },
}

impl From<sdpipe_hub::HubError> for PipelineError {
    fn from(e: sdpipe_hub::HubError) -> Self {
        PipelineError::Hub(Box::new(e))
    }
}

impl From<PipelineError> for StageError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Hub(e) if matches!(*e, sdpipe_hub::HubError::NotLocal { .. }) => {
                StageError::NotLocal(e.to_string())
            }
            e => StageError::caused(e),
        }
    }
}
