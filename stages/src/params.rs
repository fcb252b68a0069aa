//! A kind's parameters as one typed struct: `#[derive(KindParams)]` states each parameter's
//! name, type, default and documentation once, on a field, and gives the kind both its
//! [`ParamSpec`]s (what the engine validates and `sdpipe stages` prints) and the values read
//! back ([`KindParams::of`] while running, [`KindParams::of_params`] before: `threads`,
//! `external_deps`). The derive's options are documented in `sdpipe-params-derive`.
//!
//! Inputs and project paths are typed too ([`Input`], [`ProjectPath`]): what they are bound to
//! is known from the parameters alone, where they are only while the stage runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::api::{ParamSpec, ParamType, Params, StageContext, StageError};
pub use sdpipe_params_derive::KindParams;
/// For the derive's defaults (`json!`), whatever the kind's crate depends on.
pub use serde_json;

/// A struct of parameters; derive it.
pub trait KindParams: Sized {
    /// Every parameter, in declaration order (flattened groups where they stand).
    fn specs() -> Vec<ParamSpec>;
    /// The values, from validated parameters (defaults filled in).
    fn read(sources: &ParamSources<'_>) -> Result<Self, StageError>;

    /// The values while the stage runs: inputs and paths know where they are.
    fn of(ctx: &StageContext<'_>) -> Result<Self, StageError> {
        Self::read(&ParamSources {
            params: ctx.params,
            inputs: Some(ctx.inputs),
            paths: Some(ctx.paths),
        })
    }
    /// The values before the stage runs (`threads`, `external_deps`): inputs and paths know
    /// only what they are bound to.
    fn of_params(params: &Params) -> Result<Self, StageError> {
        Self::read(&ParamSources { params, inputs: None, paths: None })
    }
}

/// What the derived [`KindParams::read`] reads from.
pub struct ParamSources<'a> {
    params: &'a Params,
    inputs: Option<&'a BTreeMap<String, PathBuf>>,
    paths: Option<&'a BTreeMap<String, PathBuf>>,
}

impl ParamSources<'_> {
    /// A value parameter, checked against its declared type and deserialised from its
    /// canonical JSON value. The engine validated it already; the check is again here so that
    /// a kind never computes with a value that reached it some other way (a test, a job file).
    pub fn value<T: DeserializeOwned>(&self, name: &str, ty: &ParamType) -> Result<T, StageError> {
        let invalid =
            |message: String| StageError::InvalidParam { param: name.to_string(), message };
        let value = self.params.get(name).cloned().unwrap_or(Value::Null);
        if !value.is_null() {
            check(ty, &value).map_err(invalid)?;
        }
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
    }
    pub fn input<T: FromBinding<Input>>(&self, name: &str) -> Result<T, StageError> {
        T::from_binding(name, self.binding(name, self.inputs)?)
    }
    pub fn path<T: FromBinding<ProjectPath>>(&self, name: &str) -> Result<T, StageError> {
        T::from_binding(name, self.binding(name, self.paths)?)
    }
    /// What `name` is bound to (`None` when an optional one is unbound), and where.
    fn binding(
        &self,
        name: &str,
        located: Option<&BTreeMap<String, PathBuf>>,
    ) -> Result<Option<(String, Option<PathBuf>)>, StageError> {
        match self.params.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => {
                let path = match located {
                    None => None,
                    Some(located) => Some(located.get(name).cloned().ok_or_else(|| {
                        StageError::failed(format!("`{name}` is bound to `{text}` but not there"))
                    })?),
                };
                Ok(Some((text.clone(), path)))
            }
            Some(other) => Err(StageError::InvalidParam {
                param: name.to_string(),
                message: format!("expected a binding, got {other}"),
            }),
        }
    }
}

/// Whether `value` is within `ty`'s bounds and names (its JSON type is serde's to check).
fn check(ty: &ParamType, value: &Value) -> Result<(), String> {
    let outside = || format!("{value} is not {}", ty.describe());
    match ty {
        ParamType::Int { min, max } => match value.as_i64() {
            Some(v) if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) => Err(outside()),
            _ => Ok(()),
        },
        ParamType::Float { min, max } => match value.as_f64() {
            Some(v) if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) => Err(outside()),
            _ => Ok(()),
        },
        ParamType::Enum(names) => match value.as_str() {
            Some(v) if !names.contains(&v) => Err(outside()),
            _ => Ok(()),
        },
        ParamType::List(item) => match value.as_array() {
            Some(items) => items.iter().try_for_each(|v| check(item, v)),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// An input parameter: a binding `stage.output` to an upstream output.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    binding: String,
    path: Option<PathBuf>,
}

impl Input {
    /// Where the bound output is (read-only); known only while the stage runs.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("an input's path is known only while its stage runs")
    }
    /// The binding as written, `stage.output`.
    pub fn binding(&self) -> &str {
        &self.binding
    }
}

/// A path parameter: a file or folder in the project, relative to the pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectPath {
    relative: String,
    absolute: Option<PathBuf>,
}

impl ProjectPath {
    /// Its absolute path; known only while the stage runs.
    pub fn path(&self) -> &Path {
        self.absolute.as_deref().expect("a path parameter is resolved only while its stage runs")
    }
    /// As written in the pipeline.
    pub fn relative(&self) -> &str {
        &self.relative
    }
}

/// [`Input`] and [`ProjectPath`] fields, required or optional.
pub trait FromBinding<B>: Sized {
    fn from_binding(
        name: &str,
        bound: Option<(String, Option<PathBuf>)>,
    ) -> Result<Self, StageError>;
}

fn unbound(name: &str) -> StageError {
    StageError::failed(format!("`{name}` is not bound"))
}

impl FromBinding<Input> for Input {
    fn from_binding(
        name: &str,
        bound: Option<(String, Option<PathBuf>)>,
    ) -> Result<Self, StageError> {
        let (binding, path) = bound.ok_or_else(|| unbound(name))?;
        Ok(Input { binding, path })
    }
}

impl FromBinding<Input> for Option<Input> {
    fn from_binding(_: &str, bound: Option<(String, Option<PathBuf>)>) -> Result<Self, StageError> {
        Ok(bound.map(|(binding, path)| Input { binding, path }))
    }
}

impl FromBinding<ProjectPath> for ProjectPath {
    fn from_binding(
        name: &str,
        bound: Option<(String, Option<PathBuf>)>,
    ) -> Result<Self, StageError> {
        let (relative, absolute) = bound.ok_or_else(|| unbound(name))?;
        Ok(ProjectPath { relative, absolute })
    }
}

impl FromBinding<ProjectPath> for Option<ProjectPath> {
    fn from_binding(_: &str, bound: Option<(String, Option<PathBuf>)>) -> Result<Self, StageError> {
        Ok(bound.map(|(relative, absolute)| ProjectPath { relative, absolute }))
    }
}

/// The [`ParamType`] a Rust type stands for.
pub trait ParamValue {
    fn param_type() -> ParamType;
}

macro_rules! param_value {
    ($($t:ty => $e:expr),* $(,)?) => {
        $(impl ParamValue for $t {
            fn param_type() -> ParamType {
                $e
            }
        })*
    };
}

param_value! {
    String => ParamType::String,
    bool => ParamType::Bool,
    f64 => ParamType::Float { min: None, max: None },
    f32 => ParamType::Float { min: None, max: None },
    u8 => ParamType::Int { min: None, max: None },
    u16 => ParamType::Int { min: None, max: None },
    u32 => ParamType::Int { min: None, max: None },
    u64 => ParamType::Int { min: None, max: None },
    usize => ParamType::Int { min: None, max: None },
    i32 => ParamType::Int { min: None, max: None },
    i64 => ParamType::Int { min: None, max: None },
    Value => ParamType::Any,
}

impl<T: ParamValue> ParamValue for Vec<T> {
    fn param_type() -> ParamType {
        ParamType::List(Box::new(T::param_type()))
    }
}

/// An optional value (default `null`) has its value's type.
impl<T: ParamValue> ParamValue for Option<T> {
    fn param_type() -> ParamType {
        T::param_type()
    }
}

/// `ty` with inclusive bounds, where it is a number (the derive's `min`/`max`).
pub fn bounded(ty: ParamType, min: Option<f64>, max: Option<f64>) -> ParamType {
    match ty {
        ParamType::Int { .. } => {
            ParamType::Int { min: min.map(|m| m as i64), max: max.map(|m| m as i64) }
        }
        ParamType::Float { .. } => ParamType::Float { min, max },
        other => other,
    }
}

/// `specs` with parameter `name`'s default replaced: kinds that share a group of parameters
/// but not all of its defaults (the VAE's learning rate is not the UNet's).
pub fn with_default(mut specs: Vec<ParamSpec>, name: &str, default: Value) -> Vec<ParamSpec> {
    let spec = specs.iter_mut().find(|s| s.name == name);
    spec.unwrap_or_else(|| panic!("no parameter `{name}` to give a default")).default =
        Some(default);
    specs
}
