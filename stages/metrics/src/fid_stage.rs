//! The `fid` kind: FID (pytorch-fid) and KID (clean-fid) between ground-truth and generated
//! images, from the FID Inception's pool3 features.

use std::collections::BTreeMap;
use std::path::PathBuf;

use image::RgbImage;
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::KindParams;
use serde_json::json;

use crate::convert::WeightsKind;
use crate::frechet::{self, Frechet};
use crate::images::{self, Entry, Resize};
use crate::inception::{self, FidInception, FEATURE_DIM};
use crate::kid::{self, Kid};
use crate::stage_common::{self as common, candle_err, BatchSize, InputParams};

pub struct Fid;

const METRICS: &str = "metrics.json";

/// The parameters.
#[derive(KindParams)]
struct Settings {
    #[param(flatten)]
    inputs: InputParams,
    #[param(flatten)]
    weights: InceptionWeights,
    #[param(flatten)]
    batch: BatchSize,
    /// Number of KID subsets.
    #[param(default = 100, min = 1, max = 100_000)]
    kid_subsets: usize,
    /// Largest KID subset (the subset size is min(N_real, N_fake, this)).
    #[param(default = 1000, min = 2)]
    kid_subset_size: usize,
}

/// The Inception weights; `external_deps` reads them alone, needing no `real` and `fake`.
#[derive(KindParams)]
struct InceptionWeights {
    /// The converted Inception weights: a path, or a file name looked up in $SDPIPE_WEIGHTS_DIR
    /// and ~/.cache/sdpipe/weights/; `random` for a deterministic random stand-in (numbers then
    /// are not FID).
    #[param(default = WeightsKind::FidInception.default_file_name())]
    weights: String,
}

impl StageKind for Fid {
    fn name(&self) -> &'static str {
        "fid"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "FID between ground-truth (`real`) and generated (`fake`) images exactly as pytorch-fid \
         computes it (its InceptionV3 variant, 2048-d pool3 features, bilinear 299 resize, \
         statistics in float64), plus KID as clean-fid computes it (cubic polynomial kernel, \
         unbiased MMD² over random subsets), which unlike FID is unbiased at small N. Writes \
         `metrics.json`. Weights: the converted pytorch-fid Inception file (`sdpipe \
         convert-weights fid-inception ...`), or `random` for a deterministic stand-in network."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "metrics",
            path: METRICS,
            kind: OutputKind::File,
            doc: "{\"metric\": \"fid\", \"fid\", \"kid_mean\", \"kid_std\", \"n_real\", \
                  \"n_fake\", \"weights\", \"resize\", ...settings}",
        }]
    }

    fn threads(&self, _params: &Params) -> usize {
        common::wanted_threads()
    }

    fn external_deps(
        &self,
        params: &Params,
        _fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        let weights = InceptionWeights::of_params(params)?;
        let mut deps = BTreeMap::new();
        common::add_dep(&mut deps, "weights", &weights.weights, WeightsKind::FidInception)?;
        Ok(deps)
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        common::with_granted_threads(ctx, run_fid)
    }
}

fn run_fid(ctx: &mut StageContext<'_>) -> Result<(), StageError> {
    let settings = Settings::of(ctx)?;
    let inputs = &settings.inputs;
    let (real, fake) = inputs.sets.list()?;
    let (real, fake, resize, seed) = (&real, &fake, inputs.resize, inputs.seed);
    let batch_size = settings.batch.batch_size;
    let (subsets, subset_size) = (settings.kid_subsets, settings.kid_subset_size);

    for (which, set) in [("real", real), ("fake", fake)] {
        if set.len() < 2 {
            return Err(StageError::failed(format!(
                "FID needs at least 2 {which} images to estimate a covariance; found {} \
                 ({})",
                set.len(),
                set.iter().map(|e| e.path.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let target = match resize {
        Resize::None => None,
        _ => Some(common_size(fake)?),
    };

    let weights =
        common::load(&settings.weights.weights, WeightsKind::FidInception, "weights", seed)?;
    let device = ctx.candle_device()?;
    let model =
        FidInception::on_device(&weights, &device).map_err(candle_err("building Inception"))?;
    let _ = writeln!(
        ctx.log,
        "fid: {} real, {} fake images; weights {}",
        real.len(),
        fake.len(),
        common::describe(&weights)
    );
    ctx.progress.set_total((real.len() + fake.len()) as u64);

    let fake_features = features(ctx, &model, fake, batch_size, &|img| img)?;
    let real_features = features(ctx, &model, real, batch_size, &|img| match target {
        Some(size) => resize.apply(img, size),
        None => img,
    })?;

    let real_m = frechet::to_matrix(&real_features, "real").map_err(fail)?;
    let fake_m = frechet::to_matrix(&fake_features, "fake").map_err(fail)?;
    let fid: Frechet = frechet::frechet_distance(&real_m, &fake_m).map_err(fail)?;
    let kid: Kid = kid::kid(&real_m, &fake_m, subsets, subset_size, seed).map_err(fail)?;
    let _ = writeln!(
        ctx.log,
        "fid {:.6} ({}); kid {:.6} ± {:.6} over {} subsets of {}",
        fid.fid,
        fid.method.describe(),
        kid.mean,
        kid.std,
        kid.subsets,
        kid.subset_size
    );

    let n_min = real.len().min(fake.len());
    let note = if n_min < FEATURE_DIM {
        format!(
            "N = {n_min} < {FEATURE_DIM} feature dimensions: the covariances are rank \
             deficient and FID is dominated by its estimator's bias at this N (it is not \
             comparable across different N); KID is unbiased and is the better guide here."
        )
    } else {
        String::new()
    };
    let metrics = json!({
        "metric": "fid",
        "fid": fid.fid,
        "kid_mean": kid.mean,
        "kid_std": kid.std,
        "n_real": real.len(),
        "n_fake": fake.len(),
        "weights": common::describe(&weights),
        "resize": resize.describe(target),
        "preprocessing": "RGB, [0,1], bilinear resize to 299x299 (align_corners=False, no \
                          antialias), 2x-1 (pytorch-fid)",
        "feature_dims": FEATURE_DIM,
        "fid_method": fid.method.describe(),
        "fid_terms": {
            "mean_sq_diff": fid.mean_term,
            "trace_real": fid.trace1,
            "trace_fake": fid.trace2,
            "trace_sqrt_product": fid.trace_sqrt,
        },
        "kid_subsets": kid.subsets,
        "kid_subset_size": kid.subset_size,
        "kid_kernel": "(x.y/d + 1)^3, unbiased MMD^2 (clean-fid)",
        "note": note,
    });
    common::write_json(&ctx.output_path(METRICS), &inputs.record(metrics))
}

fn fail(e: impl std::fmt::Display) -> StageError {
    StageError::failed(e.to_string())
}

/// The one size all generated images share (the target ground truth is brought to).
fn common_size(fake: &[Entry]) -> Result<(u32, u32), StageError> {
    let mut size = None;
    for e in fake {
        let dims = image::image_dimensions(&e.path).map_err(|err| {
            StageError::failed(format!("cannot read image {}: {err}", e.path.display()))
        })?;
        match size {
            None => size = Some((dims, &e.path)),
            Some((first, first_path)) if first != dims => {
                return Err(StageError::failed(format!(
                    "generated images differ in size ({} is {}x{}, {} is {}x{}), so there is no \
                     one size to bring the ground truth to; set `resize: none`",
                    first_path.display(),
                    first.0,
                    first.1,
                    e.path.display(),
                    dims.0,
                    dims.1
                )))
            }
            Some(_) => {}
        }
    }
    size.map(|(dims, _)| dims).ok_or_else(|| StageError::failed("no generated images"))
}

/// Pool3 features of each image (in order), `prepare` applied to the decoded image first.
pub(crate) fn features(
    ctx: &mut StageContext<'_>,
    model: &FidInception,
    entries: &[Entry],
    batch_size: usize,
    prepare: &dyn Fn(RgbImage) -> RgbImage,
) -> Result<Vec<Vec<f32>>, StageError> {
    let mut out = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(batch_size.max(1)) {
        ctx.cancel.check()?;
        let mut batch = Vec::with_capacity(chunk.len());
        for e in chunk {
            let image = prepare(images::load_rgb(&e.path)?);
            let context = format!("preprocessing {}", e.path.display());
            let tensor = images::to_unit_tensor(&image)
                .and_then(|t| inception::preprocess(&t))
                .map_err(candle_err(&context))?;
            batch.push(tensor);
        }
        let batch = inception::stack(&batch).map_err(candle_err("batching images"))?;
        let f = model.features(&batch).and_then(|f| f.to_vec2::<f32>());
        out.extend(f.map_err(candle_err("running Inception"))?);
        ctx.progress.advance(chunk.len() as u64, "");
    }
    Ok(out)
}
