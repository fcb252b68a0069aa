//! Markdown building blocks: number formatting, escaping, relative links and pipe tables.
//!
//! Everything here is a pure function of its arguments, so the report's bytes depend only on
//! its inputs.

use std::fmt::Write;

/// A number with four significant digits, in fixed notation where that stays readable.
///
/// Metric scales differ wildly (FID in the hundreds, KID around 1e-3, stand-in networks give
/// anything), so a fixed number of decimals would print `0.00` or a wall of digits.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".into();
    }
    let magnitude = x.abs().log10().floor() as i32;
    if !(-4..6).contains(&magnitude) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - magnitude).max(0) as usize;
    format!("{x:.decimals$}")
}

/// [`num`] without trailing zeros (`0.3` rather than `0.3000`), for axis ticks.
pub fn short(x: f64) -> String {
    let s = num(x);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `x ± std` with both parts formatted by [`num`].
pub fn mean_std(mean: f64, std: Option<f64>) -> String {
    match std {
        Some(s) => format!("{} ± {}", num(mean), num(s)),
        None => num(mean),
    }
}

/// A change against the original, for a metric where lower is better: the signed difference,
/// the relative change where it is defined, and an arrow saying which way is better.
pub fn delta(value: f64, base: f64) -> String {
    delta_towards(value, base, false)
}

/// [`delta`] for a metric where higher is better (a CLIP score): ▲ is better.
pub fn delta_higher(value: f64, base: f64) -> String {
    delta_towards(value, base, true)
}

fn delta_towards(value: f64, base: f64, higher_is_better: bool) -> String {
    let d = value - base;
    let sign = if d > 0.0 { "+" } else { "" };
    let mut s = format!("{sign}{}", num(d));
    if base != 0.0 && d != 0.0 {
        let _ = write!(s, " ({sign}{:.1}%)", 100.0 * d / base.abs());
    }
    s.push_str(match (d.partial_cmp(&0.0), higher_is_better) {
        (Some(std::cmp::Ordering::Less), false) => " ▼ better",
        (Some(std::cmp::Ordering::Less), true) => " ▼ worse",
        (Some(std::cmp::Ordering::Greater), false) => " ▲ worse",
        (Some(std::cmp::Ordering::Greater), true) => " ▲ better",
        _ => " = same",
    });
    s
}

/// Text safe inside a table cell: no line breaks, pipes escaped, HTML and emphasis inert.
pub fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\\' | '*' | '_' | '`' | '[' | ']' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// Inline code safe inside a table cell (pipes still end a cell on GitHub, even in code).
pub fn code(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let fence = if flat.contains('`') { "``" } else { "`" };
    let pad = if flat.starts_with('`') || flat.ends_with('`') { " " } else { "" };
    format!("{fence}{pad}{}{pad}{fence}", flat.replace('|', "\\|"))
}

/// A relative link target: path segments percent-encoded so ids with spaces or brackets still
/// resolve on GitHub.
pub fn url(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/._~-".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A name usable as one path segment: ASCII letters, digits and `._-`, nothing else.
pub fn slug(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

/// Column alignment in a pipe table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
    Center,
}

/// A GitHub pipe table; cells are already-escaped markdown.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[(&str, Align)]) -> Self {
        Table { header: header.iter().map(|(h, a)| (h.to_string(), *a)).collect(), rows: vec![] }
    }

    pub fn column(&mut self, title: impl Into<String>, align: Align) {
        self.header.push((title.into(), align));
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |cells: &mut dyn Iterator<Item = String>| {
            let mut s = String::from("|");
            for c in cells {
                let c = if c.is_empty() { " ".to_string() } else { format!(" {c} ") };
                s.push_str(&c);
                s.push('|');
            }
            s.push('\n');
            s
        };
        out.push_str(&line(&mut self.header.iter().map(|(h, _)| h.clone())));
        out.push_str(&line(&mut self.header.iter().map(|(_, a)| {
            match a {
                Align::Left => ":--",
                Align::Right => "--:",
                Align::Center => ":-:",
            }
            .to_string()
        })));
        for row in &self.rows {
            let mut cells = row.clone();
            cells.resize(self.header.len(), String::new());
            out.push_str(&line(&mut cells.into_iter()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(num(123.456), "123.5");
        assert_eq!(num(0.0123456), "0.01235");
        assert_eq!(num(2.0), "2.000");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(1.5e-7), "1.500e-7");
        assert_eq!(num(-12.5), "-12.50");
        assert_eq!(short(0.3), "0.3");
        assert_eq!(short(1000.0), "1000");
        assert_eq!(short(1.5e-7), "1.500e-7");
    }

    #[test]
    fn deltas_say_lower_is_better() {
        assert_eq!(delta(90.0, 100.0), "-10.00 (-10.0%) ▼ better");
        assert_eq!(delta(0.5, 0.25), "+0.2500 (+100.0%) ▲ worse");
        assert_eq!(delta(1.0, 1.0), "0 = same");
        assert_eq!(delta_higher(90.0, 100.0), "-10.00 (-10.0%) ▼ worse");
        assert_eq!(delta_higher(0.5, 0.25), "+0.2500 (+100.0%) ▲ better");
    }

    #[test]
    fn cells_cannot_break_the_table() {
        assert_eq!(cell("a|b\nc <i>*x*</i>"), "a\\|b c &lt;i&gt;\\*x\\*&lt;/i&gt;");
        assert_eq!(code("a|b"), "`a\\|b`");
        assert_eq!(code("x`y"), "``x`y``");
    }

    #[test]
    fn urls_and_slugs_are_path_safe() {
        assert_eq!(url("images/a b(1).png"), "images/a%20b%281%29.png");
        assert_eq!(slug("unet.lr=3e-05,seed=1"), "unet.lr_3e-05_seed_1");
        assert_eq!(slug("../x"), "_x");
    }

    #[test]
    fn tables_pad_short_rows() {
        let mut t = Table::new(&[("a", Align::Left), ("b", Align::Right)]);
        t.row(vec!["1".into()]);
        assert_eq!(t.render(), "| a | b |\n| :-- | --: |\n| 1 | |\n");
    }
}
