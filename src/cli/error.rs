//! The command line's one error type, and the exit code each kind of error ends the process
//! with ([`exit`](super::exit), documented in the README).

use std::path::PathBuf;

use crate::spec::SpecErrors;

use super::exit;

#[derive(Debug, thiserror::Error)]
pub(super) enum CliError {
    /// The pipeline (or a stage named on the command line) is invalid; every error is located
    /// (and printed as JSON too when `--json` was asked for).
    #[error("the pipeline is invalid")]
    Spec(SpecErrors, bool),
    /// The command line asks for something that cannot be.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing something failed: what was being done, and why.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A published weights file could not be converted.
    #[error("converting {}: {source}", path.display())]
    Convert {
        path: PathBuf,
        #[source]
        source: Box<sdpipe_metrics::ConvertError>,
    },
}

impl CliError {
    /// Invalid input is 2 (nothing ran); a failure while doing the work is 1.
    pub(super) fn exit_code(&self) -> i32 {
        match self {
            CliError::Spec(..) | CliError::Usage(_) => exit::INVALID,
            CliError::Io { .. } | CliError::Convert { .. } => exit::FAILED,
        }
    }
}
