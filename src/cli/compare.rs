//! `sdpipe exp show`, `metrics show|diff` and `params diff`: recorded runs compared (see
//! [`crate::experiments`] and [`crate::journal`]).

use super::*;

impl TableFormat {
    fn style(&self) -> experiments::Format {
        if self.md {
            experiments::Format::Markdown
        } else if self.csv {
            experiments::Format::Csv
        } else {
            experiments::Format::Plain
        }
    }
}

/// The recorded runs of the pipeline file at `pipeline`, oldest first. The file itself is not
/// read: its runs stay comparable after it changed or was removed.
pub(super) fn journal_entries(
    pipeline: &Path,
    cache_dir: Option<&Path>,
) -> Result<Vec<journal::RunEntry>, CliError> {
    let file = std::path::absolute(pipeline).map_err(io_err("cannot resolve the pipeline path"))?;
    let project = Project::locate(&file, cache_dir);
    journal::Journal::new(&project.cache_dir, &project.pipeline_rel)
        .entries()
        .map_err(io_err("cannot read the run journal"))
}

/// `metrics diff` and `params diff`.
pub(super) fn diff_command(
    args: DiffArgs,
    cache_dir: Option<&Path>,
    of: experiments::DiffOf,
) -> Result<i32, CliError> {
    let entries = journal_entries(&args.pipeline, cache_dir)?;
    let a = journal::resolve(&entries, &args.a).map_err(CliError::Usage)?;
    let b = journal::resolve(&entries, &args.b).map_err(CliError::Usage)?;
    let lines = experiments::diff(a, b, of, args.all);
    if args.format.json {
        print_json(&serde_json::json!({"a": a.id, "b": b.id, "changes": lines}));
        return Ok(exit::OK);
    }
    let table = experiments::diff_table(&lines, &a.id, &b.id, of, args.format.precision);
    out!("{}", experiments::render(&table, args.format.style()));
    Ok(exit::OK)
}

/// `sdpipe exp show`.
pub(super) fn exp_show(
    pipeline: &Path,
    only_changed: bool,
    sort_by: Option<String>,
    sort_order: SortOrder,
    num: Option<usize>,
    format: &TableFormat,
    cache_dir: Option<&Path>,
) -> Result<i32, CliError> {
    let entries = journal_entries(pipeline, cache_dir)?;
    let skip = num.map_or(0, |n| entries.len().saturating_sub(n));
    let rows: Vec<experiments::Row> = entries[skip..].iter().flat_map(experiments::rows).collect();
    if format.json {
        print_json(&rows);
        return Ok(exit::OK);
    }
    let opts = experiments::ShowOptions {
        only_changed,
        sort_by,
        descending: matches!(sort_order, SortOrder::Desc),
        precision: format.precision,
    };
    let table = experiments::show_table(rows, &opts).map_err(CliError::Usage)?;
    out!("{}", experiments::render(&table, format.style()));
    Ok(exit::OK)
}

/// `sdpipe metrics show`.
pub(super) fn metrics_show(
    pipeline: &Path,
    run: &str,
    format: &TableFormat,
    cache_dir: Option<&Path>,
) -> Result<i32, CliError> {
    let entries = journal_entries(pipeline, cache_dir)?;
    let entry = journal::resolve(&entries, run).map_err(CliError::Usage)?;
    let rows = experiments::rows(entry);
    if format.json {
        let json: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"run": r.run, "point": r.point, "metrics": r.metrics}))
            .collect();
        print_json(&json);
        return Ok(exit::OK);
    }
    let table = experiments::metrics_table(&rows, format.precision);
    out!("{}", experiments::render(&table, format.style()));
    Ok(exit::OK)
}
