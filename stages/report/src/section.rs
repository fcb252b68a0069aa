//! One part of the report: its markdown, its machine-readable twin for `report.json`, and any
//! caveats it found while reading its inputs.

use serde_json::Value;

#[derive(Debug)]
pub struct Section {
    pub title: &'static str,
    /// The body, without the `##` heading.
    pub markdown: String,
    /// The same numbers, under `title`'s key in `report.json`.
    pub json: Value,
    /// Problems worth a reader's attention, listed under "Caveats".
    pub notes: Vec<String>,
}

impl Section {
    /// GitHub's anchor for the heading.
    pub fn anchor(&self) -> String {
        self.title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The key of this section in `report.json`.
    pub fn key(&self) -> String {
        self.anchor().replace('-', "_")
    }
}
