//! `sdpipe gc` and `sdpipe cache stats|verify`.

use super::*;

/// `sdpipe gc`.
pub(super) fn gc(
    dry_run: bool,
    keep_last: usize,
    json: bool,
    cache_dir: Option<&Path>,
) -> Result<i32, CliError> {
    let cache = standalone_cache(cache_dir)?;
    let _lock = cache.maintenance_lock(true).map_err(io_err("cache lock"))?;
    let report = maintenance::gc(&cache, keep_last, dry_run).map_err(io_err("gc"))?;
    if json {
        print_json(&report);
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        outln!(
            "{verb} {} records and {} objects ({}), kept {} records",
            report.records_removed,
            report.objects_removed,
            human_bytes(report.bytes_freed),
            report.records_kept
        );
    }
    Ok(exit::OK)
}

/// `sdpipe cache stats` and `sdpipe cache verify`.
pub(super) fn cache(action: CacheAction, cache_dir: Option<&Path>) -> Result<i32, CliError> {
    let cache = standalone_cache(cache_dir)?;
    match action {
        CacheAction::Stats { json } => {
            let stats = maintenance::stats(&cache).map_err(io_err("stats"))?;
            if json {
                print_json(&stats);
            } else {
                outln!("cache:    {}", cache.root().display());
                outln!("objects:  {} ({})", stats.objects, human_bytes(stats.object_bytes));
                outln!("records:  {} results of {} stages", stats.records, stats.stages_tracked);
                outln!("index:    {}", human_bytes(stats.index_bytes));
            }
            Ok(exit::OK)
        }
        CacheAction::Verify { json } => {
            let _lock = cache.maintenance_lock(true).map_err(io_err("cache lock"))?;
            let report = maintenance::verify(&cache).map_err(io_err("verify"))?;
            if json {
                print_json(&report);
            } else {
                outln!("checked {} objects", report.objects_checked);
                for d in &report.corrupt_objects {
                    outln!("corrupt object removed: {d}");
                }
                for r in &report.records_evicted {
                    outln!("record evicted: {r}");
                }
                if let Some(aside) = &report.damaged_index_moved_to {
                    outln!("damaged index moved to {aside}; a fresh one replaces it");
                }
                if report.corrupt_objects.is_empty() && report.records_evicted.is_empty() {
                    outln!("all objects intact");
                }
            }
            let intact = report.corrupt_objects.is_empty()
                && report.records_evicted.is_empty()
                && report.damaged_index_moved_to.is_none();
            Ok(if intact { exit::OK } else { exit::FAILED })
        }
    }
}
