//! Sweeps: one pipeline run at several points of its parameter space.
//!
//! A point is a set of `stage.param = value` assignments, applied to the document exactly like
//! `--set` and validated like the file. The validated variants are then merged into one pipeline:
//! a stage whose definition (parameters and upstream instances) is the same at every point stays
//! one stage, so shared upstream work (download, captioning, base-model sampling) exists once;
//! a stage that differs becomes one instance per distinct definition, named
//! `stage@<label>` where the label lists only the swept values that reach it
//! (`finetune@learning_rate=3e-05`). A stage marked `gather: true` (a report) stays single and
//! receives every instance of a swept input, each tagged with its point.
//!
//! Points come from the file's `sweep:` block (`grid`, `points` or `random`) and from
//! `--set stage.param=v1,v2` on the command line (another grid axis).

use std::collections::BTreeMap;

use indexmap::IndexMap;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use super::error::{SpecError, SpecErrors};
use super::overrides::Override;
use super::yaml::{Document, Seg};
use super::{GatherBinding, InputRef, Pipeline, Stage, StagePoint, SweepPoint};

/// The most points one sweep may expand to.
pub const MAX_POINTS: usize = 1000;

/// Most grid points ever materialised (a `random` sweep draws from the whole grid): beyond this a
/// hostile or mistaken file (ten axes of ten values) would exhaust memory before any check.
pub const MAX_GRID: usize = 100_000;

/// One swept parameter and its values.
#[derive(Debug, Clone)]
pub struct Axis {
    /// `stage.param`.
    pub target: String,
    pub values: Vec<Yaml>,
}

/// One point of the sweep: assignments in axis order.
#[derive(Debug, Clone, Default)]
pub struct Point {
    pub assignments: Vec<(String, Yaml)>,
}

impl Point {
    /// `target=value,...` as shown in messages.
    pub fn describe(&self) -> String {
        self.assignments
            .iter()
            .map(|(t, v)| format!("{t}={}", show_yaml(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The point as `--set` overrides.
    pub fn overrides(&self) -> Vec<Override> {
        self.assignments
            .iter()
            .map(|(target, value)| Override {
                path: target.split('.').map(str::to_string).collect(),
                value: value.clone(),
                values: Vec::new(),
                raw: format!("{target}={} (sweep)", show_yaml(value)),
            })
            .collect()
    }
}

/// The file's `sweep:` block, checked. `None` when there is none.
pub fn parse(doc: &Document) -> Result<Option<Vec<Point>>, SpecErrors> {
    let Some(raw) = doc.value.get("sweep") else {
        return Ok(None);
    };
    let at = |path: &[Seg], message: String| {
        SpecError::at(&doc.source, doc.locator.value(path), message)
    };
    let top = [Seg::Key("sweep".into())];
    let Yaml::Mapping(map) = raw else {
        return Err(
            at(&top, "`sweep` must be a mapping with `grid`, `points` or `random`".into()).into()
        );
    };
    let stage_names: Vec<String> = match doc.value.get("stages") {
        Some(Yaml::Mapping(m)) => m.keys().filter_map(|k| k.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    let mut errors = Vec::new();
    let check_target = |target: &str, path: &[Seg], errors: &mut Vec<SpecError>| {
        let Some((stage, param)) = target.split_once('.') else {
            errors.push(at(path, format!("sweep key `{target}` is not `stage.param`")));
            return;
        };
        if param.is_empty() || param.contains('.') {
            errors.push(at(path, format!("sweep key `{target}` is not `stage.param`")));
        } else if !stage_names.iter().any(|s| s == stage) {
            errors.push(
                at(path, format!("sweep key `{target}`: no stage named `{stage}`"))
                    .label("unknown stage")
                    .suggest(stage, stage_names.iter().map(String::as_str)),
            );
        }
    };
    let axes = |value: &Yaml, path: Vec<Seg>, errors: &mut Vec<SpecError>| -> Vec<Axis> {
        let Yaml::Mapping(m) = value else {
            errors.push(at(&path, "a sweep grid maps `stage.param` to a list of values".into()));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in m {
            let target = k.as_str().unwrap_or_default().to_string();
            let mut p = path.clone();
            p.push(Seg::Key(target.clone()));
            check_target(&target, &p, errors);
            match v {
                Yaml::Sequence(values) if !values.is_empty() => {
                    out.push(Axis { target, values: values.clone() })
                }
                _ => errors.push(at(&p, format!("`{target}` needs a non-empty list of values"))),
            }
        }
        out
    };

    let forms: Vec<&str> = ["grid", "points", "random"]
        .into_iter()
        .filter(|f| map.contains_key(Yaml::from(*f)))
        .collect();
    for k in map.keys() {
        let name = k.as_str().unwrap_or_default();
        if !["grid", "points", "random"].contains(&name) {
            errors.push(
                at(&[top[0].clone(), Seg::Key(name.into())], format!("unknown sweep key `{name}`"))
                    .suggest(name, ["grid", "points", "random"]),
            );
        }
    }
    if forms.len() != 1 {
        errors.push(at(&top, "`sweep` takes exactly one of `grid`, `points` or `random`".into()));
        return Err(SpecErrors(errors));
    }
    let form = forms[0];
    let path = vec![top[0].clone(), Seg::Key(form.into())];
    let body = &map[Yaml::from(form)];
    let points = match form {
        "grid" => checked_grid(axes(body, path.clone(), &mut errors), &path, &mut errors, &at),
        "points" => {
            let Yaml::Sequence(items) = body else {
                errors.push(at(&path, "`points` is a list of `{stage.param: value}` maps".into()));
                return Err(SpecErrors(errors));
            };
            let mut points = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let mut p = path.clone();
                p.push(Seg::Index(i));
                let Yaml::Mapping(m) = item else {
                    errors.push(at(&p, "a point is a map `{stage.param: value}`".into()));
                    continue;
                };
                let mut point = Point::default();
                for (k, v) in m {
                    let target = k.as_str().unwrap_or_default().to_string();
                    let mut kp = p.clone();
                    kp.push(Seg::Key(target.clone()));
                    check_target(&target, &kp, &mut errors);
                    point.assignments.push((target, v.clone()));
                }
                points.push(point);
            }
            if points.is_empty() {
                errors.push(at(&path, "`points` is empty".into()));
            }
            points
        }
        _ => {
            let Yaml::Mapping(m) = body else {
                errors.push(at(&path, "`random` takes `count`, `seed` and `grid`".into()));
                return Err(SpecErrors(errors));
            };
            let count = m.get("count").and_then(Yaml::as_u64);
            let seed = m.get("seed").map_or(Some(0), Yaml::as_u64);
            let (Some(count), Some(seed)) = (count, seed) else {
                errors.push(at(
                    &path,
                    "`random` needs `count` (a positive integer) and optionally `seed`".into(),
                ));
                return Err(SpecErrors(errors));
            };
            let mut gp = path.clone();
            gp.push(Seg::Key("grid".into()));
            let all = match m.get("grid") {
                Some(g) => checked_grid(axes(g, gp.clone(), &mut errors), &gp, &mut errors, &at),
                None => {
                    errors.push(at(&path, "`random` needs a `grid` to draw points from".into()));
                    Vec::new()
                }
            };
            sample(all, count as usize, seed)
        }
    };
    if errors.is_empty() {
        Ok(Some(points))
    } else {
        Err(SpecErrors(errors))
    }
}

/// The grid of a file's axes, or a located error when it has more than [`MAX_GRID`] points.
fn checked_grid(
    axes: Vec<Axis>,
    path: &[Seg],
    errors: &mut Vec<SpecError>,
    at: &dyn Fn(&[Seg], String) -> SpecError,
) -> Vec<Point> {
    let size = axes.iter().fold(1usize, |n, a| n.saturating_mul(a.values.len()));
    if size > MAX_GRID {
        errors.push(at(
            path,
            format!(
                "the grid has {} points, more than the {MAX_GRID} sdpipe expands; use fewer values",
                if size == usize::MAX { "too many".to_string() } else { size.to_string() }
            ),
        ));
        return Vec::new();
    }
    grid(&axes)
}

/// Every combination of the axes' values, the first axis varying slowest; never more than
/// `MAX_GRID + 1` of them (enough for every caller to see that there are too many).
pub fn grid(axes: &[Axis]) -> Vec<Point> {
    let mut points = vec![Point::default()];
    for axis in axes {
        points = points
            .into_iter()
            .flat_map(|p| {
                axis.values.iter().map(move |v| {
                    let mut p = p.clone();
                    p.assignments.retain(|(t, _)| *t != axis.target);
                    p.assignments.push((axis.target.clone(), v.clone()));
                    p
                })
            })
            .take(MAX_GRID + 1)
            .collect();
    }
    points
}

/// The product of the file's points with the command line's axes (a command-line axis replaces
/// the file's values for the same parameter).
pub fn with_cli_axes(file_points: Option<Vec<Point>>, cli: &[Axis]) -> Vec<Point> {
    let base = file_points.unwrap_or_else(|| vec![Point::default()]);
    let extra = grid(cli);
    let mut seen = std::collections::BTreeSet::new();
    base.iter()
        .flat_map(|p| {
            extra.iter().map(move |e| {
                let mut p = p.clone();
                for (t, v) in &e.assignments {
                    p.assignments.retain(|(pt, _)| pt != t);
                    p.assignments.push((t.clone(), v.clone()));
                }
                p
            })
        })
        .filter(|p| seen.insert(p.describe()))
        // One more than the caller accepts is enough to refuse the sweep.
        .take(MAX_POINTS + 1)
        .collect()
}

/// `count` points drawn from `all` without replacement, in grid order, reproducibly from `seed`
/// (a partial Fisher–Yates shuffle driven by splitmix64, which is stable across platforms).
fn sample(all: Vec<Point>, count: usize, seed: u64) -> Vec<Point> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..all.len()).collect();
    let take = count.min(idx.len());
    for i in 0..take {
        let j = i + (next() % (idx.len() - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut chosen = idx[..take].to_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| all[i].clone()).collect()
}

/// Merge the variants validated at each point into one pipeline (see the module docs).
pub fn merge(
    base: Pipeline,
    points: &[Point],
    variants: Vec<Pipeline>,
) -> Result<Pipeline, SpecErrors> {
    let mut merged = Merger::new(points);
    let mut errors = Vec::new();
    for (name, base_stage) in &base.stages {
        let defs: Vec<&Stage> = variants.iter().map(|v| &v.stages[name]).collect();
        if base_stage.gather {
            let unswept = BTreeMap::new();
            if defs.iter().any(|d| identity(d, &unswept) != identity(defs[0], &unswept)) {
                errors.push(SpecError::at(
                    &base.source,
                    base_stage.span,
                    format!(
                        "stage `{name}` gathers a sweep, so its own parameters cannot be swept"
                    ),
                ));
                continue;
            }
            let stage = merged.gathering(defs[0]);
            merged.shared(name, stage);
            continue;
        }
        let groups = merged.groups(&defs);
        if groups.len() == 1 {
            let mut stage = defs[0].clone();
            remap_inputs(&mut stage, 0, &merged.instance_of);
            merged.shared(name, stage);
        } else {
            merged.per_group(name, &defs, &groups);
        }
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors));
    }
    let points = merged.sweep_points(&base);
    Ok(Pipeline { stages: merged.stages, points, ..base })
}

/// What [`merge`] has built so far: the sweep's axes and the stage instances made, stage by
/// stage in pipeline order (so every upstream stage's instances exist when a stage is merged).
struct Merger<'a> {
    points: &'a [Point],
    /// Every swept `stage.param`, in the order the points first assign them.
    axes: Vec<String>,
    /// Each axis's name in instance labels: the parameter alone where that is unambiguous.
    short: BTreeMap<String, String>,
    stages: IndexMap<String, Stage>,
    /// (stage, point) → the instance that point uses.
    instance_of: BTreeMap<(String, usize), String>,
}

impl<'a> Merger<'a> {
    fn new(points: &'a [Point]) -> Self {
        let mut axes: Vec<String> = Vec::new();
        for (target, _) in points.iter().flat_map(|p| &p.assignments) {
            if !axes.contains(target) {
                axes.push(target.clone());
            }
        }
        let short = axes
            .iter()
            .map(|a| {
                let param = a.split_once('.').map_or(a.as_str(), |(_, p)| p);
                let unique = axes.iter().filter(|b| b.ends_with(&format!(".{param}"))).count() == 1;
                (a.clone(), if unique { param.to_string() } else { a.clone() })
            })
            .collect();
        Merger { points, axes, short, stages: IndexMap::new(), instance_of: BTreeMap::new() }
    }

    fn value_at(&self, point: usize, axis: &str) -> Option<&'a Yaml> {
        self.points[point].assignments.iter().find(|(t, _)| t == axis).map(|(_, v)| v)
    }

    /// `stage`, the one instance of `name`, used by every point.
    fn shared(&mut self, name: &str, stage: Stage) {
        for point in 0..self.points.len() {
            self.instance_of.insert((name.to_string(), point), name.to_string());
        }
        self.stages.insert(name.to_string(), stage);
    }

    /// A gathering stage's one instance: each input bound to every distinct upstream instance
    /// (in point order), as `input@label` bindings listed in `gathered`; an input whose
    /// upstream is not swept stays a plain binding.
    fn gathering(&self, def: &Stage) -> Stage {
        let mut stage = def.clone();
        stage.inputs.clear();
        for (input, binding) in &def.inputs {
            let mut seen: Vec<String> = Vec::new();
            for point in 0..self.points.len() {
                let instance = &self.instance_of[&(binding.stage.clone(), point)];
                if !seen.contains(instance) {
                    seen.push(instance.clone());
                }
            }
            if seen.len() == 1 {
                let stage_ref = InputRef { stage: seen.remove(0), output: binding.output.clone() };
                stage.inputs.insert(input.clone(), stage_ref);
                continue;
            }
            let mut bindings = Vec::new();
            for instance in seen {
                let point = self.stages[&instance].point.clone().unwrap_or_default();
                let key = format!("{input}@{}", point.label);
                let stage_ref = InputRef { stage: instance, output: binding.output.clone() };
                stage.inputs.insert(key.clone(), stage_ref);
                bindings.push(GatherBinding {
                    label: point.label,
                    values: point.values,
                    input: key,
                });
            }
            stage.gathered.insert(input.clone(), bindings);
        }
        stage
    }

    /// The points grouped by the stage's definition there (its own values and the upstream
    /// instances it reads), in order of first appearance.
    fn groups(&self, defs: &[&Stage]) -> Vec<(String, Vec<usize>)> {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (point, def) in defs.iter().enumerate() {
            let upstream: BTreeMap<String, String> = def
                .inputs
                .values()
                .map(|b| (b.stage.clone(), self.instance_of[&(b.stage.clone(), point)].clone()))
                .collect();
            let id = identity(def, &upstream);
            match groups.iter_mut().find(|(g, _)| *g == id) {
                Some((_, members)) => members.push(point),
                None => groups.push((id, vec![point])),
            }
        }
        groups
    }

    /// One instance of `name` per group, labelled with the axes that tell the groups apart
    /// (constant within each group, not across them): `name@axis=value,...`.
    fn per_group(&mut self, name: &str, defs: &[&Stage], groups: &[(String, Vec<usize>)]) {
        let relevant: Vec<String> = self
            .axes
            .iter()
            .filter(|a| {
                let first = |m: &Vec<usize>| self.value_at(m[0], a);
                let constant =
                    groups.iter().all(|(_, m)| m.iter().all(|&p| self.value_at(p, a) == first(m)));
                let varies = groups.iter().any(|(_, m)| first(m) != first(&groups[0].1));
                constant && varies
            })
            .cloned()
            .collect();
        let mut used: Vec<String> = Vec::new();
        for (_, members) in groups {
            let first = members[0];
            let mut values = BTreeMap::new();
            let mut parts = Vec::new();
            for a in &relevant {
                if let Some(v) = self.value_at(first, a) {
                    parts.push(format!("{}={}", self.short[a], show_yaml(v)));
                    values.insert(a.clone(), serde_json::to_value(v).unwrap_or(Json::Null));
                }
            }
            let mut label = bounded(sanitize(&parts.join(",")));
            if label.is_empty() {
                label = format!("p{first}");
            }
            while used.contains(&label) {
                label.push('+');
            }
            used.push(label.clone());
            let instance = format!("{name}@{label}");
            let mut stage = defs[first].clone();
            stage.name = instance.clone();
            remap_inputs(&mut stage, first, &self.instance_of);
            stage.point = Some(StagePoint { label, values });
            for &p in members {
                self.instance_of.insert((name.to_string(), p), instance.clone());
            }
            self.stages.insert(instance, stage);
        }
    }

    /// Each point as the run reports it: its label, its values and the instances it uses.
    fn sweep_points(&self, base: &Pipeline) -> Vec<SweepPoint> {
        self.points
            .iter()
            .enumerate()
            .map(|(i, point)| SweepPoint {
                label: point.describe(),
                values: point
                    .assignments
                    .iter()
                    .map(|(t, v)| (t.clone(), serde_json::to_value(v).unwrap_or(Json::Null)))
                    .collect(),
                instances: base
                    .stages
                    .keys()
                    .map(|name| self.instance_of[&(name.clone(), i)].clone())
                    .collect(),
            })
            .collect()
    }
}

/// Bind a stage's inputs to the upstream instances of `point`.
fn remap_inputs(stage: &mut Stage, point: usize, instance_of: &BTreeMap<(String, usize), String>) {
    for binding in stage.inputs.values_mut() {
        binding.stage = instance_of[&(binding.stage.clone(), point)].clone();
    }
}

/// Everything that makes two variants of one stage different work.
fn identity(stage: &Stage, upstream: &BTreeMap<String, String>) -> String {
    let command = match &stage.action {
        super::Action::Shell { command, env } => format!("{command:?}{env:?}"),
        super::Action::Builtin(kind) => format!("{}#{}", kind.name(), kind.version()),
    };
    let params = serde_json::to_string(&stage.params).unwrap_or_default();
    format!(
        "{command}|{params}|{:?}|{:?}|{:?}|{}|{upstream:?}",
        stage.inputs, stage.deps, stage.outputs, stage.threads
    )
}

/// A value as a person wrote it (`3e-05`, `true`, `fast`).
fn show_yaml(v: &Yaml) -> String {
    match serde_json::to_value(v) {
        Ok(json) => crate::key::show_json(&json),
        Err(_) => "?".into(),
    }
}

/// Labels become directory names: keep them to a portable character set.
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._=,+-".contains(c) { c } else { '_' })
        .collect()
}

/// Longest label kept verbatim. With a 64-byte stage name, `name@label` and the few bytes
/// materialisation adds stay far below the 255-byte file-name limit of common filesystems.
const MAX_LABEL: usize = 96;

/// Long labels (long string values, many axes) keep a readable prefix and a digest of the whole,
/// so they stay distinct, stable across runs and valid as directory names.
fn bounded(label: String) -> String {
    if label.len() <= MAX_LABEL {
        return label;
    }
    let digest = blake3::hash(label.as_bytes()).to_hex();
    // `sanitize` leaves only ASCII, so any byte index is a char boundary.
    format!("{}~{}", &label[..MAX_LABEL - 17], &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_never_materialises_more_than_the_cap() {
        let ten = || (0..10).collect::<Vec<i64>>();
        let axes: Vec<Axis> = (0..8).map(|i| axis(&format!("s.p{i}"), &ten())).collect();
        assert_eq!(grid(&axes).len(), MAX_GRID + 1);
    }

    #[test]
    fn long_labels_are_shortened_to_a_prefix_and_a_digest() {
        let long = "prompt=".to_string() + &"a".repeat(400);
        let short = bounded(long.clone());
        assert_eq!(short.len(), MAX_LABEL);
        assert!(short.starts_with("prompt=aaa"));
        assert_ne!(short, bounded(long.clone() + "b"), "distinct labels stay distinct");
        assert_eq!(short, bounded(long), "and stable");
        assert_eq!(bounded("lr=1e-5".into()), "lr=1e-5");
    }

    fn axis(target: &str, values: &[i64]) -> Axis {
        Axis { target: target.into(), values: values.iter().map(|v| Yaml::from(*v)).collect() }
    }

    #[test]
    fn grid_is_the_product_with_the_first_axis_slowest() {
        let points = grid(&[axis("a.x", &[1, 2]), axis("b.y", &[3, 4, 5])]);
        let shown: Vec<String> = points.iter().map(Point::describe).collect();
        assert_eq!(
            shown,
            [
                "a.x=1,b.y=3",
                "a.x=1,b.y=4",
                "a.x=1,b.y=5",
                "a.x=2,b.y=3",
                "a.x=2,b.y=4",
                "a.x=2,b.y=5"
            ]
        );
    }

    #[test]
    fn random_sampling_is_reproducible_and_without_replacement() {
        let all = grid(&[axis("a.x", &[1, 2, 3, 4, 5, 6, 7, 8])]);
        let a: Vec<String> = sample(all.clone(), 3, 7).iter().map(Point::describe).collect();
        let b: Vec<String> = sample(all.clone(), 3, 7).iter().map(Point::describe).collect();
        assert_eq!(a, b);
        let mut unique = a.clone();
        unique.dedup();
        assert_eq!(unique.len(), 3);
        assert_eq!(sample(all, 50, 1).len(), 8, "a count above the grid's size takes all of it");
    }

    #[test]
    fn command_line_axes_replace_the_files_values_for_the_same_parameter() {
        let file = grid(&[axis("a.x", &[1, 2])]);
        let points = with_cli_axes(Some(file), &[axis("a.x", &[9]), axis("b.y", &[3, 4])]);
        let shown: Vec<String> = points.iter().map(Point::describe).collect();
        assert_eq!(shown, ["a.x=9,b.y=3", "a.x=9,b.y=4"], "points that became equal run once");
    }

    #[test]
    fn labels_are_safe_directory_names() {
        assert_eq!(sanitize("model=org/name x"), "model=org_name_x");
    }
}
