//! A built-in kind's parameters: each checked against the kind's declared type, defaults
//! filled in, and `stage.output` values bound to upstream outputs.

use super::*;

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

impl Validator<'_> {
    /// Check a built-in kind's `with:` against its schema, filling defaults.
    pub(super) fn builtin_params(
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
    pub(super) fn binding(
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
