//! The machine-readable result of `run` and `status` (`--json`). This shape is a public
//! contract (documented in README.md): add fields, never rename or remove them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::key::Reason;

pub const SUMMARY_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Executed in this run.
    Ran,
    /// Served from the cache.
    Cached,
    /// Not run because an upstream stage failed or the run was interrupted.
    Skipped,
    Failed,
    /// (`status` only) would execute on the next run.
    WillRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReasonOut {
    #[serde(flatten)]
    pub reason: Reason,
    pub message: String,
}

impl From<Reason> for ReasonOut {
    fn from(reason: Reason) -> Self {
        ReasonOut { message: reason.to_string(), reason }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    pub name: String,
    pub kind: String,
    pub state: State,
    /// The stage key (hex), when it could be computed.
    pub key: Option<String>,
    /// Why it ran (or will run); empty when cached.
    pub reasons: Vec<ReasonOut>,
    pub duration_ms: Option<u64>,
    /// Output name → materialised path.
    pub outputs: BTreeMap<String, String>,
    /// The stage's log file, when one exists on disk.
    pub log: Option<String>,
    pub error: Option<String>,
    /// Whether this process waited for another sdpipe process computing the same key.
    pub waited: bool,
    /// The file a person opens after the run (a report), materialised; only for kinds that
    /// have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headline: Option<String>,
    /// What the shared remote cache did for this stage; absent without a remote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteState>,
}

/// A stage's exchange with the remote cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteState {
    /// (`run`) Not computed here: its result was pulled from the remote.
    Pulled,
    /// (`run`) The remote had a result but it failed verification or could not be fetched;
    /// the stage ran locally.
    PullFailed,
    /// (`run`) Computed here and pushed.
    Pushed,
    /// (`run`) Computed here; the remote already had a result for the key.
    AlreadyOnRemote,
    /// (`run`) Computed here; pushing failed (the local result is intact).
    PushFailed,
    /// (`status`) Not in the local cache; the next run will pull it from the remote.
    Available,
}

impl StageSummary {
    pub fn new(name: &str, kind: &str, state: State) -> Self {
        StageSummary {
            name: name.to_string(),
            kind: kind.to_string(),
            state,
            key: None,
            reasons: Vec::new(),
            duration_ms: None,
            outputs: BTreeMap::new(),
            log: None,
            error: None,
            waited: false,
            headline: None,
            remote: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub schema: u32,
    pub command: &'static str,
    pub pipeline: String,
    pub ok: bool,
    pub interrupted: bool,
    pub duration_ms: u64,
    pub stages: Vec<StageSummary>,
}

impl Summary {
    pub fn count(&self, state: State) -> usize {
        self.stages.iter().filter(|s| s.state == state).count()
    }
}
