//! Pipeline source text and byte spans into it, for located error messages.

/// A byte range in a [`SourceFile`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

/// The text of a pipeline file and the name it is shown under (as the user gave the path).
#[derive(Debug)]
pub struct SourceFile {
    name: String,
    text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: String) -> Self {
        let line_starts =
            std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        SourceFile { name: name.into(), text, line_starts }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The span starting at a 1-based line and 1-based column counted in characters.
    pub fn span_at(&self, line: usize, column: usize, len_chars: usize) -> Span {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return Span { offset: self.text.len(), len: 0 };
        };
        let rest = &self.text[start..];
        let mut chars = rest.char_indices().skip(column.saturating_sub(1));
        let Some((from, _)) = chars.next() else {
            return Span { offset: self.text.len(), len: 0 };
        };
        let to = rest[from..]
            .char_indices()
            .take_while(|(_, c)| *c != '\n')
            .nth(len_chars)
            .map(|(i, _)| from + i)
            .unwrap_or_else(|| from + rest[from..].find('\n').unwrap_or(rest.len() - from));
        Span { offset: start + from, len: to - from }
    }

    /// The 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self.text.get(start..offset).map(|s| s.chars().count()).unwrap_or(0) + 1;
        (line, col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_round_trip_through_line_and_column() {
        let f = SourceFile::new("x", "ab\ncdé fg\n".into());
        let s = f.span_at(2, 5, 2);
        assert_eq!(&f.text()[s.offset..s.offset + s.len], "fg");
        assert_eq!(f.line_col(s.offset), (2, 5));
    }

    #[test]
    fn out_of_range_positions_do_not_panic() {
        let f = SourceFile::new("x", "a".into());
        assert_eq!(f.span_at(9, 9, 3).offset, 1);
        assert_eq!(f.span_at(1, 9, 3).offset, 1);
        assert_eq!(f.line_col(100).0, 1);
    }
}
