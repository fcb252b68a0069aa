//! The `lpips` kind: LPIPS v0.1 per (ground truth, sample) pair, matched by id, and the mean.
//!
//! Pairing: a generated image `<id>.png` pairs with the ground truth of the same id; with
//! several samples per prompt (`<id>_<k>.png`) each pairs with `<id>` when no ground truth is
//! named `<id>_<k>` itself. A sample without ground truth, or ground truth without a sample, is
//! an error listing them: a silently smaller mean would not be the metric asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::Tensor;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{with_default, KindParams};
use serde_json::json;

use crate::convert::WeightsKind;
use crate::images::{self, Entry, Resize};
use crate::lpips::{Lpips, Net};
use crate::stage_common::{self as common, candle_err, BatchSize, InputParams, RANDOM};

pub struct LpipsKind;

const METRICS: &str = "metrics.json";
const PER_IMAGE: &str = "per_image.jsonl";

/// The parameters.
#[derive(KindParams)]
struct Settings {
    #[param(flatten)]
    inputs: InputParams,
    #[param(flatten)]
    network: Network,
    #[param(flatten)]
    batch: BatchSize,
}

/// The network and its weights; `external_deps` reads them alone, needing no `real` and
/// `fake`.
#[derive(KindParams)]
struct Network {
    /// Trunk network (lpips' default and the seed's: alex).
    #[param(default = "alex", one_of = Net::NAMES)]
    net: Net,
    /// The converted lpips linear layers: a path, or a file name looked up in
    /// $SDPIPE_WEIGHTS_DIR and ~/.cache/sdpipe/weights/; empty = lpips-v0.1-<net>.safetensors;
    /// `random` for a deterministic random stand-in (trunk too, unless `trunk_weights` says
    /// otherwise).
    #[param(default = "")]
    weights: String,
    /// The converted torchvision trunk (empty = alexnet-owt-7be5be79.safetensors or
    /// vgg16-397923af.safetensors; `random` allowed).
    #[param(default = "")]
    trunk_weights: String,
}

impl Network {
    /// The weights kinds of the linear layers and of the trunk.
    fn kinds(&self) -> (WeightsKind, WeightsKind) {
        match self.net {
            Net::Alex => (WeightsKind::LpipsAlex, WeightsKind::Alexnet),
            Net::Vgg16 => (WeightsKind::LpipsVgg, WeightsKind::Vgg16),
        }
    }

    /// The linear layers' and the trunk's weights values, defaults filled in.
    fn values(&self) -> (String, String) {
        let (lin_kind, trunk_kind) = self.kinds();
        let lin = match self.weights.as_str() {
            "" => lin_kind.default_file_name().to_string(),
            lin => lin.to_string(),
        };
        let trunk = trunk_value(&lin, &self.trunk_weights, trunk_kind);
        (lin, trunk)
    }
}

/// The trunk weights value: explicit, else `random` when the linear layers are random, else
/// the converted torchvision file.
fn trunk_value(lin: &str, trunk: &str, kind: WeightsKind) -> String {
    match (lin, trunk) {
        (_, t) if !t.is_empty() => t.to_string(),
        (RANDOM, _) => RANDOM.to_string(),
        _ => kind.default_file_name().to_string(),
    }
}

impl StageKind for LpipsKind {
    fn name(&self) -> &'static str {
        "lpips"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "LPIPS v0.1 between each generated image and its ground truth (matched by id), exactly \
         as the `lpips` package computes it (scaling layer, AlexNet or VGG16 trunk taps, \
         unit-normalised squared differences, learned linear layers, spatial mean, sum). Writes \
         `metrics.json` (the mean) and `per_image.jsonl`. Weights: the converted lpips linear \
         layers and torchvision trunk (`sdpipe convert-weights lpips-alex|alexnet ...`), or \
         `random` for a deterministic stand-in network."
    }

    fn params(&self) -> Vec<ParamSpec> {
        with_default(Settings::specs(), "batch_size", json!(4))
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "metrics",
                path: METRICS,
                kind: OutputKind::File,
                doc: "{\"metric\": \"lpips\", \"lpips\": mean, \"n\", \"net\", \"version\", \
                      \"weights\", ...settings}",
            },
            OutputSpec {
                name: "per_image",
                path: PER_IMAGE,
                kind: OutputKind::File,
                doc: "{\"id\", \"real\", \"fake\", \"lpips\"} per pair, sorted by id.",
            },
        ]
    }

    fn threads(&self, _params: &Params) -> usize {
        common::wanted_threads()
    }

    fn external_deps(
        &self,
        params: &Params,
        _fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        let network = Network::of_params(params)?;
        let (lin_kind, trunk_kind) = network.kinds();
        let (lin, trunk) = network.values();
        let mut deps = BTreeMap::new();
        common::add_dep(&mut deps, "weights", &lin, lin_kind)?;
        common::add_dep(&mut deps, "trunk_weights", &trunk, trunk_kind)?;
        Ok(deps)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        common::with_granted_threads(ctx, run_lpips)
    }
}

fn run_lpips(ctx: &mut StageContext<'_>) -> Result<(), StageError> {
    let settings = Settings::of(ctx)?;
    let inputs = &settings.inputs;
    let net = settings.network.net;
    let (lin_kind, trunk_kind) = settings.network.kinds();
    let (real, fake) = inputs.sets.list()?;
    let (resize, seed, batch_size) = (inputs.resize, inputs.seed, settings.batch.batch_size);
    let (lin_value, trunk_value) = settings.network.values();

    let pairs = pair_up(&real, &fake)?;
    let lins = common::load(&lin_value, lin_kind, "weights", seed)?;
    let trunk = common::load(&trunk_value, trunk_kind, "trunk_weights", seed)?;
    let (lin_desc, trunk_desc) = (common::describe(&lins), common::describe(&trunk));
    let device = ctx.candle_device()?;
    let model = Lpips::on_device(net, &trunk.merged(lins), &device)
        .map_err(candle_err("building LPIPS"))?;
    let _ = writeln!(ctx.log, "lpips ({}): {} pairs", net.name(), pairs.len());
    ctx.progress.set_total(pairs.len() as u64);

    let mut target_desc = None;
    let mut values = Vec::with_capacity(pairs.len());
    let mut pending: Vec<(Tensor, Tensor)> = Vec::new();
    let mut pending_size = None;
    for (real_entry, fake_entry) in &pairs {
        ctx.cancel.check()?;
        let fake_img = images::load_rgb(&fake_entry.path)?;
        let real_img = images::load_rgb(&real_entry.path)?;
        let size = fake_img.dimensions();
        if resize == Resize::None && real_img.dimensions() != size {
            return Err(StageError::failed(format!(
                "LPIPS compares images of equal size: {} is {}x{} but {} is {}x{}; set \
                 `resize: resize` or `resize: center-crop`",
                real_entry.path.display(),
                real_img.width(),
                real_img.height(),
                fake_entry.path.display(),
                size.0,
                size.1
            )));
        }
        target_desc.get_or_insert(size);
        let real_img = resize.apply(real_img, size);
        if pending_size.is_some_and(|s| s != size) || pending.len() >= batch_size {
            values.extend(run_batch(&model, &mut pending, ctx)?);
        }
        pending_size = Some(size);
        let context = format!("preparing {}", fake_entry.path.display());
        let r = images::to_signed_tensor(&real_img).map_err(candle_err(&context))?;
        let f = images::to_signed_tensor(&fake_img).map_err(candle_err(&context))?;
        pending.push((r, f));
    }
    values.extend(run_batch(&model, &mut pending, ctx)?);

    let mut lines = String::new();
    for ((real_entry, fake_entry), value) in pairs.iter().zip(&values) {
        let line = json!({
            "id": fake_entry.id,
            "real": common::file_name(&real_entry.path),
            "fake": common::file_name(&fake_entry.path),
            "lpips": value,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let per_image = ctx.output_path(PER_IMAGE);
    std::fs::write(&per_image, lines)
        .map_err(|e| StageError::io(format!("writing {}", per_image.display()), e))?;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    let _ = writeln!(ctx.log, "lpips mean {mean:.6} over {} pairs", values.len());
    let sizes: BTreeSet<_> =
        pairs.iter().filter_map(|(_, f)| image::image_dimensions(&f.path).ok()).collect();
    let resize_desc = if sizes.len() == 1 {
        resize.describe(target_desc)
    } else {
        format!("{} (per pair, to each sample's size)", resize.describe(target_desc))
    };
    let metrics = json!({
        "metric": "lpips",
        "lpips": mean,
        "n": values.len(),
        "net": net.name(),
        "version": "0.1",
        "weights": lin_desc,
        "trunk_weights": trunk_desc,
        "resize": resize_desc,
        "input_scaling": "x/127.5 - 1 (lpips im2tensor), then lpips' ScalingLayer",
    });
    common::write_json(&ctx.output_path(METRICS), &inputs.record(metrics))
}

/// Distances of the pending pairs (all one size), emptying the batch.
fn run_batch(
    model: &Lpips,
    pending: &mut Vec<(Tensor, Tensor)>,
    ctx: &mut StageContext<'_>,
) -> Result<Vec<f32>, StageError> {
    if pending.is_empty() {
        return Ok(vec![]);
    }
    let (reals, fakes): (Vec<Tensor>, Vec<Tensor>) = pending.drain(..).unzip();
    let n = reals.len();
    let d = Tensor::stack(&reals, 0)
        .and_then(|r| Ok((r, Tensor::stack(&fakes, 0)?)))
        .and_then(|(r, f)| model.distance(&r, &f))
        .and_then(|d| d.to_vec1::<f32>())
        .map_err(candle_err("running LPIPS"))?;
    ctx.progress.advance(n as u64, "");
    Ok(d)
}

/// (ground truth, sample) pairs in sample-id order.
fn pair_up(real: &[Entry], fake: &[Entry]) -> Result<Vec<(Entry, Entry)>, StageError> {
    let by_id: BTreeMap<&str, &Entry> = real.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut pairs = Vec::with_capacity(fake.len());
    let mut unmatched = Vec::new();
    let mut used = BTreeSet::new();
    for f in fake {
        let base = f.id.rsplit_once('_').filter(|(_, k)| k.parse::<u32>().is_ok()).map(|(b, _)| b);
        let r = by_id.get(f.id.as_str()).or_else(|| base.and_then(|b| by_id.get(b)));
        match r {
            Some(r) => {
                used.insert(r.id.as_str());
                pairs.push(((*r).clone(), f.clone()));
            }
            None => unmatched.push(f.path.display().to_string()),
        }
    }
    let orphans: Vec<String> = real
        .iter()
        .filter(|r| !used.contains(r.id.as_str()))
        .map(|r| r.path.display().to_string())
        .collect();
    if !unmatched.is_empty() || !orphans.is_empty() {
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
            let more =
                if v.len() > 5 { format!(" and {} more", v.len() - 5) } else { String::new() };
            format!("{}{more}", shown.join(", "))
        };
        let mut parts = Vec::new();
        if !unmatched.is_empty() {
            parts.push(format!(
                "{} generated image(s) have no ground truth of the same id: {}",
                unmatched.len(),
                list(&unmatched)
            ));
        }
        if !orphans.is_empty() {
            parts.push(format!(
                "{} ground-truth image(s) have no generated image: {}",
                orphans.len(),
                list(&orphans)
            ));
        }
        return Err(StageError::failed(format!(
            "LPIPS pairs images by id (file stem), and the sets do not match: {}",
            parts.join("; ")
        )));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(ids: &[&str], ext: &str) -> Vec<Entry> {
        ids.iter()
            .map(|id| Entry { id: id.to_string(), path: PathBuf::from(format!("{id}.{ext}")) })
            .collect()
    }

    #[test]
    fn samples_pair_with_ground_truth_of_the_same_id() {
        let pairs = pair_up(&entries(&["a", "b"], "jpg"), &entries(&["a", "b"], "png")).unwrap();
        let ids: Vec<_> = pairs.iter().map(|(r, f)| (r.id.as_str(), f.id.as_str())).collect();
        assert_eq!(ids, [("a", "a"), ("b", "b")]);
    }

    #[test]
    fn numbered_samples_pair_with_their_prompt_id() {
        let pairs = pair_up(&entries(&["a_x"], "jpg"), &entries(&["a_x_0", "a_x_1"], "png"));
        assert_eq!(pairs.unwrap().len(), 2);
    }

    #[test]
    fn unmatched_images_on_either_side_are_an_error_listing_them() {
        let e = pair_up(&entries(&["a", "c"], "jpg"), &entries(&["a", "b"], "png")).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("b.png") && e.contains("c.jpg"), "{e}");
    }

    #[test]
    fn random_linear_layers_make_the_trunk_random_too_unless_named() {
        assert_eq!(trunk_value("random", "", WeightsKind::Alexnet), "random");
        assert_eq!(trunk_value("random", "t.safetensors", WeightsKind::Alexnet), "t.safetensors");
        assert_eq!(
            trunk_value("lpips-v0.1-alex.safetensors", "", WeightsKind::Alexnet),
            "alexnet-owt-7be5be79.safetensors"
        );
    }
}
