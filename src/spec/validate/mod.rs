//! Turn a parsed document into a [`Pipeline`], collecting every error with its location.
//!
//! The [`Validator`] walks the document once; its methods are grouped by concern: the file's
//! top level and shared helpers (here), one stage ([`stage`]), a kind's parameters
//! ([`params`]), `${...}` references ([`templates`]), and placement settings ([`placement`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use std::sync::Arc;

use indexmap::IndexMap;
use sdpipe_stages::api::{ParamType, Registry};
use sdpipe_stages::device::DeviceChoice;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use super::error::{SpecError, SpecErrors};
use super::overrides::{self, Override};
use super::resources::{self, ExecutorChoice, Resources, RESOURCE_KEYS};
use super::template::{self, Namespace};
use super::yaml::{Document, Seg};
use super::{Action, Dep, InputRef, Output, Pipeline, SourceFile, Stage};

mod params;
mod placement;
mod stage;
mod templates;

pub use params::check_type;
use placement::Placement;

const TOP_KEYS: &[&str] = &["vars", "stages", "sweep", "remote", "executor", "resources", "device"];
const STAGE_KEYS: &[&str] = &[
    "uses",
    "with",
    "run",
    "deps",
    "inputs",
    "outs",
    "params",
    "env",
    "threads",
    "desc",
    "gather",
    "executor",
    "resources",
    "device",
];

/// Validate `doc` (the file at `file`) against the registry's kinds.
pub fn validate(
    file: &Path,
    mut doc: Document,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, SpecErrors> {
    overrides::apply(&mut doc.value, overrides)?;
    // YAML merge keys (`<<: *defaults`) are resolved before anything looks at the values.
    doc.value.apply_merge().map_err(|e| SpecError::unlocated(format!("merge keys: {e}")))?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut v = Validator { doc: &doc, errors: Vec::new(), dir: &dir, remote: None };
    let (vars, stages) = v.pipeline(registry);
    let (errors, remote) = (v.errors, v.remote);
    let pipeline = Pipeline {
        file: file.to_path_buf(),
        name: file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        dir,
        source: doc.source.clone(),
        vars,
        stages,
        remote,
        points: Vec::new(),
    };
    // Cycles are checked even when other errors were found, so one pass reports everything.
    let mut errors = errors;
    errors.extend(cycle_errors(&pipeline));
    if errors.is_empty() {
        Ok(pipeline)
    } else {
        Err(SpecErrors(errors))
    }
}

struct Validator<'a> {
    doc: &'a Document,
    errors: Vec<SpecError>,
    dir: &'a Path,
    /// The `remote:` setting, once validated.
    remote: Option<super::remote_settings::RemoteSettings>,
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

fn type_name(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "null",
        Yaml::Bool(_) => "boolean",
        Yaml::Number(_) => "number",
        Yaml::String(_) => "string",
        Yaml::Sequence(_) => "list",
        Yaml::Mapping(_) => "mapping",
        Yaml::Tagged(_) => "tagged value",
    }
}

fn json_type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(n) if n.is_f64() => "float",
        Json::Number(_) => "integer",
        Json::String(_) => "string",
        Json::Array(_) => "list",
        Json::Object(_) => "mapping",
    }
}

/// What [`valid_name`] accepts, for messages (a 300-letter name is refused for its length).
const NAME_RULE: &str = "may only use letters, digits, `_` and `-`, at most 64 of them";

/// Names used as file names and environment variable suffixes.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl<'a> Validator<'a> {
    fn source(&self) -> &Arc<SourceFile> {
        &self.doc.source
    }

    fn err_value(&mut self, path: &[Seg], message: impl Into<String>) -> &mut SpecError {
        let span = self.doc.locator.value(path);
        self.errors.push(SpecError::at(self.source(), span, message));
        self.errors.last_mut().unwrap()
    }

    fn err_key(&mut self, path: &[Seg], message: impl Into<String>) -> &mut SpecError {
        let span = self.doc.locator.key(path);
        self.errors.push(SpecError::at(self.source(), span, message));
        self.errors.last_mut().unwrap()
    }

    /// A mapping with string keys, reporting keys outside `allowed` (when given).
    fn mapping<'v>(
        &mut self,
        value: &'v Yaml,
        path: &[Seg],
        what: &str,
        allowed: Option<&[&str]>,
    ) -> Vec<(String, &'v Yaml)> {
        let Yaml::Mapping(map) = value else {
            let found = type_name(value);
            self.err_value(path, format!("{what} must be a mapping, found {found}"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let Some(k) = k.as_str() else {
                self.err_value(path, format!("{what} has a non-string key"));
                continue;
            };
            let mut p = path.to_vec();
            p.push(key(k));
            if let Some(allowed) = allowed {
                if !allowed.contains(&k) {
                    let e = self.err_key(&p, format!("unknown key `{k}` in {what}"));
                    *e = e.clone().label("unknown key").suggest(k, allowed.iter().copied());
                    if e.help.is_none() {
                        e.help = Some(format!("expected one of: {}", allowed.join(", ")));
                    }
                    continue;
                }
            }
            out.push((k.to_string(), v));
        }
        out
    }

    fn string(&mut self, value: &Yaml, path: &[Seg], what: &str) -> Option<String> {
        match value {
            Yaml::String(s) => Some(s.clone()),
            other => {
                let found = type_name(other);
                self.err_value(path, format!("{what} must be a string, found {found}"));
                None
            }
        }
    }

    /// A YAML value as canonical JSON: finite numbers, string keys, no tags.
    fn yaml_to_json(&mut self, value: &Yaml, path: &[Seg]) -> Option<Json> {
        Some(match value {
            Yaml::Null => Json::Null,
            Yaml::Bool(b) => Json::Bool(*b),
            Yaml::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Json::from(i)
                } else if let Some(u) = n.as_u64() {
                    Json::from(u)
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    match serde_json::Number::from_f64(f) {
                        Some(n) => Json::Number(n),
                        None => {
                            self.err_value(path, format!("{n} is not a finite number"));
                            return None;
                        }
                    }
                }
            }
            Yaml::String(s) => Json::String(s.clone()),
            Yaml::Sequence(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let mut p = path.to_vec();
                    p.push(Seg::Index(i));
                    out.push(self.yaml_to_json(item, &p)?);
                }
                Json::Array(out)
            }
            Yaml::Mapping(_) => {
                let mut out = serde_json::Map::new();
                for (k, v) in self.mapping(value, path, "value", None) {
                    let mut p = path.to_vec();
                    p.push(key(&k));
                    out.insert(k, self.yaml_to_json(v, &p)?);
                }
                Json::Object(out)
            }
            Yaml::Tagged(t) => {
                self.err_value(path, format!("YAML tags (`{}`) are not supported", t.tag));
                return None;
            }
        })
    }

    fn pipeline(
        &mut self,
        registry: &Registry,
    ) -> (BTreeMap<String, Json>, IndexMap<String, Stage>) {
        let root = &self.doc.value;
        let top = self.mapping(root, &[], "the pipeline", Some(TOP_KEYS));
        let mut vars = BTreeMap::new();
        let mut raw_stages = None;
        let mut default_executor = ExecutorChoice::Local;
        let mut default_resources = Resources::default();
        let mut default_device = DeviceChoice::Auto;
        for (k, v) in top {
            match k.as_str() {
                "vars" => {
                    for (name, value) in self.mapping(v, &[key("vars")], "`vars`", None) {
                        let path = [key("vars"), key(&name)];
                        if let Some(json) = self.yaml_to_json(value, &path) {
                            vars.insert(name, json);
                        }
                    }
                }
                "stages" => raw_stages = Some(v),
                // Checked and expanded by `sweep`.
                "sweep" => {}
                "remote" => self.remote = self.remote_settings(v),
                "executor" => {
                    if let Some(e) = self.executor_choice(v, &[key("executor")]) {
                        default_executor = e;
                    }
                }
                "resources" => default_resources = self.resources(v, &[key("resources")]),
                "device" => {
                    if let Some(d) = self.device_choice(v, &[key("device")]) {
                        default_device = d;
                    }
                }
                _ => unreachable!("filtered by mapping()"),
            }
        }
        let Some(raw_stages) = raw_stages else {
            self.err_value(&[], "the pipeline has no `stages`").help =
                Some("add `stages:` with at least one stage".into());
            return (vars, IndexMap::new());
        };
        let entries = self.mapping(raw_stages, &[key("stages")], "`stages`", None);
        if entries.is_empty() && matches!(raw_stages, Yaml::Mapping(_)) {
            self.err_value(&[key("stages")], "`stages` is empty");
        }

        // Pass 1: each stage on its own. Pass 2: bindings between stages.
        let mut stages = IndexMap::new();
        let mut bindings = Vec::new();
        for (name, raw) in entries {
            let path = vec![key("stages"), key(&name)];
            if !valid_name(&name) {
                self.err_key(&path, format!("stage name `{name}` {NAME_RULE}"));
                continue;
            }
            if let Some((mut stage, inputs)) = self.stage(&name, raw, &path, registry, &vars) {
                let defaults = Placement {
                    executor: default_executor,
                    resources: &default_resources,
                    device: default_device,
                };
                self.placement(&mut stage, raw, &path, &defaults);
                bindings.push((name.clone(), inputs));
                stages.insert(name, stage);
            }
        }
        for (name, inputs) in bindings {
            for (input, (text, path)) in inputs {
                if let Some(binding) = self.binding(&text, &path, &name, &stages) {
                    stages.get_mut(&name).unwrap().inputs.insert(input, binding);
                }
            }
        }
        (vars, stages)
    }
}

/// Report every cycle, naming each stage on it, at the first stage's definition.
fn cycle_errors(pipeline: &Pipeline) -> Vec<SpecError> {
    super::cycles::cycles(pipeline)
        .into_iter()
        .map(|cycle| {
            let first = &pipeline.stages[&cycle[0]];
            let mut ring = cycle.clone();
            ring.push(cycle[0].clone());
            SpecError::at(
                &pipeline.source,
                first.span,
                format!("dependency cycle: {}", ring.join(" → ")),
            )
            .label("cycle starts here")
            .help("a stage cannot (transitively) consume its own output")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Pipeline;

    fn load(text: &str) -> Result<Pipeline, SpecErrors> {
        let file = Path::new("/project/p.yaml");
        Pipeline::from_source(file, "p.yaml".into(), text.into(), &crate::kinds::builtin(), &[])
    }

    #[test]
    fn a_stage_takes_the_pipelines_device_unless_it_sets_its_own() {
        let pipeline = load(
            "device: cpu\nstages:\n  a:\n    run: 'true'\n  b:\n    run: 'true'\n    device: cuda:1\n",
        )
        .unwrap();
        assert_eq!(pipeline.stages["a"].device, DeviceChoice::Cpu);
        assert_eq!(pipeline.stages["b"].device, DeviceChoice::Cuda(1));
    }

    #[test]
    fn the_device_is_auto_when_nothing_sets_it() {
        let pipeline = load("stages:\n  a:\n    run: 'true'\n").unwrap();
        assert_eq!(pipeline.stages["a"].device, DeviceChoice::Auto);
    }

    #[test]
    fn an_unknown_device_is_refused_at_its_line() {
        let errors = load("stages:\n  a:\n    run: 'true'\n    device: tpu\n").err().unwrap();
        let located = errors.0[0].located();
        assert!(located.starts_with("p.yaml:4:13: `tpu` is not a device"), "{located}");
    }
}
