//! `--set stage.param=value` and `--set vars.name=value`: command-line overrides applied to the
//! parsed document before validation, so an override is validated exactly like the file.

use serde_yaml_ng::{Mapping, Value};

use super::error::{SpecError, SpecErrors};
use super::yaml;

/// One `--set` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted path after the stage (or `vars`): `["train", "lr"]`.
    pub path: Vec<String>,
    pub value: Value,
    /// `--set k=v1,v2`: every value, making the parameter a sweep axis (then `value` is the
    /// first). Empty for a single value.
    pub values: Vec<Value>,
    /// As the user typed it, for messages.
    pub raw: String,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, rhs) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not KEY=VALUE (e.g. train.lr=3e-5)"))?;
        let path: Vec<String> = lhs.split('.').map(str::to_string).collect();
        if path.len() < 2 || path.iter().any(String::is_empty) {
            return Err(format!("`{lhs}` is not a dotted path like stage.param or vars.name"));
        }
        let parts = split_top_level(rhs);
        let values: Vec<Value> =
            if parts.len() > 1 { parts.iter().map(|p| scalar(p.trim())).collect() } else { vec![] };
        let value = values.first().cloned().unwrap_or_else(|| scalar(rhs));
        Ok(Override { path, value, values, raw: s.to_string() })
    }
}

/// Typed like YAML (`3e-5` is a number, `true` a boolean); text that is not a YAML value on its
/// own (`?`, `a: b`) is taken as the plain string the user typed.
fn scalar(text: &str) -> Value {
    match yaml::parse_scalar(text) {
        Ok(Value::Mapping(_)) | Err(_) => Value::String(text.to_string()),
        Ok(v) => v,
    }
}

/// Split on commas outside brackets and quotes: `1e-5,3e-5` is two values, `[1,2]` and
/// `"a,b"` are one.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut depth, mut quote, mut start, mut parts) = (0i32, None, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Apply overrides to the document root.
pub fn apply(root: &mut Value, overrides: &[Override]) -> Result<(), SpecErrors> {
    let mut errors = Vec::new();
    for o in overrides {
        if let Err(e) = apply_one(root, o) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecErrors(errors))
    }
}

fn apply_one(root: &mut Value, o: &Override) -> Result<(), SpecError> {
    let Value::Mapping(top) = root else {
        return Err(SpecError::unlocated("the pipeline is not a mapping"));
    };
    let (head, rest) = (&o.path[0], &o.path[1..]);
    // Built-in kinds reject unknown parameters in validation. Shell stages and `vars` accept any
    // name, so an override of a name the file does not declare is almost always a typo that
    // would silently rerun the stage with the real value unchanged: refuse it.
    let mut must_exist = true;
    let target = if head == "vars" {
        entry_map(top, "vars")
    } else {
        let stages = match top.get_mut("stages") {
            Some(Value::Mapping(m)) => m,
            _ => return Err(SpecError::unlocated("the pipeline has no `stages` mapping")),
        };
        let names: Vec<String> =
            stages.keys().filter_map(|k| k.as_str().map(str::to_string)).collect();
        let Some(Value::Mapping(stage)) = stages.get_mut(head.as_str()) else {
            return Err(SpecError::unlocated(format!("--set {}: no stage named `{head}`", o.raw))
                .suggest(head, names.iter().map(String::as_str)));
        };
        // Built-in kinds take parameters under `with`, shell stages under `params`.
        let section = if stage.contains_key("uses") { "with" } else { "params" };
        must_exist = section == "params";
        entry_map(stage, section)
    };
    let Some(target) = target else {
        return Err(SpecError::unlocated(format!("--set {}: `{head}` is not a mapping", o.raw)));
    };
    // A `<<` merge key may bring the name in; merges are resolved later, so trust it then.
    let name = &rest[0];
    if must_exist && !target.contains_key(name.as_str()) && !target.contains_key("<<") {
        let known: Vec<String> =
            target.keys().filter_map(|k| k.as_str().map(str::to_string)).collect();
        let place = if head == "vars" { "`vars`".to_string() } else { format!("stage `{head}`") };
        let listed = if known.is_empty() {
            "none are declared".to_string()
        } else {
            format!("declared: {}", known.join(", "))
        };
        return Err(SpecError::unlocated(format!(
            "--set {}: {place} has no `{name}` ({listed}); declare it in the pipeline first",
            o.raw
        ))
        .suggest(name, known.iter().map(String::as_str)));
    }
    set_path(target, rest, o.value.clone())
        .map_err(|e| SpecError::unlocated(format!("--set {}: {e}", o.raw)))
}

/// The mapping under `key`, created when absent; `None` when something else is there.
fn entry_map<'a>(map: &'a mut Mapping, key: &str) -> Option<&'a mut Mapping> {
    let slot = map.entry(Value::from(key)).or_insert_with(|| Value::Mapping(Mapping::new()));
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut()
}

fn set_path(map: &mut Mapping, path: &[String], value: Value) -> Result<(), String> {
    match path {
        [] => Err("empty path".into()),
        [last] => {
            map.insert(Value::from(last.as_str()), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let next =
                entry_map(map, first).ok_or_else(|| format!("`{first}` is not a mapping"))?;
            set_path(next, rest, value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_like_yaml() {
        let o: Override = "train.lr=3e-5".parse().unwrap();
        assert_eq!(o.path, vec!["train", "lr"]);
        assert!(o.value.as_f64().is_some());
        let o: Override = "a.name=hello world".parse().unwrap();
        assert_eq!(o.value.as_str(), Some("hello world"));
        let o: Override = "a.name=?".parse().unwrap();
        assert_eq!(o.value.as_str(), Some("?"));
        let o: Override = "a.name=k: v".parse().unwrap();
        assert_eq!(o.value.as_str(), Some("k: v"));
    }

    #[test]
    fn comma_separated_values_make_a_sweep_axis() {
        let o: Override = "train.lr=1e-5,3e-5".parse().unwrap();
        assert_eq!(o.values.len(), 2);
        assert!(o.values.iter().all(|v| v.as_f64().is_some()));
        let o: Override = "a.b=[1,2]".parse().unwrap();
        assert!(o.values.is_empty(), "a flow list is one value");
        let o: Override = "a.b=\"x,y\"".parse().unwrap();
        assert_eq!(o.value.as_str(), Some("x,y"));
    }

    #[test]
    fn malformed_overrides_are_rejected() {
        assert!("train".parse::<Override>().is_err());
        assert!("train=3".parse::<Override>().is_err());
        assert!(".lr=3".parse::<Override>().is_err());
    }

    #[test]
    fn override_targets_with_for_builtin_and_params_for_shell() {
        let mut doc: Value =
            serde_yaml_ng::from_str("stages:\n  a: {uses: k}\n  b: {run: x}\n").unwrap();
        apply(&mut doc, &["a.x=1".parse().unwrap(), "b.y=2".parse().unwrap()]).unwrap_err();
        let mut doc: Value =
            serde_yaml_ng::from_str("stages:\n  a: {uses: k}\n  b: {run: x, params: {y: 1}}\n")
                .unwrap();
        apply(&mut doc, &["a.x=1".parse().unwrap(), "b.y=2".parse().unwrap()]).unwrap();
        assert_eq!(doc["stages"]["a"]["with"]["x"], Value::from(1));
        assert_eq!(doc["stages"]["b"]["params"]["y"], Value::from(2));
    }

    #[test]
    fn override_of_an_undeclared_shell_param_is_a_typo_with_a_suggestion() {
        let mut doc: Value =
            serde_yaml_ng::from_str("stages:\n  b: {run: x, params: {rate: 1}}\n").unwrap();
        let err = apply(&mut doc, &["b.raet=2".parse().unwrap()]).unwrap_err().to_string();
        assert!(err.contains("stage `b` has no `raet`"), "{err}");
        assert!(err.contains("did you mean `rate`"), "{err}");
    }

    #[test]
    fn override_of_an_undeclared_var_is_refused() {
        let mut doc: Value = serde_yaml_ng::from_str("vars: {seed: 1}\nstages: {}\n").unwrap();
        let err = apply(&mut doc, &["vars.sed=2".parse().unwrap()]).unwrap_err().to_string();
        assert!(err.contains("`vars` has no `sed`"), "{err}");
    }

    #[test]
    fn override_of_a_param_brought_in_by_a_merge_key_is_accepted() {
        let mut doc: Value =
            serde_yaml_ng::from_str("d: &d {rate: 1}\nstages:\n  b: {run: x, params: {<<: *d}}\n")
                .unwrap();
        apply(&mut doc, &["b.rate=2".parse().unwrap()]).unwrap();
    }

    #[test]
    fn override_of_unknown_stage_suggests_a_name() {
        let mut doc: Value = serde_yaml_ng::from_str("stages:\n  train: {run: x}\n").unwrap();
        let err = apply(&mut doc, &["trian.lr=1".parse().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("did you mean `train`"), "{err}");
    }
}
