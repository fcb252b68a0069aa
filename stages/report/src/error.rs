//! What can go wrong while writing a report, each case naming the file and what to do.

use std::path::PathBuf;

use sdpipe_stages::api::StageError;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// An input file that is there but does not follow its stage's data contract.
    #[error("input `{input}`: {} is not a valid {expected}: {message}", path.display())]
    Malformed { input: String, path: PathBuf, expected: &'static str, message: String },
    /// An input that is bound but lacks a file it must contain.
    #[error("input `{input}`: {} not found ({hint})", path.display())]
    Missing { input: String, path: PathBuf, hint: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("drawing the loss plot: {0}")]
    Plot(String),
}

impl From<ReportError> for StageError {
    fn from(e: ReportError) -> Self {
        StageError::caused(e)
    }
}
