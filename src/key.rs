//! Stage keys: blake3 over a canonical manifest of everything a stage's result depends on, and
//! the explanation of why a key differs from the previous run's.
//!
//! The manifest holds no absolute path and no timestamp, so moving a project keeps its cache.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::hash::Digest;

/// Bumped when the manifest's meaning changes; part of every key.
pub const KEY_SCHEMA: u32 = 1;

/// Everything that determines a stage's outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyManifest {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    /// Resolved parameters, defaults included.
    pub params: BTreeMap<String, Json>,
    /// Input name → digest of the bound upstream output (not the upstream key: an upstream
    /// that reruns and produces identical bytes leaves this stage cached — early cutoff).
    pub inputs: BTreeMap<String, Digest>,
    /// Dependency name → its pattern as written and its content digest.
    pub deps: BTreeMap<String, DepDigest>,
    /// Shell stages: the command template (before paths are substituted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Values of the allow-listed environment variables (`None`: unset).
    #[serde(default)]
    pub env: BTreeMap<String, Option<String>>,
    /// Output name → declared relative path.
    pub outputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepDigest {
    pub path: String,
    pub digest: Digest,
}

impl KeyManifest {
    /// The canonical encoding: JSON with object keys sorted at every depth.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("manifests serialise");
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        out
    }

    pub fn key(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"sdpipe stage key\n");
        hasher.update(&self.canonical_bytes());
        Digest(*hasher.finalize().as_bytes())
    }
}

/// JSON with sorted keys and no whitespace, independent of serde_json's map ordering features.
pub fn write_canonical(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Object(map) => {
            out.push(b'{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("strings serialise"));
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("scalars serialise")),
    }
}

/// Why a stage will run (or ran). Stable codes for `--json`; messages for people.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reason {
    /// No earlier run of this stage is known.
    NewStage,
    Forced,
    KindChanged {
        from: String,
        to: String,
    },
    KindVersionChanged {
        from: u32,
        to: u32,
    },
    ParamChanged {
        name: String,
        from: Option<Json>,
        to: Option<Json>,
    },
    InputChanged {
        name: String,
    },
    InputAdded {
        name: String,
    },
    InputRemoved {
        name: String,
    },
    DepChanged {
        name: String,
        path: String,
    },
    DepAdded {
        name: String,
        path: String,
    },
    DepRemoved {
        name: String,
        path: String,
    },
    CommandChanged,
    EnvChanged {
        name: String,
    },
    OutputsChanged,
    /// Same inputs as a previous run whose result is gone (collected, or evicted as corrupt).
    ResultMissing,
    /// An upstream stage will run first; this one runs unless its outputs come out identical.
    UpstreamWillRun {
        stage: String,
    },
    /// Content the stage's kind fetches (a hub model) is not local yet: `status` does not
    /// download, so the key is unknown until a run fetches it.
    NotLocal {
        detail: String,
    },
    /// Something else changed (e.g. sdpipe's key schema).
    Other {
        detail: String,
    },
}

fn show(v: &Option<Json>) -> String {
    match v {
        None => "(unset)".into(),
        Some(v) => show_json(v),
    }
}

/// A value as a person wrote it: learning rates read `1e-5`, not `0.00001`.
pub fn show_json(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e7) {
                format!("{f:e}")
            } else {
                n.to_string()
            }
        }
        other => other.to_string(),
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NewStage => write!(f, "new stage"),
            Reason::Forced => write!(f, "forced"),
            Reason::KindChanged { from, to } => write!(f, "kind changed {from} → {to}"),
            Reason::KindVersionChanged { from, to } => {
                write!(f, "kind version changed {from} → {to}")
            }
            Reason::ParamChanged { name, from, to } => {
                write!(f, "param {name} changed {} → {}", show(from), show(to))
            }
            Reason::InputChanged { name } => write!(f, "input {name} changed"),
            Reason::InputAdded { name } => write!(f, "input {name} added"),
            Reason::InputRemoved { name } => write!(f, "input {name} removed"),
            Reason::DepAdded { path, .. } => write!(f, "dep {path} added"),
            Reason::DepRemoved { path, .. } => write!(f, "dep {path} removed"),
            Reason::DepChanged { name, path } if name == path => write!(f, "dep {path} changed"),
            Reason::DepChanged { name, path } => write!(f, "dep {name} ({path}) changed"),
            Reason::CommandChanged => write!(f, "command changed"),
            Reason::EnvChanged { name } => write!(f, "env {name} changed"),
            Reason::OutputsChanged => write!(f, "declared outputs changed"),
            Reason::ResultMissing => write!(f, "previous result is no longer in the cache"),
            Reason::UpstreamWillRun { stage } => write!(f, "upstream {stage} will run"),
            Reason::NotLocal { detail } | Reason::Other { detail } => write!(f, "{detail}"),
        }
    }
}

/// Every difference between the previous manifest and the current one, most telling first.
pub fn diff(old: &KeyManifest, new: &KeyManifest) -> Vec<Reason> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(Reason::KindChanged { from: old.kind.clone(), to: new.kind.clone() });
    } else if old.kind_version != new.kind_version {
        out.push(Reason::KindVersionChanged { from: old.kind_version, to: new.kind_version });
    }
    for name in union(&old.params, &new.params) {
        let (a, b) = (old.params.get(name), new.params.get(name));
        if a != b {
            out.push(Reason::ParamChanged { name: name.clone(), from: a.cloned(), to: b.cloned() });
        }
    }
    for name in union(&old.inputs, &new.inputs) {
        let name = name.clone();
        match (old.inputs.get(&name), new.inputs.get(&name)) {
            (None, Some(_)) => out.push(Reason::InputAdded { name }),
            (Some(_), None) => out.push(Reason::InputRemoved { name }),
            (a, b) if a != b => out.push(Reason::InputChanged { name }),
            _ => {}
        }
    }
    for name in union(&old.deps, &new.deps) {
        let name = name.clone();
        match (old.deps.get(&name), new.deps.get(&name)) {
            (None, Some(d)) => out.push(Reason::DepAdded { name, path: d.path.clone() }),
            (Some(d), None) => out.push(Reason::DepRemoved { name, path: d.path.clone() }),
            (Some(a), Some(b)) if a != b => {
                out.push(Reason::DepChanged { name, path: b.path.clone() })
            }
            _ => {}
        }
    }
    if old.command != new.command {
        out.push(Reason::CommandChanged);
    }
    for name in union(&old.env, &new.env) {
        if old.env.get(name) != new.env.get(name) {
            out.push(Reason::EnvChanged { name: name.clone() });
        }
    }
    if old.outputs != new.outputs {
        out.push(Reason::OutputsChanged);
    }
    if out.is_empty() {
        out.push(if old == new {
            Reason::ResultMissing
        } else {
            Reason::Other {
                detail: format!("key schema changed {} → {}", old.schema, new.schema)
            }
        });
    }
    out
}

fn union<'a, V>(a: &'a BTreeMap<String, V>, b: &'a BTreeMap<String, V>) -> Vec<&'a String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> KeyManifest {
        KeyManifest {
            schema: KEY_SCHEMA,
            kind: "shell".into(),
            kind_version: 1,
            params: BTreeMap::from([("lr".into(), json!(1e-5))]),
            inputs: BTreeMap::new(),
            deps: BTreeMap::new(),
            command: Some("echo ${params.lr}".into()),
            env: BTreeMap::new(),
            outputs: BTreeMap::from([("out".into(), "out.txt".into())]),
        }
    }

    #[test]
    fn canonical_encoding_sorts_nested_keys() {
        let mut out = Vec::new();
        write_canonical(&json!({"b": {"z": 1, "a": [2, {"y": 0, "x": 1}]}, "a": null}), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":null,"b":{"a":[2,{"x":1,"y":0}],"z":1}}"#
        );
    }

    #[test]
    fn key_changes_with_any_param() {
        let a = manifest();
        let mut b = manifest();
        b.params.insert("lr".into(), json!(3e-5));
        assert_ne!(a.key(), b.key());
        assert_eq!(a.key(), manifest().key());
    }

    #[test]
    fn diff_names_the_param_and_both_values() {
        let a = manifest();
        let mut b = manifest();
        b.params.insert("lr".into(), json!(3e-5));
        let reasons = diff(&a, &b);
        assert_eq!(reasons.len(), 1);
        assert_eq!(reasons[0].to_string(), "param lr changed 1e-5 → 3e-5");
    }

    #[test]
    fn added_and_removed_inputs_are_named_as_such() {
        let mut a = manifest();
        a.inputs.insert("old".into(), Digest([1; 32]));
        let mut b = manifest();
        b.inputs.insert("new".into(), Digest([2; 32]));
        let messages: Vec<String> = diff(&a, &b).iter().map(ToString::to_string).collect();
        assert_eq!(messages, vec!["input new added", "input old removed"]);
    }

    #[test]
    fn identical_manifests_mean_the_result_went_missing() {
        assert_eq!(diff(&manifest(), &manifest()), vec![Reason::ResultMissing]);
    }
}
