//! `${...}` references in commands and values: checked against what the stage has, and
//! substituted once (never recursively).

use super::*;

impl Validator<'_> {
    /// Every `${ns.name}` in a command must name something the stage has.
    pub(super) fn check_references(
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
    pub(super) fn interpolate(
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

    pub(super) fn lookup_var<'v>(
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
}
