//! `${namespace.name}` placeholders in shell commands, substituted with proper shell quoting.
//!
//! Only the namespaces sdpipe owns (`params`, `vars`, `deps`, `inputs`, `outs`) are templated;
//! any other `${...}` (such as `${HOME}`) is left for the shell. `$${` writes a literal `${`.

use serde_json::Value as Json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Namespace {
    Params,
    Vars,
    Deps,
    Inputs,
    Outs,
}

impl Namespace {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "params" => Namespace::Params,
            "vars" => Namespace::Vars,
            "deps" => Namespace::Deps,
            "inputs" => Namespace::Inputs,
            "outs" => Namespace::Outs,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Params => "params",
            Namespace::Vars => "vars",
            Namespace::Deps => "deps",
            Namespace::Inputs => "inputs",
            Namespace::Outs => "outs",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Literal(String),
    Ref { ns: Namespace, name: String },
}

/// Split a command into literal text and references.
pub fn parse(command: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = command;
    while let Some(pos) = rest.find("${") {
        if rest[..pos].ends_with('$') {
            // `$${` is an escaped `${`.
            literal.push_str(&rest[..pos - 1]);
            literal.push_str("${");
            rest = &rest[pos + 2..];
            continue;
        }
        literal.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let reference = after.find('}').and_then(|end| {
            let inner = &after[..end];
            let (ns, name) = inner.split_once('.')?;
            Some((Namespace::parse(ns)?, name.to_string(), end))
        });
        match reference {
            Some((ns, name, end)) => {
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Ref { ns, name });
                rest = &after[end + 1..];
            }
            None => {
                literal.push_str("${");
                rest = after;
            }
        }
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    pieces
}

/// The references a command makes, in order of appearance.
pub fn references(command: &str) -> Vec<(Namespace, String)> {
    parse(command)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Ref { ns, name } => Some((ns, name)),
            Piece::Literal(_) => None,
        })
        .collect()
}

/// How a value appears in a command: strings as themselves, lists as separate words, anything
/// else as its JSON text. Every word is shell-quoted, so no value can inject shell syntax.
pub fn quote_value(value: &Json) -> Result<String, String> {
    match value {
        Json::Array(items) => {
            let words: Result<Vec<_>, _> = items.iter().map(quote_value).collect();
            Ok(words?.join(" "))
        }
        other => quote_word(&plain_text(other)),
    }
}

/// A value as plain text, as an environment variable carries it.
pub fn plain_text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn quote_word(word: &str) -> Result<String, String> {
    shlex::try_quote(word)
        .map(|q| q.into_owned())
        .map_err(|_| format!("value {word:?} contains a NUL byte and cannot be passed to a shell"))
}

/// Substitute every reference through `resolve`, which returns the already-quoted text.
pub fn render(
    command: &str,
    mut resolve: impl FnMut(Namespace, &str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(command.len());
    for piece in parse(command) {
        match piece {
            Piece::Literal(text) => out.push_str(&text),
            Piece::Ref { ns, name } => out.push_str(&resolve(ns, &name)?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_sdpipe_namespaces_are_templated() {
        let refs = references("echo ${params.lr} ${HOME} $${params.x} ${outs.model}");
        assert_eq!(
            refs,
            vec![(Namespace::Params, "lr".to_string()), (Namespace::Outs, "model".to_string())]
        );
    }

    #[test]
    fn escaped_placeholder_is_literal() {
        let out = render("echo $${params.x}", |_, _| Ok("BAD".into())).unwrap();
        assert_eq!(out, "echo ${params.x}");
    }

    #[test]
    fn values_are_quoted_against_injection() {
        let q = quote_value(&json!("a b; rm -rf / $(x) `y`")).unwrap();
        assert_eq!(q, "'a b; rm -rf / $(x) `y`'");
        assert_eq!(quote_value(&json!(["a", "b c", 3])).unwrap(), "a 'b c' 3");
        assert_eq!(quote_value(&json!(1e-5)).unwrap(), "0.00001");
    }

    #[test]
    fn unterminated_placeholder_is_left_alone() {
        assert_eq!(parse("echo ${params.x"), vec![Piece::Literal("echo ${params.x".into())]);
    }
}
