//! A linear-time refusal of deeply nested flow collections, run before the YAML parser.
//!
//! The scanner under `serde_yaml_ng` (libyaml's algorithm) does work proportional to the
//! current flow depth for every token, and its deserialiser refuses depth beyond 128 only after
//! the whole document has been scanned: `[[[[…]]]]` 100,000 deep (a 200 KB file) took over
//! 30 s to be refused, quadratic in the depth. This scan counts `[`/`{` nesting in one pass
//! and refuses the first bracket beyond the parser's own limit at its position, so such input
//! is refused in milliseconds with the message and limit the parser would have given.
//!
//! It skips comments and quoted scalars but does not parse YAML: brackets inside plain or block
//! scalars count too. That can only refuse a document with more than 128 unclosed brackets in
//! its scalars (no shell script or caption has those); a document it lets through is parsed,
//! and limited, by the parser as before.

/// `serde_yaml_ng`'s recursion limit: deeper documents are refused by it anyway.
pub const MAX_FLOW_DEPTH: usize = 128;

/// The byte offset of the first `[` or `{` that opens a level beyond [`MAX_FLOW_DEPTH`].
pub fn too_deep(text: &str) -> Option<usize> {
    #[derive(PartialEq)]
    enum State {
        Plain,
        Single,
        Double,
        Comment,
    }
    let bytes = text.as_bytes();
    let mut state = State::Plain;
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        // A quote or a comment only starts after a separator, as YAML has it: the apostrophe
        // of `don't` in a plain scalar starts nothing.
        let after_separator =
            i == 0 || matches!(bytes[i - 1], b' ' | b'\t' | b'\n' | b'\r' | b'[' | b'{' | b',');
        match state {
            State::Plain => match b {
                b'#' if after_separator => state = State::Comment,
                b'\'' if after_separator => state = State::Single,
                b'"' if after_separator => state = State::Double,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some(i);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
            State::Comment if b == b'\n' => state = State::Plain,
            State::Comment => {}
            // `''` is an escaped quote inside a single-quoted scalar.
            State::Single if b == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 1,
            State::Single if b == b'\'' => state = State::Plain,
            State::Single => {}
            State::Double if b == b'\\' => i += 1,
            State::Double if b == b'"' => state = State::Plain,
            State::Double => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("x: {}{}\n", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn nesting_up_to_the_parsers_limit_passes() {
        assert_eq!(too_deep(&nested(MAX_FLOW_DEPTH)), None);
    }

    #[test]
    fn the_first_bracket_beyond_the_limit_is_located() {
        assert_eq!(too_deep(&nested(MAX_FLOW_DEPTH + 1)), Some(3 + MAX_FLOW_DEPTH));
    }

    #[test]
    fn mixed_brackets_count_as_one_depth() {
        let text = format!("x: {}\n", "[{".repeat(MAX_FLOW_DEPTH / 2 + 1));
        assert_eq!(too_deep(&text), Some(3 + MAX_FLOW_DEPTH));
    }

    #[test]
    fn brackets_in_quoted_scalars_and_comments_do_not_count() {
        let deep = "[".repeat(200);
        let text = format!(
            "a: '{deep} it''s {deep}'\nb: \"{deep} \\\" {deep}\"\n# {deep}\nc: x # {deep}\n"
        );
        assert_eq!(too_deep(&text), None);
    }

    #[test]
    fn an_apostrophe_inside_a_plain_scalar_starts_no_quote() {
        let text = format!("a: don't\nb: {}\n", "[".repeat(MAX_FLOW_DEPTH + 1));
        assert!(too_deep(&text).is_some());
    }

    #[test]
    fn a_megabyte_of_brackets_is_scanned_in_one_pass() {
        // One pass: the answer comes at the 129th bracket, whatever follows it.
        let text = nested(500_000);
        assert_eq!(too_deep(&text), Some(3 + MAX_FLOW_DEPTH));
    }
}
