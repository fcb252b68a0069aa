//! Turn a parsed document into a [`Pipeline`], collecting every error with its location.

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

/// The pipeline-level placement settings a stage inherits unless it sets its own.
struct Placement<'a> {
    executor: ExecutorChoice,
    resources: &'a Resources,
    device: DeviceChoice,
}

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

    /// `remote: s3://bucket/prefix`, or a mapping with `url` and connection options.
    fn remote_settings(&mut self, value: &Yaml) -> Option<super::remote_settings::RemoteSettings> {
        use super::remote_settings::{parse_url, RemoteSettings};
        const KEYS: &[&str] = &["url", "endpoint", "region", "read_only", "allow_http"];
        let top = [key("remote")];
        let mut settings = RemoteSettings::default();
        match value {
            Yaml::String(url) => settings.url = Some(url.clone()),
            Yaml::Mapping(_) => {
                for (k, v) in self.mapping(value, &top, "`remote`", Some(KEYS)) {
                    let path = [key("remote"), key(&k)];
                    let what = format!("`remote.{k}`");
                    match k.as_str() {
                        "read_only" | "allow_http" => {
                            let Yaml::Bool(b) = v else {
                                let found = type_name(v);
                                self.err_value(
                                    &path,
                                    format!("{what} must be true or false, found {found}"),
                                );
                                continue;
                            };
                            if k == "read_only" {
                                settings.read_only = Some(*b);
                            } else {
                                settings.allow_http = Some(*b);
                            }
                        }
                        _ => {
                            let Some(s) = self.string(v, &path, &what) else { continue };
                            match k.as_str() {
                                "url" => settings.url = Some(s),
                                "endpoint" => settings.endpoint = Some(s),
                                _ => settings.region = Some(s),
                            }
                        }
                    }
                }
            }
            other => {
                let found = type_name(other);
                self.err_value(
                    &top,
                    format!("`remote` must be an s3:// URL or a mapping, found {found}"),
                )
                .help = Some(
                    "write `remote: s3://bucket/prefix`, or `remote: {url: ..., endpoint: ...}`"
                        .into(),
                );
                return None;
            }
        }
        let url_path: Vec<Seg> = if matches!(value, Yaml::Mapping(_)) {
            vec![key("remote"), key("url")]
        } else {
            top.to_vec()
        };
        match &settings.url {
            Some(url) => {
                if let Err(e) = parse_url(url) {
                    self.err_value(&url_path, e);
                    return None;
                }
            }
            None => {
                self.err_value(&top, "`remote` has no `url`").help =
                    Some("add `url: s3://bucket/prefix`".into());
                return None;
            }
        }
        if let Some(endpoint) = &settings.endpoint {
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                self.err_value(
                    &[key("remote"), key("endpoint")],
                    format!("`remote.endpoint` `{endpoint}` is not an http(s) URL"),
                );
                return None;
            }
        }
        Some(settings)
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

    /// Validate one stage; its input bindings are returned unresolved for pass 2.
    #[allow(clippy::type_complexity)]
    fn stage(
        &mut self,
        name: &str,
        raw: &Yaml,
        path: &[Seg],
        registry: &Registry,
        vars: &BTreeMap<String, Json>,
    ) -> Option<(Stage, Vec<(String, (String, Vec<Seg>))>)> {
        let fields: BTreeMap<String, &Yaml> = self
            .mapping(raw, path, &format!("stage `{name}`"), Some(STAGE_KEYS))
            .into_iter()
            .collect();
        if !matches!(raw, Yaml::Mapping(_)) {
            return None;
        }
        let at = |k: &str| {
            let mut p = path.to_vec();
            p.push(key(k));
            p
        };
        let span = self.doc.locator.key(path);
        let mut stage = Stage {
            name: name.to_string(),
            action: Action::Shell { command: String::new(), env: Vec::new() },
            params: BTreeMap::new(),
            inputs: BTreeMap::new(),
            deps: BTreeMap::new(),
            outputs: Vec::new(),
            threads: 1,
            span,
            gather: false,
            gathered: BTreeMap::new(),
            point: None,
            executor: ExecutorChoice::Local,
            resources: Resources::default(),
            device: DeviceChoice::Auto,
        };
        let mut pending_inputs = Vec::new();
        let builtin_only = ["with"];
        let shell_only = ["run", "deps", "inputs", "outs", "params", "env"];

        match (fields.get("uses"), fields.get("run")) {
            (Some(_), Some(_)) => {
                self.err_key(&at("run"), format!("stage `{name}` has both `uses` and `run`"))
                    .help = Some(
                    "a stage is either a built-in kind (`uses`) or a shell command (`run`)".into(),
                );
                return None;
            }
            (None, None) => {
                self.err_key(
                    path,
                    format!("stage `{name}` needs `uses: <kind>` or `run: <command>`"),
                );
                return None;
            }
            (Some(uses), None) => {
                for k in shell_only {
                    if fields.contains_key(k) {
                        self.err_key(
                            &at(k),
                            format!("`{k}` belongs to shell stages, not built-in kinds"),
                        )
                        .help = Some(
                            "pass a built-in kind's parameters and inputs under `with`".into(),
                        );
                    }
                }
                let kind_name = self.string(uses, &at("uses"), "`uses`")?;
                let Some(kind) = registry.get(&kind_name) else {
                    let e =
                        self.err_value(&at("uses"), format!("unknown stage kind `{kind_name}`"));
                    *e = e.clone().label("unknown kind").suggest(&kind_name, registry.names());
                    if e.help.is_none() {
                        let names: Vec<_> = registry.names().collect();
                        e.help = Some(format!("built-in kinds: {}", names.join(", ")));
                    }
                    return None;
                };
                let empty = Yaml::Mapping(Default::default());
                let with = fields.get("with").copied().unwrap_or(&empty);
                self.builtin_params(
                    &kind,
                    with,
                    &at("with"),
                    vars,
                    &mut stage,
                    &mut pending_inputs,
                );
                for o in kind.outputs() {
                    stage.outputs.push(Output {
                        name: o.name.to_string(),
                        path: o.path.to_string(),
                        kind: Some(o.kind),
                    });
                }
                stage.threads = kind.threads(&stage.params).max(1);
                stage.action = Action::Builtin(kind);
            }
            (None, Some(run)) => {
                for k in builtin_only {
                    if fields.contains_key(k) {
                        self.err_key(&at(k), format!("`{k}` belongs to built-in kinds (`uses`)"))
                            .help = Some(
                            "a shell stage takes `params`, `deps`, `inputs` and `outs`".into(),
                        );
                    }
                }
                let command = self.string(run, &at("run"), "`run`")?;
                if command.trim().is_empty() {
                    self.err_value(&at("run"), "`run` is empty");
                }
                if let Some(params) = fields.get("params") {
                    for (pname, value) in self.mapping(params, &at("params"), "`params`", None) {
                        let mut p = at("params");
                        p.push(key(&pname));
                        if !valid_name(&pname) {
                            self.err_key(&p, format!("param name `{pname}` {NAME_RULE}"));
                            continue;
                        }
                        if let Some(v) = self.yaml_to_json(value, &p) {
                            // On a bad `${vars.x}` keep the raw value: the error is reported
                            // once, not again as an unknown `${params.name}`.
                            let v = self.interpolate(v.clone(), &p, vars).unwrap_or(v);
                            stage.params.insert(pname, v);
                        }
                    }
                }
                if let Some(deps) = fields.get("deps") {
                    for (dname, pattern, p) in self.named_list(deps, &at("deps"), "`deps`") {
                        if self.check_dep(&pattern, &p) {
                            stage.deps.insert(dname, Dep::new(&pattern));
                        }
                    }
                }
                if let Some(inputs) = fields.get("inputs") {
                    for (iname, value) in self.mapping(inputs, &at("inputs"), "`inputs`", None) {
                        let mut p = at("inputs");
                        p.push(key(&iname));
                        if let Some(text) = self.string(value, &p, &format!("input `{iname}`")) {
                            pending_inputs.push((iname, (text, p)));
                        }
                    }
                }
                if let Some(outs) = fields.get("outs") {
                    for (oname, opath, p) in self.named_list(outs, &at("outs"), "`outs`") {
                        if let Some(msg) = relative_path_problem(&opath) {
                            self.err_value(&p, format!("output path `{opath}` {msg}"));
                            continue;
                        }
                        if stage.outputs.iter().any(|o| o.name == oname || o.path == opath) {
                            self.err_value(&p, format!("output `{oname}` is declared twice"));
                            continue;
                        }
                        stage.outputs.push(Output { name: oname, path: opath, kind: None });
                    }
                }
                let mut env = Vec::new();
                if let Some(raw_env) = fields.get("env") {
                    match raw_env {
                        Yaml::Sequence(items) => {
                            for (i, item) in items.iter().enumerate() {
                                let mut p = at("env");
                                p.push(Seg::Index(i));
                                if let Some(var) = self.string(item, &p, "an `env` entry") {
                                    env.push(var);
                                }
                            }
                        }
                        other => {
                            let found = type_name(other);
                            self.err_value(
                                &at("env"),
                                format!("`env` must be a list of variable names, found {found}"),
                            );
                        }
                    }
                }
                env.sort();
                env.dedup();
                let input_names: BTreeSet<&str> =
                    pending_inputs.iter().map(|(n, _)| n.as_str()).collect();
                self.check_references(&command, &at("run"), &stage, &input_names, vars);
                stage.action = Action::Shell { command, env };
            }
        }

        if let Some(threads) = fields.get("threads") {
            match threads.as_u64() {
                Some(t) if (1..=1024).contains(&t) => stage.threads = t as usize,
                _ => {
                    self.err_value(
                        &at("threads"),
                        "`threads` must be an integer between 1 and 1024",
                    );
                }
            }
        }
        if let Some(gather) = fields.get("gather") {
            match (gather.as_bool(), &stage.action) {
                (Some(_), Action::Shell { .. }) => {
                    self.err_key(&at("gather"), "`gather` is for built-in kinds (a report)");
                }
                (Some(g), _) => stage.gather = g,
                (None, _) => {
                    self.err_value(&at("gather"), "`gather` must be true or false");
                }
            }
        }
        if let Some(desc) = fields.get("desc") {
            self.string(desc, &at("desc"), "`desc`");
        }
        Some((stage, pending_inputs))
    }

    /// `executor: local | slurm`.
    fn executor_choice(&mut self, value: &Yaml, path: &[Seg]) -> Option<ExecutorChoice> {
        let name = self.string(value, path, "`executor`")?;
        let choice = ExecutorChoice::parse(&name);
        if choice.is_none() {
            let e = self.err_value(path, format!("unknown executor `{name}`"));
            *e = e
                .clone()
                .label("unknown executor")
                .suggest(&name, ExecutorChoice::NAMES.iter().copied());
            if e.help.is_none() {
                e.help = Some(format!("executors: {}", ExecutorChoice::NAMES.join(", ")));
            }
        }
        choice
    }

    /// `device: auto | cpu | cuda | cuda:N`.
    fn device_choice(&mut self, value: &Yaml, path: &[Seg]) -> Option<DeviceChoice> {
        let text = self.string(value, path, "`device`")?;
        match DeviceChoice::parse(&text) {
            Ok(choice) => Some(choice),
            Err(message) => {
                let e = self.err_value(path, message);
                *e = e.clone().label("unknown device");
                None
            }
        }
    }

    /// `resources: {cpus, gpus, mem, time, partition}`: every field optional, each checked.
    fn resources(&mut self, value: &Yaml, path: &[Seg]) -> Resources {
        let mut r = Resources::default();
        for (k, v) in self.mapping(value, path, "`resources`", Some(RESOURCE_KEYS)) {
            let mut p = path.to_vec();
            p.push(key(&k));
            let what = format!("`resources.{k}`");
            match k.as_str() {
                "cpus" | "gpus" => {
                    let (min, max) = if k == "cpus" { (1, 1024) } else { (0, 64) };
                    match v.as_u64().filter(|n| (min..=max).contains(n)) {
                        Some(n) if k == "cpus" => r.cpus = Some(n as u32),
                        Some(n) => r.gpus = Some(n as u32),
                        None => {
                            self.err_value(
                                &p,
                                format!("{what} must be an integer between {min} and {max}"),
                            );
                        }
                    }
                }
                _ => {
                    // `mem: 2048` and `time: 90` are numbers in YAML but words to Slurm.
                    let text = match v {
                        Yaml::Number(n) => n.to_string(),
                        other => match self.string(other, &p, &what) {
                            Some(s) => s,
                            None => continue,
                        },
                    };
                    let checked = match k.as_str() {
                        "mem" => resources::check_mem(&text).map(|m| r.mem = Some(m)),
                        "time" => resources::check_time(&text).map(|t| r.time = Some(t)),
                        _ => resources::check_partition(&text).map(|s| r.partition = Some(s)),
                    };
                    if let Err(message) = checked {
                        self.err_value(&p, format!("{what}: {message}"));
                    }
                }
            }
        }
        r
    }

    /// Where a stage runs: its own `executor`/`resources`/`device` over the pipeline's.
    fn placement(&mut self, stage: &mut Stage, raw: &Yaml, path: &[Seg], defaults: &Placement) {
        let at = |k: &str| {
            let mut p = path.to_vec();
            p.push(key(k));
            p
        };
        let field = |k: &str| match raw {
            Yaml::Mapping(map) => map.get(k),
            _ => None,
        };
        stage.executor = match field("executor") {
            Some(v) => self.executor_choice(v, &at("executor")).unwrap_or(defaults.executor),
            None => defaults.executor,
        };
        stage.device = match field("device") {
            Some(v) => self.device_choice(v, &at("device")).unwrap_or(defaults.device),
            None => defaults.device,
        };
        let own = match field("resources") {
            Some(v) => self.resources(v, &at("resources")),
            None => Resources::default(),
        };
        stage.resources = defaults.resources.overlaid(&own);
    }

    /// A list of strings (names derived from the values) or a mapping name → string.
    fn named_list(
        &mut self,
        value: &Yaml,
        path: &[Seg],
        what: &str,
    ) -> Vec<(String, String, Vec<Seg>)> {
        let mut out = Vec::new();
        match value {
            Yaml::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    let mut p = path.to_vec();
                    p.push(Seg::Index(i));
                    if let Some(s) = self.string(item, &p, &format!("an entry of {what}")) {
                        out.push((s.clone(), s, p));
                    }
                }
            }
            Yaml::Mapping(_) => {
                for (name, item) in self.mapping(value, path, what, None) {
                    let mut p = path.to_vec();
                    p.push(key(&name));
                    if !valid_name(&name) {
                        self.err_key(&p, format!("name `{name}` {NAME_RULE}"));
                        continue;
                    }
                    if let Some(s) = self.string(item, &p, &format!("`{name}` in {what}")) {
                        out.push((name, s, p));
                    }
                }
            }
            other => {
                let found = type_name(other);
                self.err_value(
                    path,
                    format!("{what} must be a list or a mapping of paths, found {found}"),
                );
            }
        }
        out
    }

    /// A dependency must exist now (a glob must match something): missing files fail before
    /// anything runs.
    fn check_dep(&mut self, pattern: &str, path: &[Seg]) -> bool {
        if pattern.is_empty() {
            self.err_value(path, "empty dependency path");
            return false;
        }
        if crate::hash::is_glob(pattern) {
            match crate::hash::expand_glob(self.dir, pattern) {
                Ok(files) if !files.is_empty() => true,
                Ok(_) => {
                    self.err_value(path, format!("dependency `{pattern}` matches no files"));
                    false
                }
                Err(e) => {
                    self.err_value(path, format!("dependency `{pattern}`: {e}"));
                    false
                }
            }
        } else if self.dir.join(pattern).exists() {
            true
        } else {
            self.err_value(path, format!("dependency `{pattern}` does not exist")).label =
                "missing file".into();
            false
        }
    }

    /// Every `${ns.name}` in a command must name something the stage has.
    fn check_references(
        &mut self,
        command: &str,
        path: &[Seg],
        stage: &Stage,
        inputs: &BTreeSet<&str>,
        vars: &BTreeMap<String, Json>,
    ) {
        for (ns, name) in template::references(command) {
            let known: Vec<&str> = match ns {
                Namespace::Params => stage.params.keys().map(String::as_str).collect(),
                Namespace::Vars => vars.keys().map(String::as_str).collect(),
                Namespace::Deps => stage.deps.keys().map(String::as_str).collect(),
                Namespace::Inputs => inputs.iter().copied().collect(),
                Namespace::Outs => stage.outputs.iter().map(|o| o.name.as_str()).collect(),
            };
            if !known.contains(&name.as_str()) {
                let ns = ns.as_str();
                let e = self.err_value(
                    path,
                    format!("`${{{ns}.{name}}}`: the stage has no {ns} entry `{name}`"),
                );
                *e = e.clone().label("unknown reference").suggest(&name, known.iter().copied());
            }
        }
    }

    /// Replace `${vars.x}` in strings: a whole-string reference keeps the var's type.
    fn interpolate(
        &mut self,
        value: Json,
        path: &[Seg],
        vars: &BTreeMap<String, Json>,
    ) -> Option<Json> {
        match value {
            Json::String(s) => {
                let pieces = template::parse(&s);
                if let [template::Piece::Ref { ns: Namespace::Vars, name }] = pieces.as_slice() {
                    return self.lookup_var(name, path, vars).cloned();
                }
                let mut bad = false;
                let rendered = template::render(&s, |ns, name| {
                    if ns != Namespace::Vars {
                        return Ok(format!("${{{}.{name}}}", ns.as_str()));
                    }
                    match vars.get(name) {
                        Some(v) => Ok(template::plain_text(v)),
                        None => {
                            bad = true;
                            Ok(String::new())
                        }
                    }
                });
                if bad {
                    for (ns, name) in template::references(&s) {
                        if ns == Namespace::Vars {
                            self.lookup_var(&name, path, vars);
                        }
                    }
                    return None;
                }
                rendered.ok().map(Json::String)
            }
            Json::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    out.push(self.interpolate(item, path, vars)?);
                }
                Some(Json::Array(out))
            }
            Json::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    out.insert(k, self.interpolate(v, path, vars)?);
                }
                Some(Json::Object(out))
            }
            other => Some(other),
        }
    }

    fn lookup_var<'v>(
        &mut self,
        name: &str,
        path: &[Seg],
        vars: &'v BTreeMap<String, Json>,
    ) -> Option<&'v Json> {
        let found = vars.get(name);
        if found.is_none() {
            let e = self.err_value(path, format!("unknown variable `${{vars.{name}}}`"));
            *e = e.clone().suggest(name, vars.keys().map(String::as_str));
        }
        found
    }

    /// Check a built-in kind's `with:` against its schema, filling defaults.
    fn builtin_params(
        &mut self,
        kind: &Arc<dyn sdpipe_stages::StageKind>,
        with: &Yaml,
        path: &[Seg],
        vars: &BTreeMap<String, Json>,
        stage: &mut Stage,
        pending_inputs: &mut Vec<(String, (String, Vec<Seg>))>,
    ) {
        let specs = kind.params();
        let given: BTreeMap<String, &Yaml> =
            self.mapping(with, path, "`with`", None).into_iter().collect();
        for name in given.keys() {
            if !specs.iter().any(|s| s.name == name) {
                let mut p = path.to_vec();
                p.push(key(name));
                let e =
                    self.err_key(&p, format!("kind `{}` has no parameter `{name}`", kind.name()));
                *e = e
                    .clone()
                    .label("unknown parameter")
                    .suggest(name, specs.iter().map(|s| s.name));
                if e.help.is_none() {
                    let names: Vec<_> = specs.iter().map(|s| s.name).collect();
                    e.help = Some(format!("parameters of `{}`: {}", kind.name(), names.join(", ")));
                }
            }
        }
        for spec in &specs {
            let mut p = path.to_vec();
            p.push(key(spec.name));
            let value = match given.get(spec.name) {
                Some(raw) => {
                    match self.yaml_to_json(raw, &p).and_then(|v| self.interpolate(v, &p, vars)) {
                        Some(v) => v,
                        None => continue,
                    }
                }
                None => match &spec.default {
                    Some(default) => default.clone(),
                    None => {
                        let span = self.doc.locator.key(path);
                        let e = SpecError::at(
                            self.source(),
                            span,
                            format!(
                                "stage `{}` is missing required parameter `{}` ({})",
                                stage.name,
                                spec.name,
                                spec.ty.describe()
                            ),
                        );
                        self.errors.push(e.help(spec.doc.to_string()));
                        continue;
                    }
                },
            };
            match &spec.ty {
                ParamType::Input => match value {
                    Json::String(text) => pending_inputs.push((spec.name.to_string(), (text, p))),
                    // An optional input (default null) left unbound.
                    Json::Null if spec.default == Some(Json::Null) => {}
                    other => {
                        self.err_value(
                            &p,
                            format!(
                                "`{}` must be an upstream output `stage.output`, found {}",
                                spec.name,
                                json_type_name(&other)
                            ),
                        );
                    }
                },
                ParamType::Path => match value {
                    Json::String(text) => {
                        if self.check_dep(&text, &p) {
                            stage.deps.insert(
                                spec.name.to_string(),
                                Dep { pattern: text, is_glob: false },
                            );
                        }
                    }
                    Json::Null if spec.default == Some(Json::Null) => {}
                    other => {
                        self.err_value(
                            &p,
                            format!(
                                "`{}` must be a path, found {}",
                                spec.name,
                                json_type_name(&other)
                            ),
                        );
                    }
                },
                // An optional parameter of any type may default to null ("not set").
                _ if value.is_null() && spec.default == Some(Json::Null) => {
                    stage.params.insert(spec.name.to_string(), Json::Null);
                }
                ty => match check_type(ty, value) {
                    Ok(v) => {
                        stage.params.insert(spec.name.to_string(), v);
                    }
                    Err(message) => {
                        let e = self.err_value(&p, format!("parameter `{}`: {message}", spec.name));
                        e.label = format!("expected {}", ty.describe());
                        if let (ParamType::Enum(options), Some(Yaml::String(s))) =
                            (ty, given.get(spec.name))
                        {
                            *e = e.clone().suggest(s, options.iter().copied());
                        }
                    }
                },
            }
        }
    }

    /// Resolve `stage.output` against the stages validated in pass 1.
    fn binding(
        &mut self,
        text: &str,
        path: &[Seg],
        from: &str,
        stages: &IndexMap<String, Stage>,
    ) -> Option<InputRef> {
        let Some((stage_name, output)) = text.split_once('.') else {
            self.err_value(
                path,
                format!("`{text}` is not an upstream output; write `stage.output`"),
            );
            return None;
        };
        if stage_name == from {
            self.err_value(
                path,
                format!("stage `{from}` cannot take its own output `{text}` as input"),
            )
            .label = "self-reference".into();
            return None;
        }
        let Some(stage) = stages.get(stage_name) else {
            let e = self.err_value(path, format!("no stage named `{stage_name}` (in `{text}`)"));
            *e = e
                .clone()
                .label("unknown stage")
                .suggest(stage_name, stages.keys().map(String::as_str));
            return None;
        };
        if stage.output(output).is_none() {
            let names: Vec<&str> = stage.outputs.iter().map(|o| o.name.as_str()).collect();
            let e = self.err_value(path, format!("stage `{stage_name}` has no output `{output}`"));
            *e = e.clone().label("unknown output").suggest(output, names.iter().copied());
            if e.help.is_none() {
                e.help = Some(format!("outputs of `{stage_name}`: {}", names.join(", ")));
            }
            return None;
        }
        Some(InputRef { stage: stage_name.to_string(), output: output.to_string() })
    }
}

/// Check a value against a declared type, returning its canonical form.
pub fn check_type(ty: &ParamType, value: Json) -> Result<Json, String> {
    let found = json_type_name(&value);
    match ty {
        ParamType::String => match value {
            Json::String(_) => Ok(value),
            _ => Err(format!("expected a string, found {found}")),
        },
        ParamType::Bool => match value {
            Json::Bool(_) => Ok(value),
            _ => Err(format!("expected true or false, found {found}")),
        },
        ParamType::Int { min, max } => {
            let Some(i) = value.as_i64() else {
                return Err(format!("expected an integer, found {found} {value}"));
            };
            if min.is_some_and(|m| i < m) || max.is_some_and(|m| i > m) {
                return Err(format!("{i} is out of range ({})", ty.describe()));
            }
            Ok(value)
        }
        ParamType::Float { min, max } => {
            let Some(f) = value.as_f64() else {
                return Err(format!("expected a number, found {found}"));
            };
            if min.is_some_and(|m| f < m) || max.is_some_and(|m| f > m) {
                return Err(format!("{f} is out of range ({})", ty.describe()));
            }
            // Widen integers so `1` and `1.0` give the same key.
            serde_json::Number::from_f64(f)
                .map(Json::Number)
                .ok_or_else(|| "not a finite number".into())
        }
        ParamType::Enum(options) => match &value {
            Json::String(s) if options.contains(&s.as_str()) => Ok(value),
            _ => Err(format!("expected one of {}, found {value}", options.join(", "))),
        },
        ParamType::List(item) => match value {
            Json::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| check_type(item, v).map_err(|e| format!("item {i}: {e}")))
                .collect::<Result<Vec<_>, _>>()
                .map(Json::Array),
            _ => Err(format!("expected a list, found {found}")),
        },
        ParamType::Any => Ok(value),
        ParamType::Input | ParamType::Path => Ok(value),
    }
}

/// Why a declared output path is unsafe, if it is.
fn relative_path_problem(path: &str) -> Option<&'static str> {
    let p = Path::new(path);
    if path.is_empty() {
        return Some("is empty");
    }
    if p.is_absolute() {
        return Some("must be relative to the stage's output directory");
    }
    if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Some("must not contain `..`");
    }
    None
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
