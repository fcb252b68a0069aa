//! Which files a caller needs from a model, and how to pick them from what a place offers.

/// One file a caller needs from a model, by its path relative to the model's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want<'a> {
    /// Required.
    File(&'a str),
    /// Required: the first of these the model has (e.g. a single or a sharded checkpoint).
    OneOf(&'a [&'a str]),
    /// Used when present; its absence is no error.
    Optional(&'a str),
}

impl<'a> From<&'a str> for Want<'a> {
    fn from(name: &'a str) -> Self {
        Want::File(name)
    }
}

impl Want<'_> {
    pub(crate) fn candidates(&self) -> Vec<&str> {
        match self {
            Want::File(name) | Want::Optional(name) => vec![name],
            Want::OneOf(names) => names.to_vec(),
        }
    }

    pub(crate) fn required(&self) -> bool {
        !matches!(self, Want::Optional(_))
    }

    /// `a`, or `a (or b)` for alternatives.
    pub(crate) fn describe(&self) -> String {
        let names = self.candidates();
        match names.split_first() {
            Some((first, [])) => first.to_string(),
            Some((first, rest)) => format!("{first} (or {})", rest.join(", ")),
            None => "(nothing)".to_string(),
        }
    }
}

/// The outcome of matching wants against one place.
pub(crate) struct Selection {
    /// The chosen file names, in the order of the wants.
    pub chosen: Vec<String>,
    /// Descriptions of the required wants the place cannot satisfy.
    pub missing: Vec<String>,
}

/// Match `wants` against a place that has a file when `has(name)` is true.
pub(crate) fn select(wants: &[Want<'_>], has: impl Fn(&str) -> bool) -> Selection {
    let mut chosen = Vec::new();
    let mut missing = Vec::new();
    for want in wants {
        match want.candidates().into_iter().find(|name| has(name)) {
            Some(name) => chosen.push(name.to_string()),
            None if want.required() => missing.push(want.describe()),
            None => {}
        }
    }
    Selection { chosen, missing }
}

/// Descriptions of every required want, for error messages.
pub(crate) fn needed(wants: &[Want<'_>]) -> Vec<String> {
    wants.iter().filter(|w| w.required()).map(Want::describe).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_of_picks_the_first_candidate_present() {
        let wants = [Want::OneOf(&["a.safetensors", "a.bin"])];
        let s = select(&wants, |n| n == "a.bin");
        assert_eq!(s.chosen, ["a.bin"]);
        let s = select(&wants, |_| true);
        assert_eq!(s.chosen, ["a.safetensors"]);
    }

    #[test]
    fn missing_optional_files_are_not_missing() {
        let s = select(&[Want::Optional("x"), Want::File("y")], |_| false);
        assert_eq!(s.missing, ["y"]);
        assert!(s.chosen.is_empty());
    }

    #[test]
    fn alternatives_are_described_together() {
        assert_eq!(Want::OneOf(&["a", "b", "c"]).describe(), "a (or b, c)");
    }
}
