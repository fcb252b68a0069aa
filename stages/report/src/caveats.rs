//! Section 5: what a reader must know before trusting the numbers, worked out from the inputs:
//! how many images the FID saw, whether the metric networks had their published weights, what
//! CMMD and the CLIP score can and cannot say, how the samples were drawn, plus any problem the
//! other sections met.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use crate::format;
use crate::models::Model;
use crate::provenance;
use crate::section::Section;
use sdpipe_stages::api::Provenance;

/// Inception pool features: the dimension of FID's covariance matrices.
const DEFAULT_FID_DIMS: u64 = 2048;
/// Sample sizes in published FIDs (10k–50k); below this the bias is worth stating.
const FID_USUAL_N: u64 = 10_000;
/// Sampling parameters worth repeating in the notes.
const SAMPLING_PARAMS: [&str; 9] = [
    "scheduler",
    "steps",
    "guidance_scale",
    "negative_prompt",
    "seed",
    "n_per_prompt",
    "height",
    "width",
    "precision",
];

pub fn build(models: &[Model], provenance: &Provenance, notes: Vec<String>) -> Option<Section> {
    let mut items = Vec::new();
    fid_sample_size(models, &mut items);
    cmmd_meaning(models, &mut items);
    weights(models, &mut items);
    lpips_meaning(models, &mut items);
    clip_score_meaning(models, &mut items);
    intervals(models, &mut items);
    sampling(models, provenance, &mut items);
    if models.iter().any(|m| !m.is_original && m.has_table_metrics())
        && !models.iter().any(|m| m.is_original && m.has_table_metrics())
    {
        items.push(
            "No metrics of the original model were bound (`base_fid`, `base_lpips`), so the \
             table shows no change from it."
                .to_string(),
        );
    }
    items.extend(notes);
    if items.is_empty() {
        return None;
    }
    let markdown: String = items.iter().map(|i| format!("- {i}\n")).collect();
    Some(Section { title: "Caveats", markdown, json: json!(items), notes: vec![] })
}

fn fid_sample_size(models: &[Model], items: &mut Vec<String>) {
    let fids: Vec<_> = models.iter().filter_map(|m| m.fid.as_ref()).collect();
    if fids.is_empty() {
        return;
    }
    let sizes: BTreeSet<(u64, u64)> = fids.iter().map(|f| (f.n_real, f.n_fake)).collect();
    let n = fids.iter().map(|f| f.n_real.min(f.n_fake)).min().expect("non-empty");
    let dims = fids
        .iter()
        .filter_map(|f| f.raw.get("dims").and_then(Value::as_u64))
        .max()
        .unwrap_or(DEFAULT_FID_DIMS);
    let counts = sizes
        .iter()
        .map(|(r, f)| format!("{r} real / {f} generated"))
        .collect::<Vec<_>>()
        .join(", ");
    if n < dims {
        items.push(format!(
            "FID and KID were computed from N = {n} images per side ({counts}). FID's estimate \
             is biased upward by a term that shrinks only like 1/N, and with N below the {dims} \
             feature dimensions the covariance estimates are rank-deficient (rank ≤ N − 1): at \
             this N the bias dominates the FID value. Read FID only as a ranking of models \
             evaluated at the same N, never against published FIDs (computed on 10k–50k \
             images); KID is unbiased, and its ± std shows how noisy it is at this N."
        ));
    } else if n < FID_USUAL_N {
        items.push(format!(
            "FID was computed from N = {n} images per side ({counts}), fewer than the 10k–50k of \
             published FIDs; its upward bias grows as N shrinks, so compare FIDs only at equal N."
        ));
    }
    if sizes.len() > 1 {
        items.push(format!(
            "The FID rows use different numbers of images ({counts}); FID's bias depends on N, \
             so those rows are not directly comparable."
        ));
    }
}

/// CMMD's estimator and what a set-level number cannot say (it has no interval).
fn cmmd_meaning(models: &[Model], items: &mut Vec<String>) {
    let cmmds: Vec<_> = models.iter().filter_map(|m| m.cmmd.as_ref()).collect();
    let Some(n) = cmmds.iter().map(|c| c.n_real.min(c.n_fake)).min() else {
        return;
    };
    items.push(format!(
        "CMMD was computed from as few as N = {n} images per side with the biased estimator \
         that google-research/cmmd's code implements (its paper names the unbiased one): a set \
         compared with itself scores exactly 0, but two different sets from the same \
         distribution score above 0 by a term that shrinks like 1/N, so compare CMMDs only at \
         equal N. Like FID it compares whole sets of images, not images one by one, so it has \
         no bootstrap interval here: its bold and Δ compare point values. Its CLIP embeddings, \
         too, mean nothing with random weights (as in sdpipe's tests and demo)."
    ));
    same_model("CMMD", cmmds.iter().map(|c| c.model.as_deref()).collect(), items);
}

/// What the CLIP score measures, and what it does not.
fn clip_score_meaning(models: &[Model], items: &mut Vec<String>) {
    let scores: Vec<_> = models.iter().filter_map(|m| m.clip_score.as_ref()).collect();
    let (Some(low), Some(high)) =
        (scores.iter().map(|c| c.n).min(), scores.iter().map(|c| c.n).max())
    else {
        return;
    };
    let n = if low == high { low.to_string() } else { format!("{low}–{high}") };
    items.push(format!(
        "The CLIP score is 100 × the cosine between CLIP's embeddings of each generated image \
         and the caption it was sampled from (below 0 counted as 0), averaged over {n} images: it measures how well the images match their captions as CLIP sees them, with \
         CLIP's own biases, not image quality or closeness to the ground truth. With random \
         CLIP weights (as in sdpipe's tests and demo) it means nothing."
    ));
    same_model("CLIP score", scores.iter().map(|c| c.model.as_deref()).collect(), items);
}

/// A note when rows of one metric were computed with different CLIP models.
fn same_model(metric: &str, used: Vec<Option<&str>>, items: &mut Vec<String>) {
    let distinct: BTreeSet<Option<&str>> = used.into_iter().collect();
    if distinct.len() > 1 {
        items.push(format!(
            "The {metric} rows were computed with different CLIP models ({}): they are not \
             comparable with each other.",
            distinct
                .iter()
                .map(|w| w.map(format::code).unwrap_or_else(|| "unknown".into()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

fn weights(models: &[Model], items: &mut Vec<String>) {
    let nets: [(&str, Vec<Option<&str>>); 2] = [
        (
            "FID/KID (Inception)",
            models.iter().filter_map(|m| m.fid.as_ref()).map(|f| f.weights.as_deref()).collect(),
        ),
        (
            "LPIPS",
            models.iter().filter_map(|m| m.lpips.as_ref()).map(|l| l.weights.as_deref()).collect(),
        ),
    ];
    for (net, used) in nets {
        if used.is_empty() {
            continue;
        }
        let distinct: BTreeSet<Option<&str>> = used.iter().copied().collect();
        let random: Vec<&str> = distinct
            .iter()
            .flatten()
            .copied()
            .filter(|w| w.to_ascii_lowercase().contains("random"))
            .collect();
        if !random.is_empty() {
            items.push(format!(
                "The {net} network ran with random stand-in weights (metrics.json `weights`: {}), \
                 not the published ones: its numbers only rank the models within this report and \
                 mean nothing outside it.",
                random.iter().map(|w| format::code(w)).collect::<Vec<_>>().join(", ")
            ));
        }
        if distinct.contains(&None) {
            items.push(format!(
                "Some {net} metrics.json files do not say which weights computed them (no \
                 `weights` field)."
            ));
        }
        if distinct.len() > 1 {
            items.push(format!(
                "The {net} rows were computed with different weights ({}): they are not \
                 comparable with each other.",
                distinct
                    .iter()
                    .map(|w| w.map(format::code).unwrap_or_else(|| "unknown".into()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

fn lpips_meaning(models: &[Model], items: &mut Vec<String>) {
    let Some(n) = models.iter().filter_map(|m| m.lpips.as_ref()).map(|l| l.n).min() else {
        return;
    };
    items.push(format!(
        "LPIPS is the perceptual distance between each generated image and the ground-truth \
         photo of the same caption: lower means closer to that particular photo, not a better \
         image. It is averaged over {n} pairs, and a different seed moves it about as much as a \
         different model does."
    ));
}

/// Below this many items a percentile bootstrap's intervals are noticeably too narrow.
const BOOTSTRAP_SMALL_N: usize = 20;

/// How the intervals were computed and what they cannot say; FID and KID have none.
fn intervals(models: &[Model], items: &mut Vec<String>) {
    let sizes: Vec<usize> = models
        .iter()
        .flat_map(|m| {
            let lpips = m.lpips.as_ref().and_then(|l| l.per_pair.as_ref()).map(|p| p.len());
            let clip = m.clip_score.as_ref().and_then(|c| c.per_image.as_ref()).map(|p| p.len());
            let scene = m.scene.as_ref().and_then(|s| s.per_image.as_ref());
            lpips
                .into_iter()
                .chain(clip)
                .chain(scene.into_iter().flat_map(|c| c.values().map(|p| p.len())))
        })
        .collect();
    if let Some(n) = sizes.iter().min() {
        let mut item = format!(
            "The intervals [low, high] are 95% percentile-bootstrap intervals of the mean over \
             images ({} resamples from a fixed seed, so the same inputs give the same \
             intervals). Two models evaluated on the same images are compared by \
             bootstrapping their per-image differences, and a difference counts as significant \
             only when its interval excludes 0 (on different images: only when the two models' \
             intervals do not overlap).",
            crate::bootstrap::RESAMPLES
        );
        if *n < BOOTSTRAP_SMALL_N {
            item.push_str(&format!(
                " With as few as N = {n} images the percentile bootstrap's intervals are too \
                 narrow (its coverage falls below 95% under about {BOOTSTRAP_SMALL_N} images): \
                 read them as a lower bound on the uncertainty."
            ));
        }
        items.push(item);
    }
    if models.iter().any(|m| m.fid.is_some()) {
        items.push(
            "FID and KID compare whole sets of images, not images one by one, so they have no \
             bootstrap interval here: their bold and Δ compare point values (KID's ± std is its \
             spread over subsets of the images, not an interval of its mean)."
                .to_string(),
        );
    }
}

fn sampling(models: &[Model], provenance: &Provenance, items: &mut Vec<String>) {
    // Sampler settings, from the sample stages' parameters.
    let settings: Vec<(String, Map<String, Value>)> = provenance::sample_settings(provenance)
        .into_iter()
        .map(|(name, params)| {
            let kept = params
                .into_iter()
                .filter(|(k, v)| SAMPLING_PARAMS.contains(&k.as_str()) && !v.is_null())
                .collect();
            (name, kept)
        })
        .collect();
    let describe = |p: &Map<String, Value>| {
        SAMPLING_PARAMS
            .iter()
            .filter_map(|k| p.get(*k).map(|v| format!("{k} = {}", plain(v))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let distinct: BTreeSet<String> = settings.iter().map(|(_, p)| describe(p)).collect();
    match distinct.len() {
        0 => {}
        1 => items.push(format!(
            "Every model was sampled with the same settings: {}.",
            distinct.iter().next().expect("one")
        )),
        _ => items.push(format!(
            "The models were sampled with different settings, so sampling differences mix with \
             the weights': {}.",
            settings
                .iter()
                .map(|(name, p)| format!("{} ({})", format::code(name), describe(p)))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }

    // Seeds and draws, from samples.jsonl.
    let drawn: Vec<Drawn> = models.iter().filter_map(Drawn::of).collect();
    let Some(reference) = drawn.first() else {
        return;
    };
    let all_seeds: BTreeSet<i64> =
        drawn.iter().flat_map(|d| d.seeds.values().flatten().copied()).collect();
    if let (Some(first), Some(last)) = (all_seeds.first(), all_seeds.last()) {
        let differing: Vec<String> = drawn[1..]
            .iter()
            .filter(|d| {
                d.seeds.iter().any(|(id, s)| reference.seeds.get(id).is_some_and(|r| r != s))
            })
            .map(|d| format::code(&d.model.name))
            .collect();
        if !differing.is_empty() {
            items.push(format!(
                "{} used other seeds than {} for some captions: per-image differences mix seed \
                 noise with the effect of the weights.",
                differing.join(", "),
                format::code(&reference.model.name)
            ));
        } else if drawn.len() > 1 {
            items.push(format!(
                "Every model was sampled with the same seed for each caption (seeds {first}–{last} \
                 over the captions), so in a row of the qualitative table only the weights differ."
            ));
        } else {
            items.push(format!("Samples were drawn with seeds {first}–{last}."));
        }
    }
    let draws: BTreeSet<u64> = drawn.iter().map(|d| d.draws).collect();
    if draws.iter().all(|d| *d <= 1) {
        items.push(
            "Each caption was sampled once: the qualitative table shows a single draw per \
             model, not its typical output."
                .to_string(),
        );
    } else {
        items.push(format!(
            "Captions were sampled {} times per model; the qualitative table shows the first \
             draw (k = 0).",
            draws.iter().map(u64::to_string).collect::<Vec<_>>().join(" or ")
        ));
    }
}

/// How a model's samples were drawn, from its `samples.jsonl`.
struct Drawn<'a> {
    model: &'a Model,
    /// id → seed of its first draw.
    seeds: BTreeMap<&'a str, Option<i64>>,
    /// Draws per caption (`n_per_prompt`).
    draws: u64,
}

impl<'a> Drawn<'a> {
    fn of(model: &'a Model) -> Option<Self> {
        let records = model.samples.as_ref()?.records.as_ref()?;
        let first = records.iter().filter(|r| r.k.unwrap_or(0) == 0);
        let seeds = first.map(|r| (r.id.as_str(), r.seed)).collect();
        let draws = records.iter().map(|r| r.k.unwrap_or(0) + 1).max().unwrap_or(0);
        Some(Drawn { model, seeds, draws })
    }
}

/// A parameter value as prose: strings without quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => format::code(s),
        other => other.to_string(),
    }
}
