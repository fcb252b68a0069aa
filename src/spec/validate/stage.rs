//! Validating one stage: its action (command or kind), inputs, dependencies and outputs.

use super::*;

/// Why a declared output path is unsafe, if it is.
pub(super) fn relative_path_problem(path: &str) -> Option<&'static str> {
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

/// `path` with the key `k` appended: where a stage's field is.
fn field_path(path: &[Seg], k: &str) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(key(k));
    p
}

impl Validator<'_> {
    /// Validate one stage; its input bindings are returned unresolved for pass 2.
    #[allow(clippy::type_complexity)]
    pub(super) fn stage(
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
        let at = |k: &str| field_path(path, k);
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
            (Some(uses), None) => self.builtin_stage(
                uses,
                &fields,
                path,
                registry,
                vars,
                &mut stage,
                &mut pending_inputs,
            )?,
            (None, Some(run)) => {
                self.shell_stage(run, &fields, path, vars, &mut stage, &mut pending_inputs)?
            }
        }
        self.stage_options(&fields, path, &mut stage);
        Some((stage, pending_inputs))
    }

    /// A built-in kind's stage (`uses`, `with`): its parameters and inputs checked against the
    /// kind's, its outputs and threads the kind's. `None` when the kind is unknown.
    #[allow(clippy::too_many_arguments)]
    fn builtin_stage(
        &mut self,
        uses: &Yaml,
        fields: &BTreeMap<String, &Yaml>,
        path: &[Seg],
        registry: &Registry,
        vars: &BTreeMap<String, Json>,
        stage: &mut Stage,
        pending_inputs: &mut Vec<(String, (String, Vec<Seg>))>,
    ) -> Option<()> {
        let at = |k: &str| field_path(path, k);
        let shell_only = ["run", "deps", "inputs", "outs", "params", "env"];
        for k in shell_only {
            if fields.contains_key(k) {
                self.err_key(
                    &at(k),
                    format!("`{k}` belongs to shell stages, not built-in kinds"),
                )
                .help = Some("pass a built-in kind's parameters and inputs under `with`".into());
            }
        }
        let kind_name = self.string(uses, &at("uses"), "`uses`")?;
        let Some(kind) = registry.get(&kind_name) else {
            let e = self.err_value(&at("uses"), format!("unknown stage kind `{kind_name}`"));
            *e = e.clone().label("unknown kind").suggest(&kind_name, registry.names());
            if e.help.is_none() {
                let names: Vec<_> = registry.names().collect();
                e.help = Some(format!("built-in kinds: {}", names.join(", ")));
            }
            return None;
        };
        let empty = Yaml::Mapping(Default::default());
        let with = fields.get("with").copied().unwrap_or(&empty);
        self.builtin_params(&kind, with, &at("with"), vars, stage, pending_inputs);
        for o in kind.outputs() {
            stage.outputs.push(Output {
                name: o.name.to_string(),
                path: o.path.to_string(),
                kind: Some(o.kind),
            });
        }
        stage.threads = kind.threads(&stage.params).max(1);
        stage.action = Action::Builtin(kind);
        Some(())
    }

    /// A shell stage (`run`): its parameters, dependencies, inputs, outputs and environment,
    /// and the command's `${...}` references checked against them. `None` when `run` is not a
    /// string.
    fn shell_stage(
        &mut self,
        run: &Yaml,
        fields: &BTreeMap<String, &Yaml>,
        path: &[Seg],
        vars: &BTreeMap<String, Json>,
        stage: &mut Stage,
        pending_inputs: &mut Vec<(String, (String, Vec<Seg>))>,
    ) -> Option<()> {
        let at = |k: &str| field_path(path, k);
        let builtin_only = ["with"];
        for k in builtin_only {
            if fields.contains_key(k) {
                self.err_key(&at(k), format!("`{k}` belongs to built-in kinds (`uses`)")).help =
                    Some("a shell stage takes `params`, `deps`, `inputs` and `outs`".into());
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
        let input_names: BTreeSet<&str> = pending_inputs.iter().map(|(n, _)| n.as_str()).collect();
        self.check_references(&command, &at("run"), stage, &input_names, vars);
        stage.action = Action::Shell { command, env };
        Some(())
    }

    /// What any stage may set: `threads`, `gather` (built-in kinds only) and `desc`.
    fn stage_options(&mut self, fields: &BTreeMap<String, &Yaml>, path: &[Seg], stage: &mut Stage) {
        let at = |k: &str| field_path(path, k);
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
    }

    /// A list of strings (names derived from the values) or a mapping name → string.
    pub(super) fn named_list(
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
    pub(super) fn check_dep(&mut self, pattern: &str, path: &[Seg]) -> bool {
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
}
