//! Comparing runs from the [journal](crate::journal): the rows of `exp show` (one per run and
//! sweep point, parameters and metrics as columns), the lines of `metrics diff` and
//! `params diff`, and their rendering as an aligned table, Markdown, CSV or JSON.
//!
//! The semantics follow DVC's `exp show`, `metrics diff` and `params diff`: columns are named
//! `stage.param` and `stage.metric`; `--only-changed` keeps the columns whose values differ
//! between rows; a diff lists only what changed unless asked for everything, and matches the
//! two runs' sweep points by their labels.

use std::collections::{BTreeMap, BTreeSet};

use sdpipe_stages::exp_cells::{number, value as cell};
use serde::Serialize;
use serde_json::Value as Json;

use crate::journal::RunEntry;

/// One run at one sweep point.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub run: String,
    /// Unix seconds.
    pub created: u64,
    /// The sweep point's label; empty outside a sweep.
    pub point: String,
    /// `stage.param` → value.
    pub params: BTreeMap<String, Json>,
    /// `stage.metric` → value.
    pub metrics: BTreeMap<String, f64>,
}

/// The rows of one run: one per sweep point, each with the parameters and metrics of the stage
/// instances that compute that point.
pub fn rows(entry: &RunEntry) -> Vec<Row> {
    entry
        .points
        .iter()
        .map(|point| {
            let mut row = Row {
                run: entry.id.clone(),
                created: entry.started_at,
                point: point.label.clone(),
                params: BTreeMap::new(),
                metrics: BTreeMap::new(),
            };
            for stage in point.instances.iter().filter_map(|i| entry.stages.get(i)) {
                for (name, value) in &stage.params {
                    row.params.insert(format!("{}.{name}", stage.stage), value.clone());
                }
                for (name, value) in &stage.metrics {
                    row.metrics.insert(format!("{}.{name}", stage.stage), *value);
                }
            }
            row
        })
        .collect()
}

/// How `exp show` lays out its table.
#[derive(Debug, Clone, Default)]
pub struct ShowOptions {
    /// Keep only the parameter and metric columns whose values differ between rows.
    pub only_changed: bool,
    /// A column to sort the rows by (its full name, or a suffix naming one column).
    pub sort_by: Option<String>,
    pub descending: bool,
    /// Significant digits of metric values (JSON keeps them all).
    pub precision: usize,
}

/// A rendered-ready table: a header and rows of cells (`None`: no value).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// The `exp show` table of `rows`: run, creation time and point, then metrics, then parameters.
pub fn show_table(mut rows: Vec<Row>, opts: &ShowOptions) -> Result<Table, String> {
    let metric_names: BTreeSet<String> =
        rows.iter().flat_map(|r| r.metrics.keys().cloned()).collect();
    let param_names: BTreeSet<String> =
        rows.iter().flat_map(|r| r.params.keys().cloned()).collect();
    // The sort column is looked up among every column, not only the shown ones: sorting by a
    // column that `only_changed` hides is allowed (and, constant, leaves the order as it is).
    let sort_column = match &opts.sort_by {
        Some(column) => {
            let all: Vec<&String> = metric_names.iter().chain(&param_names).collect();
            Some(pick_column(column, &all)?)
        }
        None => None,
    };
    let varies = |values: Vec<Option<String>>| values.windows(2).any(|w| w[0] != w[1]);
    let metric_names: Vec<String> = metric_names
        .into_iter()
        .filter(|m| {
            !opts.only_changed
                || varies(rows.iter().map(|r| r.metrics.get(m).map(|v| v.to_string())).collect())
        })
        .collect();
    let param_names: Vec<String> = param_names
        .into_iter()
        .filter(|p| {
            !opts.only_changed
                || varies(rows.iter().map(|r| r.params.get(p).map(Json::to_string)).collect())
        })
        .collect();

    if let Some(name) = sort_column {
        let sort_key = |r: &Row| -> Option<f64> {
            r.metrics.get(&name).copied().or_else(|| r.params.get(&name).and_then(Json::as_f64))
        };
        let text_key = |r: &Row| r.params.get(&name).map(cell);
        // Rows without the column go last either way.
        let missing = |r: &Row| !r.metrics.contains_key(&name) && !r.params.contains_key(&name);
        rows.sort_by(|a, b| {
            missing(a).cmp(&missing(b)).then_with(|| {
                let ord = match (sort_key(a), sort_key(b)) {
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    _ => text_key(a).cmp(&text_key(b)),
                };
                if opts.descending {
                    ord.reverse()
                } else {
                    ord
                }
            })
        });
    }

    let sweep = rows.iter().any(|r| !r.point.is_empty());
    let mut header = vec!["run".to_string(), "created".to_string()];
    if sweep {
        header.push("point".to_string());
    }
    header.extend(metric_names.iter().cloned());
    header.extend(param_names.iter().cloned());
    let body = rows
        .iter()
        .map(|r| {
            let mut cells = vec![Some(r.run.clone()), Some(utc(r.created))];
            if sweep {
                cells.push(Some(r.point.clone()));
            }
            cells.extend(
                metric_names.iter().map(|m| r.metrics.get(m).map(|v| number(*v, opts.precision))),
            );
            cells.extend(param_names.iter().map(|p| r.params.get(p).map(cell)));
            cells
        })
        .collect();
    Ok(Table { header, rows: body })
}

/// The one column `wanted` names: exactly, or as the unique column ending in `.wanted`.
fn pick_column(wanted: &str, columns: &[&String]) -> Result<String, String> {
    if let Some(exact) = columns.iter().find(|c| c.as_str() == wanted) {
        return Ok((*exact).clone());
    }
    let suffix = format!(".{wanted}");
    let hits: Vec<&&String> = columns.iter().filter(|c| c.ends_with(&suffix)).collect();
    match hits.as_slice() {
        [one] => Ok((**one).clone()),
        [] => Err(format!("no column `{wanted}` to sort by")),
        many => Err(format!(
            "`{wanted}` names several columns ({}); give the full name",
            many.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// One changed (or, when asked for all, unchanged) value between two runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffLine {
    /// The sweep point's label; empty outside a sweep.
    pub point: String,
    /// `stage.metric` or `stage.param`.
    pub name: String,
    pub old: Option<Json>,
    pub new: Option<Json>,
    /// new − old, for two numbers.
    pub change: Option<f64>,
}

/// What distinguishes two runs' rows: their metrics (`metrics diff`) or parameters
/// (`params diff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffOf {
    Metrics,
    Params,
}

/// The values that differ between run `a` and run `b` (all of them with `all`), point by point.
pub fn diff(a: &RunEntry, b: &RunEntry, of: DiffOf, all: bool) -> Vec<DiffLine> {
    let values = |row: &Row| -> BTreeMap<String, Json> {
        match of {
            DiffOf::Metrics => {
                row.metrics.iter().map(|(k, v)| (k.clone(), Json::from(*v))).collect()
            }
            DiffOf::Params => row.params.clone(),
        }
    };
    let (rows_a, rows_b) = (rows(a), rows(b));
    let mut points: Vec<&str> = rows_a.iter().map(|r| r.point.as_str()).collect();
    points.extend(
        rows_b.iter().map(|r| r.point.as_str()).filter(|p| !rows_a.iter().any(|r| r.point == *p)),
    );
    let mut out = Vec::new();
    for point in points {
        let old = rows_a.iter().find(|r| r.point == point).map(values).unwrap_or_default();
        let new = rows_b.iter().find(|r| r.point == point).map(values).unwrap_or_default();
        let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for name in names {
            let (o, n) = (old.get(name), new.get(name));
            if o == n && !all {
                continue;
            }
            let change = match (o.and_then(Json::as_f64), n.and_then(Json::as_f64)) {
                (Some(x), Some(y)) if of == DiffOf::Metrics => Some(y - x),
                _ => None,
            };
            out.push(DiffLine {
                point: point.to_string(),
                name: name.clone(),
                old: o.cloned(),
                new: n.cloned(),
                change,
            });
        }
    }
    out
}

/// The table of a diff between runs named `a` and `b`.
pub fn diff_table(lines: &[DiffLine], a: &str, b: &str, of: DiffOf, precision: usize) -> Table {
    let sweep = lines.iter().any(|l| !l.point.is_empty());
    let mut header = Vec::new();
    if sweep {
        header.push("point".to_string());
    }
    header.push(match of {
        DiffOf::Metrics => "metric".to_string(),
        DiffOf::Params => "param".to_string(),
    });
    header.extend([a.to_string(), b.to_string()]);
    if of == DiffOf::Metrics {
        header.push("change".to_string());
    }
    let show = |v: &Option<Json>| {
        v.as_ref().map(|v| match v.as_f64() {
            Some(x) if of == DiffOf::Metrics => number(x, precision),
            _ => cell(v),
        })
    };
    let rows = lines
        .iter()
        .map(|l| {
            let mut cells = Vec::new();
            if sweep {
                cells.push(Some(l.point.clone()));
            }
            cells.extend([Some(l.name.clone()), show(&l.old), show(&l.new)]);
            if of == DiffOf::Metrics {
                cells.push(l.change.map(|c| signed(c, precision)));
            }
            cells
        })
        .collect();
    Table { header, rows }
}

/// One run's metrics (`metrics show`): a line per point and metric.
pub fn metrics_table(rows: &[Row], precision: usize) -> Table {
    let sweep = rows.iter().any(|r| !r.point.is_empty());
    let mut header = Vec::new();
    if sweep {
        header.push("point".to_string());
    }
    header.extend(["metric".to_string(), "value".to_string()]);
    let mut lines = Vec::new();
    for row in rows {
        for (name, value) in &row.metrics {
            let mut cells = Vec::new();
            if sweep {
                cells.push(Some(row.point.clone()));
            }
            cells.extend([Some(name.clone()), Some(number(*value, precision))]);
            lines.push(cells);
        }
    }
    Table { header, rows: lines }
}

fn signed(x: f64, digits: usize) -> String {
    if x > 0.0 {
        format!("+{}", number(x, digits))
    } else {
        number(x, digits)
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM` (UTC).
fn utc(secs: u64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let (hour, minute) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}")
}

/// How a table is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns for a terminal.
    Plain,
    Markdown,
    Csv,
}

/// `table` as text in `format` (missing values: `-`, or an empty CSV field).
pub fn render(table: &Table, format: Format) -> String {
    let missing = if format == Format::Csv { "" } else { "-" };
    let rows: Vec<Vec<&str>> = table
        .rows
        .iter()
        .map(|r| r.iter().map(|c| c.as_deref().unwrap_or(missing)).collect())
        .collect();
    let header: Vec<&str> = table.header.iter().map(String::as_str).collect();
    let mut out = String::new();
    match format {
        Format::Plain => {
            let widths: Vec<usize> = (0..header.len())
                .map(|i| {
                    std::iter::once(&header)
                        .chain(&rows)
                        .map(|r| r[i].chars().count())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for row in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> =
                    row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                out.push_str(cells.join("  ").trim_end());
                out.push('\n');
            }
        }
        Format::Markdown => {
            let line = |cells: &[&str]| {
                let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
                format!("| {} |\n", escaped.join(" | "))
            };
            out.push_str(&line(&header));
            out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
            rows.iter().for_each(|r| out.push_str(&line(r)));
        }
        Format::Csv => {
            let field = |c: &str| {
                if c.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c.to_string()
                }
            };
            for row in std::iter::once(&header).chain(&rows) {
                out.push_str(&row.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{PointEntry, StageEntry, JOURNAL_SCHEMA};

    fn stage(name: &str, params: &[(&str, Json)], metrics: &[(&str, f64)]) -> StageEntry {
        StageEntry {
            stage: name.split('@').next().unwrap().into(),
            kind: "shell".into(),
            key: Some(format!("key-{name}")),
            state: "ran".into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    /// A sweep over `train.lr` with a shared `data` stage and per-point `train` and `score`.
    fn sweep_run(id: &str, fids: [f64; 2]) -> RunEntry {
        let mut stages = BTreeMap::new();
        stages.insert("data".into(), stage("data", &[("n", Json::from(8))], &[]));
        for (lr, fid) in [("0.1", fids[0]), ("0.2", fids[1])] {
            let t = format!("train@lr={lr}");
            let s = format!("score@lr={lr}");
            stages.insert(
                t.clone(),
                stage(&t, &[("lr", serde_json::json!(lr.parse::<f64>().unwrap()))], &[]),
            );
            stages.insert(s.clone(), stage(&s, &[], &[("fid", fid)]));
        }
        let point = |lr: &str| PointEntry {
            label: format!("train.lr={lr}"),
            instances: vec!["data".into(), format!("train@lr={lr}"), format!("score@lr={lr}")],
        };
        RunEntry {
            schema: JOURNAL_SCHEMA,
            id: id.into(),
            started_at: 1_765_076_400, // 2025-12-07 03:00 UTC
            pipeline: "p.yaml".into(),
            ok: true,
            points: vec![point("0.1"), point("0.2")],
            stages,
        }
    }

    #[test]
    fn a_sweep_run_has_one_row_per_point_with_its_instances_values() {
        let rows = rows(&sweep_run("r1", [10.0, 20.0]));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].point, "train.lr=0.2");
        assert_eq!(rows[1].params["train.lr"], serde_json::json!(0.2));
        assert_eq!(rows[1].params["data.n"], serde_json::json!(8));
        assert_eq!(rows[1].metrics["score.fid"], 20.0);
    }

    #[test]
    fn only_changed_keeps_the_columns_that_differ_between_rows() {
        let opts = ShowOptions { only_changed: true, precision: 5, ..Default::default() };
        let table = show_table(rows(&sweep_run("r1", [10.0, 20.0])), &opts).unwrap();
        assert_eq!(table.header, ["run", "created", "point", "score.fid", "train.lr"]);
        assert_eq!(table.rows[0][1].as_deref(), Some("2025-12-07 03:00"));
    }

    #[test]
    fn rows_sort_by_a_column_named_by_its_suffix() {
        let opts = ShowOptions {
            sort_by: Some("fid".into()),
            descending: true,
            precision: 5,
            ..Default::default()
        };
        let table = show_table(rows(&sweep_run("r1", [10.0, 20.0])), &opts).unwrap();
        let fids: Vec<_> = table.rows.iter().map(|r| r[3].clone().unwrap()).collect();
        assert_eq!(fids, ["20", "10"]);
        let opts = ShowOptions { sort_by: Some("nope".into()), ..Default::default() };
        assert!(show_table(vec![], &opts).unwrap_err().contains("no column `nope`"));
    }

    #[test]
    fn rows_sort_by_a_column_that_only_changed_hides() {
        let opts = ShowOptions {
            only_changed: true,
            sort_by: Some("data.n".into()),
            precision: 5,
            ..Default::default()
        };
        let table = show_table(rows(&sweep_run("r1", [10.0, 20.0])), &opts).unwrap();
        assert!(!table.header.iter().any(|h| h == "data.n"), "{:?}", table.header);
        assert_eq!(table.rows.len(), 2);
    }

    #[test]
    fn a_metrics_diff_matches_points_and_lists_what_changed() {
        let lines = diff(
            &sweep_run("a", [10.0, 20.0]),
            &sweep_run("b", [10.0, 15.0]),
            DiffOf::Metrics,
            false,
        );
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].point, "train.lr=0.2");
        assert_eq!(lines[0].change, Some(-5.0));
        let all = diff(
            &sweep_run("a", [10.0, 20.0]),
            &sweep_run("b", [10.0, 15.0]),
            DiffOf::Metrics,
            true,
        );
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn numbers_keep_their_significant_digits_without_trailing_zeros() {
        assert_eq!(number(24.853_924_751, 5), "24.854");
        assert_eq!(number(0.0201234, 3), "0.0201");
        assert_eq!(number(188.0, 5), "188");
        assert_eq!(number(123456.7, 3), "123457");
        assert_eq!(signed(1.5, 3), "+1.5");
    }

    #[test]
    fn tables_render_as_markdown_and_csv_with_escaping() {
        let table = Table {
            header: vec!["a".into(), "b".into()],
            rows: vec![
                vec![Some("x|y".into()), None],
                vec![Some("1,2".into()), Some("\"q\"".into())],
            ],
        };
        assert_eq!(
            render(&table, Format::Markdown),
            "| a | b |\n|---|---|\n| x\\|y | - |\n| 1,2 | \"q\" |\n"
        );
        assert_eq!(render(&table, Format::Csv), "a,b\nx|y,\n\"1,2\",\"\"\"q\"\"\"\n");
        assert_eq!(render(&table, Format::Plain), "a    b\nx|y  -\n1,2  \"q\"\n");
    }
}
