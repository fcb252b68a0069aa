//! What a run reports as it goes. The scheduler decides and emits [`Event`]s; a [`Reporter`]
//! turns them into what a person sees (the terminal UI prints each as one line, above the
//! progress bars). The words live here, apart from the scheduling logic, as cargo renders its
//! `DirtyReason`s apart from the fingerprint logic: a change of wording, or another reporter
//! (an event stream), never touches the scheduler.

use std::fmt;

use crate::key::Reason;

/// One step of one stage.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The stage starts computing, and why it must.
    Started { stage: &'a str, kind: &'a str, reasons: &'a [Reason] },
    /// Another sdpipe process holds the stage's key: this one waits to reuse its result.
    Waiting { stage: &'a str, pid: Option<u32>, key: &'a str },
    /// The stage's result was reused: from this cache, or pulled from the remote one.
    Reused { stage: &'a str, pulled: bool },
    /// The stage ran and its outputs are stored.
    Ran { stage: &'a str, seconds: f64 },
    /// The stage failed; nothing of it is recorded.
    Failed { stage: &'a str, error: &'a str },
}

impl fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Event::Started { stage, kind, reasons } => {
                let why: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                write!(f, "▶ {stage} ({kind}): {}", why.join("; "))
            }
            Event::Waiting { stage, pid, key } => {
                let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                write!(f, "… {stage} waiting: another sdpipe process{who} is computing key {key}")
            }
            Event::Reused { stage, pulled: true } => write!(f, "✓ {stage} pulled from remote"),
            Event::Reused { stage, pulled: false } => write!(f, "✓ {stage} cached"),
            Event::Ran { stage, seconds } => write!(f, "✓ {stage} ran in {seconds:.1}s"),
            Event::Failed { stage, error } => write!(f, "✗ {stage} failed: {error}"),
        }
    }
}

/// Consumes a run's events.
pub trait Reporter {
    fn report(&self, event: &Event<'_>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_one_line_a_person_reads() {
        let reasons = [Reason::NewStage, Reason::Forced];
        let lines = [
            Event::Started { stage: "train", kind: "train", reasons: &reasons },
            Event::Waiting { stage: "train", pid: Some(42), key: "ab12cd" },
            Event::Waiting { stage: "train", pid: None, key: "ab12cd" },
            Event::Reused { stage: "caption", pulled: false },
            Event::Reused { stage: "caption", pulled: true },
            Event::Ran { stage: "fid", seconds: 12.345 },
            Event::Failed { stage: "fid", error: "no weights" },
        ]
        .map(|e| e.to_string());
        assert_eq!(
            lines,
            [
                format!("▶ train (train): {}; {}", Reason::NewStage, Reason::Forced),
                "… train waiting: another sdpipe process (pid 42) is computing key ab12cd".into(),
                "… train waiting: another sdpipe process is computing key ab12cd".into(),
                "✓ caption cached".into(),
                "✓ caption pulled from remote".into(),
                "✓ fid ran in 12.3s".into(),
                "✗ fid failed: no weights".into(),
            ]
        );
    }
}
