//! What a person sees while a pipeline runs: progress bars on a terminal, plain lines otherwise.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sdpipe_stages::api::Progress;

use crate::events::{Event, Reporter};

/// The bars on screen, if any: log lines are printed above them through [`LogWriter`].
static BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Where log lines go (the tracing subscriber's writer): stderr, or, while progress bars are
/// drawn, stderr with the bars lifted for the line, so a warning never tears them.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bars = BARS.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match bars {
            Some(bars) => bars.suspend(|| io::stderr().write(buf)),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

pub struct Ui {
    multi: MultiProgress,
    overall: ProgressBar,
    interactive: bool,
    quiet: bool,
}

impl Drop for Ui {
    fn drop(&mut self) {
        if self.interactive {
            *BARS.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

impl Ui {
    /// `quiet` silences per-stage lines (used with `--json`); errors still reach stderr.
    pub fn new(total: u64, quiet: bool) -> Ui {
        let interactive = !quiet && std::io::stderr().is_terminal();
        let target =
            if interactive { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(total));
        overall.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} stages {msg}",
            )
            .expect("valid template"),
        );
        if interactive {
            overall.enable_steady_tick(Duration::from_millis(120));
            *BARS.lock().unwrap_or_else(|p| p.into_inner()) = Some(multi.clone());
        }
        Ui { multi, overall, interactive, quiet }
    }

    /// A line above the bars (or on stderr).
    pub fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        if self.interactive {
            self.multi.println(text).ok();
        } else {
            eprintln!("{text}");
        }
    }

    pub fn stage_bar(&self, stage: &str) -> StageBar {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template(
                "  {spinner} {prefix:.bold} {wide_msg} {pos}/{len} {per_sec}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(stage.to_string());
        if self.interactive {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        StageBar { bar }
    }

    /// A bar for the files a stage downloads before it runs (its models): drawn only once a
    /// download starts, with a line per file, and removed when dropped.
    pub fn download_bar(&self, stage: &str) -> DownloadBar<'_> {
        DownloadBar {
            ui: self,
            stage: stage.to_string(),
            bar: std::sync::OnceLock::new(),
            last: std::sync::Mutex::new(String::new()),
        }
    }

    pub fn finish_stage(&self, bar: StageBar) {
        bar.bar.finish_and_clear();
        self.multi.remove(&bar.bar);
        self.overall.inc(1);
    }

    pub fn skip_stage(&self) {
        self.overall.inc(1);
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

impl Reporter for Ui {
    /// Each event as one line above the bars (or on stderr; nothing when quiet).
    fn report(&self, event: &Event<'_>) {
        self.line(&event.to_string());
    }
}

/// One running stage's bar; the stage reports through [`Progress`].
pub struct StageBar {
    bar: ProgressBar,
}

impl Progress for StageBar {
    fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }
    fn advance(&self, n: u64, message: &str) {
        self.bar.inc(n);
        if !message.is_empty() {
            self.bar.set_message(message.to_string());
        }
    }
}

/// See [`Ui::download_bar`].
pub struct DownloadBar<'a> {
    ui: &'a Ui,
    stage: String,
    bar: std::sync::OnceLock<ProgressBar>,
    last: std::sync::Mutex<String>,
}

impl DownloadBar<'_> {
    fn bar(&self) -> &ProgressBar {
        self.bar.get_or_init(|| {
            let bar = self.ui.multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "  {spinner} {prefix:.bold} {wide_msg} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(self.stage.clone());
            if self.ui.interactive {
                bar.enable_steady_tick(Duration::from_millis(120));
            }
            bar
        })
    }
}

impl Progress for DownloadBar<'_> {
    fn set_total(&self, total: u64) {
        self.bar().set_length(total);
    }

    fn advance(&self, n: u64, message: &str) {
        let bar = self.bar();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if *last != message {
            // A line per file, so that logs without a terminal show what was fetched.
            self.ui.line(&format!("↓ {}: {message}", self.stage));
            bar.set_message(message.to_string());
            *last = message.to_string();
        }
        bar.inc(n);
    }
}

impl Drop for DownloadBar<'_> {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
            self.ui.multi.remove(bar);
        }
    }
}
