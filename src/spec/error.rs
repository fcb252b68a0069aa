//! Located pipeline errors, rendered by miette with the offending line, or as plain
//! `file:line:column: message` text for logs and `--json`.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, SourceCode};

use super::source::{SourceFile, Span};

/// One problem in a pipeline file.
#[derive(Debug, Clone)]
pub struct SpecError {
    pub message: String,
    pub label: String,
    pub help: Option<String>,
    pub span: Option<Span>,
    pub source: Option<Arc<SourceFile>>,
}

impl SpecError {
    pub fn at(source: &Arc<SourceFile>, span: Span, message: impl Into<String>) -> Self {
        SpecError {
            message: message.into(),
            label: "here".into(),
            help: None,
            span: Some(span),
            source: Some(source.clone()),
        }
    }

    /// An error with no position (a `--set` override, a missing pipeline file).
    pub fn unlocated(message: impl Into<String>) -> Self {
        SpecError {
            message: message.into(),
            label: String::new(),
            help: None,
            span: None,
            source: None,
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Add "did you mean `x`?" when one of `candidates` is close to `word`.
    pub fn suggest<'a>(self, word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Self {
        match did_you_mean(word, candidates) {
            Some(best) => self.help(format!("did you mean `{best}`?")),
            None => self,
        }
    }

    /// `file:line:column`, when known.
    pub fn location(&self) -> Option<(String, usize, usize)> {
        let (source, span) = (self.source.as_ref()?, self.span?);
        let (line, col) = source.line_col(span.offset);
        Some((source.name().to_string(), line, col))
    }
}

impl SpecError {
    /// One line: `file:line:column: message (help)`.
    pub fn located(&self) -> String {
        let mut out = String::new();
        if let Some((file, line, col)) = self.location() {
            out.push_str(&format!("{file}:{line}:{col}: "));
        }
        out.push_str(&self.message);
        if let Some(help) = &self.help {
            out.push_str(&format!(" ({help})"));
        }
        out
    }
}

/// The bare message: miette shows the location and help itself.
impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SpecError {}

/// The closest candidate within a small edit distance, for "did you mean".
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 3).max(1) && *d > 0)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Every problem found in one pipeline file. Validation collects them all so a user fixes a
/// file in one pass instead of one error per run.
#[derive(Debug, Clone)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {}", e.located())?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

impl From<SpecError> for SpecErrors {
    fn from(e: SpecError) -> Self {
        SpecErrors(vec![e])
    }
}

/// miette rendering: the snippet with a label under the offending token.
impl Diagnostic for SpecError {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.source.as_ref().map(|s| s as &dyn SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.span?;
        let label = LabeledSpan::new(Some(self.label.clone()), span.offset, span.len);
        Some(Box::new(std::iter::once(label)))
    }
}

impl SourceCode for SourceFile {
    fn read_span<'a>(
        &'a self,
        span: &miette::SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        // Delegate to str's implementation, then attach the file name for the header line.
        let inner = self.text().read_span(span, context_lines_before, context_lines_after)?;
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name().to_string(),
            inner.data(),
            *inner.span(),
            inner.line(),
            inner.column(),
            inner.line_count(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(did_you_mean("trian", ["train", "sample"]), Some("train"));
        assert_eq!(did_you_mean("zzzzzz", ["train", "sample"]), None);
        assert_eq!(did_you_mean("train", ["train"]), None);
    }
}
