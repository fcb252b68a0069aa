//! What commands print: stdout that ends quietly when its reader goes away, JSON, and the
//! small formats shared by several commands.

use super::exit;
use crate::summary::State;

/// Write command output to stdout. A reader that has gone away (`sdpipe status --json | head`)
/// ends the command quietly, as other Unix tools do; but SIGPIPE itself stays ignored (Rust's
/// default), because a fatal SIGPIPE kills the whole process on *any* closed pipe — a
/// watchdog's, a child's — silently, in the middle of a run.
pub(super) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::OK);
        }
        panic!("failed printing to stdout: {e}");
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    () => { write_out(format_args!("\n")) };
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

pub(super) fn print_json<T: serde::Serialize>(value: &T) {
    outln!("{}", serde_json::to_string_pretty(value).expect("summaries serialise"));
}

pub(super) fn seconds(ms: Option<u64>) -> String {
    ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_default()
}

pub(super) fn state_word(state: State) -> &'static str {
    match state {
        State::Ran => "ran",
        State::Cached => "cached",
        State::Skipped => "skipped",
        State::Failed => "FAILED",
        State::WillRun => "will run",
    }
}
