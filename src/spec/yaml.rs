//! The one module that parses YAML.
//!
//! Values come from `serde_yaml_ng` (the maintained continuation of the archived `serde_yaml`,
//! same API). serde's data model carries no source positions, so a second, event-level pass with
//! `yaml-rust2` records where every key and value starts; validation then reports semantic errors
//! (unknown inputs, type errors, cycles) at `file:line:column` by path.

use std::collections::HashMap;
use std::sync::Arc;

use serde_yaml_ng::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::nesting;
use super::source::{SourceFile, Span};

/// One step of a path from the document root to a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub type YamlPath = Vec<Seg>;

/// Where each node (and each mapping key) starts in the source.
#[derive(Debug, Default)]
pub struct Locator {
    values: HashMap<YamlPath, Span>,
    keys: HashMap<YamlPath, Span>,
}

impl Locator {
    /// The span of the value at `path`, or else of its nearest located ancestor's key.
    pub fn value(&self, path: &[Seg]) -> Span {
        match self.values.get(path) {
            Some(span) => *span,
            None => self.ancestor(path),
        }
    }

    /// The span of the mapping key that introduces `path` (falls back to the value's span).
    pub fn key(&self, path: &[Seg]) -> Span {
        self.keys.get(path).copied().unwrap_or_else(|| self.value(path))
    }

    /// A block mapping's own start mark points past its first key, so ancestors are located
    /// by the key that introduces them.
    fn ancestor(&self, path: &[Seg]) -> Span {
        (0..path.len())
            .rev()
            .find_map(|n| {
                self.keys.get(&path[..n]).or_else(|| self.values.get(&path[..n])).copied()
            })
            .unwrap_or_default()
    }
}

/// A parsed document: its values and where they came from.
pub struct Document {
    pub value: Value,
    pub locator: Locator,
    pub source: Arc<SourceFile>,
}

/// A YAML syntax error, located.
#[derive(Debug)]
pub struct SyntaxError {
    pub message: String,
    pub span: Span,
}

/// Parse a document; on a syntax error return it located.
pub fn parse(source: Arc<SourceFile>) -> Result<Document, SyntaxError> {
    refuse_deep_nesting(source.text())
        .map_err(|(message, offset)| SyntaxError { message, span: Span { offset, len: 1 } })?;
    let value: Value = serde_yaml_ng::from_str(source.text()).map_err(|e| {
        let span =
            e.location().map(|l| source.span_at(l.line(), l.column(), 1)).unwrap_or_default();
        // serde_yaml_ng appends " at line X column Y"; the location is shown separately.
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message).to_string();
        SyntaxError { message, span }
    })?;
    let locator = locate(&source);
    Ok(Document { value, locator, source })
}

/// Parse a single YAML scalar given on the command line (`--set lr=3e-5`), with the same typing
/// rules as the pipeline file.
pub fn parse_scalar(text: &str) -> Result<Value, String> {
    refuse_deep_nesting(text).map_err(|(message, _)| message)?;
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

/// Nesting the parser would refuse after quadratic time, refused first (see [`nesting`]).
fn refuse_deep_nesting(text: &str) -> Result<(), (String, usize)> {
    match nesting::too_deep(text) {
        None => Ok(()),
        Some(offset) => Err((
            format!(
                "recursion limit exceeded: `[`/`{{` nested deeper than {} levels",
                nesting::MAX_FLOW_DEPTH
            ),
            offset,
        )),
    }
}

/// Record the start of every node. A failure here is ignored: serde_yaml_ng accepted the
/// document, and positions are only a courtesy for messages.
fn locate(source: &SourceFile) -> Locator {
    let mut builder = LocatorBuilder { source, stack: Vec::new(), out: Locator::default() };
    let mut parser = Parser::new_from_str(source.text());
    let _ = parser.load(&mut builder, false);
    builder.out
}

enum Frame {
    Map { path: YamlPath, pending_key: Option<String> },
    Seq { path: YamlPath, next: usize },
}

struct LocatorBuilder<'a> {
    source: &'a SourceFile,
    stack: Vec<Frame>,
    out: Locator,
}

impl LocatorBuilder<'_> {
    fn span(&self, mark: Marker, len: usize) -> Span {
        // yaml-rust2 counts lines and columns in characters, 1-based lines and 0-based columns.
        self.source.span_at(mark.line(), mark.col() + 1, len.max(1))
    }

    /// Claim the next value slot in the current container: returns its path, or `None` when the
    /// event is a mapping key (recorded as pending).
    fn next_value_path(&mut self, scalar_key: Option<(&str, Span)>) -> Option<YamlPath> {
        match self.stack.last_mut() {
            None => Some(Vec::new()),
            Some(Frame::Seq { path, next }) => {
                let mut p = path.clone();
                p.push(Seg::Index(*next));
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, pending_key }) => match pending_key.take() {
                Some(key) => {
                    let mut p = path.clone();
                    p.push(Seg::Key(key));
                    Some(p)
                }
                None => {
                    // This node is a key. Only scalar keys are addressable.
                    let (text, span) = scalar_key.unwrap_or(("", Span::default()));
                    let mut p = path.clone();
                    p.push(Seg::Key(text.to_string()));
                    *pending_key = Some(text.to_string());
                    self.out.keys.insert(p, span);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for LocatorBuilder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                let span = self.span(mark, text.chars().count());
                if let Some(path) = self.next_value_path(Some((&text, span))) {
                    self.out.values.insert(path, span);
                }
            }
            Event::Alias(_) => {
                let span = self.span(mark, 1);
                if let Some(path) = self.next_value_path(Some(("", span))) {
                    self.out.values.insert(path, span);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let span = self.span(mark, 1);
                let is_map = matches!(ev, Event::MappingStart(..));
                let path = match self.next_value_path(None) {
                    Some(path) => path,
                    // A complex (non-scalar) key: give it an unaddressable path.
                    None => vec![Seg::Key("\u{0}complex-key".into())],
                };
                self.out.values.insert(path.clone(), span);
                self.stack.push(if is_map {
                    Frame::Map { path, pending_key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        parse(Arc::new(SourceFile::new("p.yaml", text.to_string()))).unwrap()
    }

    #[test]
    fn locator_finds_nested_values_and_keys() {
        let d = doc("stages:\n  a:\n    run: echo hi\n    outs: [x, y]\n");
        let path = vec![Seg::Key("stages".into()), Seg::Key("a".into()), Seg::Key("run".into())];
        let (line, col) = d.source.line_col(d.locator.value(&path).offset);
        assert_eq!((line, col), (3, 10));
        let (line, col) = d.source.line_col(d.locator.key(&path).offset);
        assert_eq!((line, col), (3, 5));
        let mut outs = path.clone();
        outs[2] = Seg::Key("outs".into());
        outs.push(Seg::Index(1));
        assert_eq!(d.source.line_col(d.locator.value(&outs).offset), (4, 15));
    }

    #[test]
    fn unknown_path_falls_back_to_nearest_ancestor() {
        let d = doc("stages:\n  a:\n    run: x\n");
        let missing = vec![Seg::Key("stages".into()), Seg::Key("a".into()), Seg::Key("zzz".into())];
        assert_eq!(d.source.line_col(d.locator.value(&missing).offset), (2, 3));
    }

    #[test]
    fn syntax_errors_are_located() {
        let err =
            parse(Arc::new(SourceFile::new("p.yaml", "a: [1, 2\nb: 3\n".into()))).err().unwrap();
        assert!(err.span.offset > 0, "{err:?}");
    }
}
