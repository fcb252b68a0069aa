//! Per-image metrics in the report's tables: each model's mean with its bootstrap interval,
//! which model is *significantly* better than which, and sentences that say so in words.
//!
//! A table column of a per-image metric builds one [`Analysis`] from every row's per-item
//! values (see [`crate::bootstrap`] for the statistics). A new per-image metric (a CLIP score,
//! say) plugs in by describing itself as a [`Metric`] and handing over its per-item values.
//!
//! A column is *tested* when every row that has the metric also has its per-item values; only
//! then do its marks (bold, better/worse) require significance. Otherwise the column keeps the
//! marks of the point values, like FID and KID, and the section notes which models lack
//! per-image values.

use serde_json::{json, Value};

use crate::bootstrap::{self, Comparison, Interval, PerItem, Sample};

/// Which direction of a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// How a per-image metric is named and printed.
pub struct Metric {
    /// Its name in code and `report.json`.
    pub key: &'static str,
    /// The metric in prose ("LPIPS", "background accuracy").
    pub noun: &'static str,
    pub better: Better,
    /// What its items are, in the plural ("images", "image pairs").
    pub items: &'static str,
    /// A value or interval bound as the table prints it.
    pub value: fn(f64) -> String,
    /// A difference, signed, without its unit.
    pub difference: fn(f64) -> String,
    /// The unit after a difference (" percentage points"), or empty.
    pub unit: &'static str,
}

/// One row of a table: how prose names its model, and its per-item values when they were
/// bound.
pub struct Row<'a> {
    pub prose: String,
    pub values: Option<&'a PerItem>,
}

/// One metric over the rows of a table.
pub struct Analysis<'a> {
    metric: &'a Metric,
    rows: Vec<Row<'a>>,
    intervals: Vec<Option<Interval>>,
    /// `comparisons[i][j]` for `i < j`: row `j` against row `i` (`j − i`).
    comparisons: Vec<Vec<Option<Comparison>>>,
}

impl<'a> Analysis<'a> {
    pub fn new(metric: &'a Metric, rows: Vec<Row<'a>>) -> Analysis<'a> {
        let intervals: Vec<Option<Interval>> = rows
            .iter()
            .map(|r| {
                let values: Vec<f64> = r.values?.values().copied().collect();
                bootstrap::mean_interval(&values, bootstrap::interval_seed())
            })
            .collect();
        let sample = |i: usize| -> Option<Sample<'_>> {
            Some(Sample { values: rows[i].values?, interval: intervals[i]? })
        };
        let comparisons = (0..rows.len())
            .map(|i| {
                (0..rows.len())
                    .map(|j| {
                        let seed = bootstrap::paired_seed();
                        (i < j).then(|| Some(Comparison::of(sample(i)?, sample(j)?, seed)))?
                    })
                    .collect()
            })
            .collect();
        Analysis { metric, rows, intervals, comparisons }
    }

    /// Whether every row has per-item values, so the column's marks can require significance
    /// (vacuously true without rows).
    pub fn tested(&self) -> bool {
        self.intervals.iter().all(Option::is_some)
    }

    pub fn interval(&self, i: usize) -> Option<Interval> {
        self.intervals[i]
    }

    /// Whether any row has an interval.
    pub fn has_intervals(&self) -> bool {
        self.intervals.iter().any(Option::is_some)
    }

    /// Row `other` against row `reference` (the difference is `other − reference`).
    pub fn comparison(&self, reference: usize, other: usize) -> Option<Comparison> {
        match reference.cmp(&other) {
            std::cmp::Ordering::Less => self.comparisons[reference][other],
            std::cmp::Ordering::Greater => self.comparisons[other][reference].map(|c| c.flipped()),
            std::cmp::Ordering::Equal => None,
        }
    }

    /// A difference `d` goes the better way.
    fn improves(&self, d: f64) -> bool {
        match self.metric.better {
            Better::Lower => d < 0.0,
            Better::Higher => d > 0.0,
        }
    }

    /// Row `i` is significantly better than every other row.
    pub fn significantly_best(&self, i: usize) -> bool {
        self.rows.len() > 1
            && (0..self.rows.len()).filter(|&j| j != i).all(|j| {
                self.comparison(j, i)
                    .is_some_and(|c| c.significant() && self.improves(c.difference()))
            })
    }

    /// `value [low, high]` when row `i` has an interval, else `value`.
    pub fn cell(&self, i: usize, value: f64) -> String {
        let v = (self.metric.value)(value);
        match self.intervals[i] {
            Some(int) => format!("{v} {}", self.bounds(int.low, int.high, self.metric.value)),
            None => v,
        }
    }

    fn bounds(&self, low: f64, high: f64, f: fn(f64) -> String) -> String {
        format!("[{}, {}]", f(low), f(high))
    }

    /// The change of row `other` from row `reference`, for a Δ column: the difference with its
    /// interval, and whether it is better, worse or not significant. `None` without a test.
    pub fn delta_cell(&self, reference: usize, other: usize) -> Option<String> {
        let c = self.comparison(reference, other)?;
        let d = c.difference();
        let mut s = (self.metric.difference)(d);
        if let Comparison::Paired(int) = c {
            s = format!("{s} {}", self.bounds(int.low, int.high, self.metric.difference));
        }
        let verdict = match (c.significant(), self.improves(d)) {
            (false, _) => "(not significant)",
            (true, true) if d < 0.0 => "▼ better",
            (true, true) => "▲ better",
            (true, false) if d < 0.0 => "▼ worse",
            (true, false) => "▲ worse",
        };
        s = format!("{s} {verdict}");
        if let Comparison::Unpaired { .. } = c {
            s.push_str(if c.significant() {
                " (intervals do not overlap)"
            } else {
                " (intervals overlap)"
            });
        }
        Some(s)
    }

    /// One sentence on row `other` against row `reference`, in words: which is better on this
    /// metric, by how much, and whether the difference is significant. `None` without a test.
    pub fn sentence(&self, reference: usize, other: usize) -> Option<String> {
        let c = self.comparison(reference, other)?;
        let m = self.metric;
        let (a, b) = (&self.rows[reference].prose, &self.rows[other].prose);
        let d = c.difference();
        let amount = format!("{}{}", (m.difference)(d), m.unit);
        let evidence = match c {
            Comparison::Paired(int) => {
                format!("{amount} {}, paired", self.bounds(int.low, int.high, m.difference))
            }
            Comparison::Unpaired { .. } => format!(
                "{amount}; evaluated on different {}, so their 95% intervals are compared: they \
                 {}",
                m.items,
                if c.significant() { "do not overlap" } else { "overlap" }
            ),
        };
        let at = format!("at N = {} {}", c.n(), m.items);
        if !c.significant() {
            let few = if c.n() < 2 { ", too few to test" } else { "" };
            return Some(format!(
                "{} and {a} show no significant difference in {} {at} ({evidence}{few}).",
                capitalise(b),
                m.noun,
            ));
        }
        let direction = if d < 0.0 { "lower" } else { "higher" };
        let (winner, loser) = if self.improves(d) { (b, a) } else { (a, b) };
        Some(format!(
            "{} has {direction} {} than {a} {at} ({evidence}): the difference is significant, so \
             {winner} is better on {} than {loser}.",
            capitalise(b),
            m.noun,
            m.noun
        ))
    }

    /// Row `i`'s interval and its comparison with `reference`, for `report.json`.
    pub fn json(&self, i: usize, reference: Option<usize>) -> Value {
        let Some(int) = self.intervals[i] else {
            return Value::Null;
        };
        let mut out = json!({
            "mean": int.estimate,
            "low": int.low,
            "high": int.high,
            "n": int.n,
            "level": bootstrap::LEVEL,
            "resamples": bootstrap::RESAMPLES,
        });
        if let Some(c) = reference.and_then(|r| self.comparison(r, i)) {
            out["versus_reference"] = match c {
                Comparison::Paired(d) => json!({
                    "paired": true, "difference": d.estimate, "low": d.low, "high": d.high,
                    "n": d.n, "significant": c.significant(),
                }),
                Comparison::Unpaired { difference, .. } => json!({
                    "paired": false, "difference": difference, "significant": c.significant(),
                }),
            };
        }
        out
    }

    /// The prose names of the rows without per-item values.
    pub fn missing(&self) -> Vec<&str> {
        self.rows.iter().filter(|r| r.values.is_none()).map(|r| r.prose.as_str()).collect()
    }
}

/// A sentence may start with a model's prose name ("the original").
fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A signed number for differences: `+` before positive values.
pub fn signed(x: f64) -> String {
    let s = crate::format::num(x);
    if x > 0.0 {
        format!("+{s}")
    } else {
        s
    }
}

/// A share as a percentage (`75%`).
pub fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// A difference of shares in percentage points, signed (`+56`, `-12`, `0`).
pub fn points(d: f64) -> String {
    let p = (d * 100.0).round();
    if p == 0.0 {
        "0".into()
    } else {
        format!("{p:+.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LPIPS: Metric = Metric {
        key: "lpips",
        noun: "LPIPS",
        better: Better::Lower,
        items: "image pairs",
        value: crate::format::num,
        difference: signed,
        unit: "",
    };

    fn values(f: impl Fn(usize) -> f64) -> PerItem {
        (0..16).map(|i| (format!("id-{i:02}"), f(i))).collect()
    }

    fn rows<'a>(a: &'a PerItem, b: &'a PerItem) -> Vec<Row<'a>> {
        vec![
            Row { prose: "the original".into(), values: Some(a) },
            Row { prose: "`lr`".into(), values: Some(b) },
        ]
    }

    #[test]
    fn a_clear_improvement_is_best_and_said_so() {
        let a = values(|i| 0.6 + 0.01 * (i % 5) as f64);
        let b = values(|i| 0.45 + 0.012 * (i % 5) as f64);
        let an = Analysis::new(&LPIPS, rows(&a, &b));
        assert!(an.tested());
        assert!(an.significantly_best(1) && !an.significantly_best(0));
        let s = an.sentence(0, 1).unwrap();
        assert!(
            s.starts_with("`lr` has lower LPIPS than the original at N = 16 image pairs (-0.1"),
            "{s}"
        );
        assert!(
            s.ends_with(
                "the difference is significant, so `lr` is better on LPIPS than the original."
            ),
            "{s}"
        );
        assert!(an.delta_cell(0, 1).unwrap().ends_with("▼ better"));
        // Seen from the other side, the original is worse.
        assert!(an.delta_cell(1, 0).unwrap().ends_with("▲ worse"));
        let s = an.sentence(1, 0).unwrap();
        assert!(s.starts_with("The original has higher LPIPS than `lr`"), "{s}");
        assert!(s.contains("so `lr` is better on LPIPS than the original"), "{s}");
    }

    #[test]
    fn identical_values_are_no_significant_difference() {
        let a = values(|i| 0.5 + 0.01 * i as f64);
        let an = Analysis::new(&LPIPS, rows(&a, &a));
        assert!(!an.significantly_best(0) && !an.significantly_best(1));
        assert_eq!(
            an.sentence(0, 1).unwrap(),
            "`lr` and the original show no significant difference in LPIPS at N = 16 image pairs \
             (0 [0, 0], paired)."
        );
        assert_eq!(an.delta_cell(0, 1).unwrap(), "0 [0, 0] (not significant)");
    }

    #[test]
    fn a_row_without_values_leaves_the_column_untested() {
        let a = values(|_| 0.5);
        let mut r = rows(&a, &a);
        r[1].values = None;
        let an = Analysis::new(&LPIPS, r);
        assert!(!an.tested());
        assert_eq!(an.missing(), ["`lr`"]);
        assert!(an.sentence(0, 1).is_none() && an.delta_cell(0, 1).is_none());
        assert_eq!(an.cell(1, 0.5), "0.5000");
        assert_eq!(an.cell(0, 0.5), "0.5000 [0.5000, 0.5000]");
    }

    #[test]
    fn points_are_signed_whole_percentage_points() {
        assert_eq!(points(0.5625), "+56");
        assert_eq!(points(-0.125), "-13");
        assert_eq!(points(-0.001), "0");
        assert_eq!(signed(0.01), "+0.01000");
        assert_eq!(signed(-0.1), "-0.1000");
    }
}
