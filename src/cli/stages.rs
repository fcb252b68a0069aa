//! `sdpipe stages` (the built-in kinds and their parameters) and `sdpipe convert-weights`.

use super::*;

pub(super) fn print_stages(
    registry: &Registry,
    only: Option<&str>,
    json: bool,
) -> Result<i32, CliError> {
    if let Some(name) = only {
        if registry.get(name).is_none() {
            let names: Vec<&str> = registry.names().collect();
            let hint = crate::spec::error::did_you_mean(name, names.iter().copied())
                .map(|n| format!(" (did you mean `{n}`?)"))
                .unwrap_or_default();
            return Err(CliError::Usage(format!(
                "no built-in kind `{name}`{hint}; `shell` stages use `run:`"
            )));
        }
    }
    let kinds: Vec<_> = registry.iter().filter(|k| only.is_none_or(|n| k.name() == n)).collect();
    if json {
        let list: Vec<serde_json::Value> = kinds
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": k.name(),
                    "version": k.version(),
                    "doc": k.doc(),
                    "params": k.params().iter().map(|p| serde_json::json!({
                        "name": p.name, "type": p.ty.describe(), "default": p.default,
                        "required": p.default.is_none(), "doc": p.doc,
                    })).collect::<Vec<_>>(),
                    "outputs": k.outputs().iter().map(|o| serde_json::json!({
                        "name": o.name, "path": o.path, "kind": o.kind, "doc": o.doc,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&list);
        return Ok(exit::OK);
    }
    if only.is_none() {
        outln!("shell (built into the engine)\n  A command run with `run:`; see README.md for `deps`, `inputs`, `outs`, `params`, `env`.\n");
    }
    for k in kinds {
        outln!("{} (version {})\n  {}", k.name(), k.version(), k.doc());
        outln!("  parameters:");
        for p in k.params() {
            let default = match &p.default {
                None => "required".to_string(),
                Some(v) => format!("default {v}"),
            };
            outln!("    {:20} {} ({default})\n    {:20} {}", p.name, p.ty.describe(), "", p.doc);
        }
        outln!("  outputs:");
        for o in k.outputs() {
            outln!("    {:20} {} {:?}: {}", o.name, o.path, o.kind, o.doc);
        }
        outln!();
    }
    Ok(exit::OK)
}

pub(super) fn convert_weights(
    kind: &str,
    input: &Path,
    output: Option<PathBuf>,
) -> Result<i32, CliError> {
    use sdpipe_metrics::{convert_weights, weights::search_dirs, WeightsKind};
    let kind: WeightsKind = kind.parse().map_err(CliError::Usage)?;
    let output = match output {
        Some(o) => o,
        None => search_dirs()
            .into_iter()
            .next()
            .ok_or_else(|| CliError::Usage("no HOME or SDPIPE_WEIGHTS_DIR: pass OUTPUT".into()))?
            .join(kind.default_file_name()),
    };
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err("create the weights directory"))?;
    }
    let converted = convert_weights(kind, input, &output).map_err(|source| CliError::Convert {
        path: input.to_path_buf(),
        source: Box::new(source),
    })?;
    outln!(
        "wrote {} ({} tensors; left out {} unused)",
        output.display(),
        converted.written,
        converted.dropped.len()
    );
    Ok(exit::OK)
}
