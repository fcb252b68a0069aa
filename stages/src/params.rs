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
    /// What `name` is bound to: while the stage runs, where the bound output or file is (the
    /// engine hands those over apart from the values); before, the binding as written.
    /// `None` when an optional one is unbound.
    fn binding(
        &self,
        name: &str,
        located: Option<&BTreeMap<String, PathBuf>>,
    ) -> Result<Option<Bound>, StageError> {
        if let Some(located) = located {
            return Ok(located.get(name).cloned().map(Bound::At));
        }
        match self.params.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(Bound::To(text.clone()))),
            Some(other) => Err(StageError::InvalidParam {
                param: name.to_string(),
                message: format!("expected a binding, got {other}"),
            }),
        }
    }
}

/// An [`Input`]'s or a [`ProjectPath`]'s binding.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// Before the stage runs: the binding as written (`stage.output`, or the path relative to
    /// the pipeline file).
    To(String),
    /// While it runs: where it is.
    At(PathBuf),
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
pub struct Input(pub Bound);

/// A path parameter: a file or folder in the project, relative to the pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectPath(pub Bound);

impl Input {
    /// Where the bound output is (read-only). Known only while the stage runs: reading it
    /// before, in `threads` or `external_deps`, is a bug in the kind.
    pub fn path(&self) -> &Path {
        bound_path(&self.0)
    }
}

impl ProjectPath {
    /// Its absolute path. Known only while the stage runs, like [`Input::path`].
    pub fn path(&self) -> &Path {
        bound_path(&self.0)
    }
}

fn bound_path(bound: &Bound) -> &Path {
    match bound {
        Bound::At(path) => path,
        Bound::To(text) => panic!("`{text}` is resolved only while its stage runs"),
    }
}

/// What a binding is read as: [`Input`] or [`ProjectPath`].
pub trait Binding: Sized {
    fn new(bound: Bound) -> Self;
}

impl Binding for Input {
    fn new(bound: Bound) -> Self {
        Input(bound)
    }
}

impl Binding for ProjectPath {
    fn new(bound: Bound) -> Self {
        ProjectPath(bound)
    }
}

/// A [`Binding`] field, required (`B`) or optional (`Option<B>`).
pub trait FromBinding<B>: Sized {
    fn from_binding(name: &str, bound: Option<Bound>) -> Result<Self, StageError>;
}

impl<B: Binding> FromBinding<B> for B {
    fn from_binding(name: &str, bound: Option<Bound>) -> Result<Self, StageError> {
        let bound = bound.ok_or_else(|| StageError::failed(format!("`{name}` is not bound")))?;
        Ok(B::new(bound))
    }
}

impl<B: Binding> FromBinding<B> for Option<B> {
    fn from_binding(_: &str, bound: Option<Bound>) -> Result<Self, StageError> {
        Ok(bound.map(B::new))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind's parameters: a value, a required and an optional input, a path.
    #[derive(KindParams, Debug)]
    struct Example {
        /// Images per pass.
        #[param(default = 8, min = 1, max = 64)]
        batch_size: usize,
        /// Where the images come from.
        #[param(input)]
        images: Input,
        /// A model to use instead of the default.
        #[param(input, default = null)]
        model: Option<Input>,
        /// A file in the project.
        #[param(path, default = null)]
        notes: Option<ProjectPath>,
    }

    fn params(pairs: &[(&str, Value)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn the_specs_say_what_the_fields_declare() {
        let specs = Example::specs();
        let names: Vec<_> = specs.iter().map(|s| s.name).collect();
        assert_eq!(names, ["batch_size", "images", "model", "notes"]);
        assert_eq!(specs[0].ty, ParamType::Int { min: Some(1), max: Some(64) });
        assert_eq!(specs[0].default, Some(serde_json::json!(8)));
        assert_eq!(specs[0].doc, "Images per pass.");
        assert_eq!((specs[1].ty.clone(), specs[1].default.clone()), (ParamType::Input, None));
        assert_eq!(specs[2].default, Some(Value::Null));
        assert_eq!(specs[3].ty, ParamType::Path);
    }

    #[test]
    fn before_a_run_inputs_are_their_bindings() {
        let p = params(&[
            ("batch_size", 4.into()),
            ("images", "data.images".into()),
            ("model", Value::Null),
            ("notes", Value::Null),
        ]);
        let e = Example::of_params(&p).unwrap();
        assert_eq!(e.batch_size, 4);
        assert_eq!(e.images, Input(Bound::To("data.images".into())));
        assert_eq!(e.model, None);
    }

    #[test]
    fn while_running_inputs_and_paths_are_where_the_engine_put_them() {
        // The engine hands bindings over apart from the values: they are not in `params`.
        let p = params(&[("batch_size", 4.into())]);
        let inputs = BTreeMap::from([("images".to_string(), PathBuf::from("/cache/a"))]);
        let paths = BTreeMap::from([("notes".to_string(), PathBuf::from("/project/n.txt"))]);
        let sources = ParamSources { params: &p, inputs: Some(&inputs), paths: Some(&paths) };
        let e = Example::read(&sources).unwrap();
        assert_eq!(e.images.path(), Path::new("/cache/a"));
        assert_eq!(e.model, None);
        assert_eq!(e.notes.unwrap().path(), Path::new("/project/n.txt"));
    }

    #[test]
    fn a_value_outside_its_declared_bounds_is_refused_naming_the_parameter() {
        let p = params(&[("batch_size", 65.into()), ("images", "data.images".into())]);
        let err = Example::of_params(&p).unwrap_err().to_string();
        assert_eq!(err, "invalid parameter `batch_size`: 65 is not integer in 1..=64");
    }

    #[test]
    fn a_required_input_left_unbound_is_an_error_naming_it() {
        let p = params(&[("batch_size", 4.into())]);
        let none = BTreeMap::new();
        let sources = ParamSources { params: &p, inputs: Some(&none), paths: Some(&none) };
        assert_eq!(Example::read(&sources).unwrap_err().to_string(), "`images` is not bound");
    }
}
