//! The sdpipe side of `bench/sample.sh` (seconds per sampling step, sdpipe vs diffusers on the
//! same pipeline folders; results in docs/bench/sample.md).
//!
//! ```text
//! bench_sample write <dir> [model...]       # <dir>/tiny and <dir>/mid (diffusers layout), or
//!                                           # the models named (tiny, mid, sd15)
//! bench_sample time <folder> <steps> [device] [f32|f16|bf16]
//!                                           # one warm-up call, then one timed call
//! bench_sample ops                          # the UNet's main ops alone, at the mid model's shapes
//! ```
//!
//! `time` does what the `sample` stage does for one prompt, and what diffusers'
//! `StableDiffusionPipeline(prompt, num_inference_steps=steps, guidance_scale=7.5,
//! output_type="latent")` does in `bench/sample.py`: tokenize and encode the prompt and the
//! empty prompt, draw the initial latents, run PNDM with classifier-free guidance (a UNet batch
//! of 2 per step). The VAE decode is not timed on either side. Loading is not timed. It prints
//! one JSON line: total seconds, the number of UNet calls (PNDM makes `steps + 1`), seconds per
//! call, and the 1-minute load average before and after.
//!
//! `ops` times each kind of op the mid-size UNet spends its time in, on the shapes it runs them
//! at (batch 2, 32×32 latents, 128 channels, 8 heads; and the tiny model's self-attention, 32
//! channels in 8 heads), with the functions the UNet calls;
//! `bench/sample.py ops` times torch's counterparts, to show where a difference comes from.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdpipe_diffusion::schedulers::SamplerKind;
use sdpipe_diffusion::{write_tiny, SdPipeline, StableDiffusion, TinySpec};
use sdpipe_stages::api::DeviceChoice;

const PROMPT: &str = "a cat on a table";
const GUIDANCE: f64 = 7.5;
/// Steps of the warm-up call: enough to run every kind of PLMS update once.
const WARMUP_STEPS: usize = 2;

/// The pipelines the benchmark compares on: the test suite's tiny one (UNet 32/64, 64 px → 32²
/// latents), a mid-size one (UNet 128/256/256 with two layers per block, 256 px → 32² latents),
/// and, for scripts/gpu-check.sh, one of SD1.5's sizes with random weights (UNet 320/640/1280/
/// 1280, 860 M parameters; CLIP ViT-L/14's text encoder; 512 px → 64² latents).
fn specs() -> [(&'static str, TinySpec); 3] {
    [
        ("tiny", TinySpec::default()),
        (
            "mid",
            TinySpec {
                unet_channels: vec![128, 256, 256],
                layers_per_block: 2,
                vae_channels: vec![32, 64, 64, 64],
                image_size: 256,
                clip_hidden: 128,
                ..TinySpec::default()
            },
        ),
        (
            "sd15",
            TinySpec {
                unet_channels: vec![320, 640, 1280, 1280],
                layers_per_block: 2,
                vae_channels: vec![128, 256, 512, 512],
                image_size: 512,
                clip_hidden: 768,
                clip_layers: 12,
                clip_heads: 12,
                clip_intermediate: 3072,
                ..TinySpec::default()
            },
        ),
    ]
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn write(dir: &Path, names: &[&str]) -> Result<(), String> {
    let names = if names.is_empty() { &["tiny", "mid"][..] } else { names };
    for name in names {
        let spec = specs()
            .into_iter()
            .find_map(|(n, spec)| (n == *name).then_some(spec))
            .ok_or_else(|| format!("unknown model `{name}`: tiny, mid or sd15"))?;
        let folder = dir.join(name);
        write_tiny(&folder, &spec).map_err(|e| format!("{}: {e}", folder.display()))?;
        println!("{}", folder.display());
    }
    Ok(())
}

/// One text-to-latents call, as the pipeline call in bench/sample.py; returns the number of
/// UNet calls it made.
fn sample(sd: &StableDiffusion, pipeline: &SdPipeline, steps: usize) -> Result<usize, String> {
    let side = pipeline.unet.sample_size;
    let cond = sd.embed(&[PROMPT]).map_err(|e| e.to_string())?;
    let uncond = sd.embed(&[""]).map_err(|e| e.to_string())?;
    let latents = Tensor::randn(0f32, 1.0, (1, sd.latent_channels, side, side), &sd.device)
        .map_err(|e| e.to_string())?;
    let mut sampler =
        SamplerKind::Pndm.build(&pipeline.scheduler, steps).map_err(|e| e.to_string())?;
    let calls = sampler.timesteps().len();
    let out = sd
        .denoise(&latents, &cond, Some(&uncond), GUIDANCE, sampler.as_mut(), &mut |_, _| Ok(()))
        .map_err(|e| e.to_string())?;
    // candle's CPU ops are eager, but a GPU's are queued: the result must exist before the clock
    // stops.
    out.flatten_all().and_then(|x| x.sum_all()).map_err(|e| e.to_string())?;
    sd.device.synchronize().map_err(|e| e.to_string())?;
    Ok(calls)
}

fn time(folder: &Path, steps: usize, device: &str, dtype: &str) -> Result<(), String> {
    let device = DeviceChoice::parse(device)?.open().map_err(|e| e.to_string())?;
    let dtype = match dtype {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => return Err(format!("unknown dtype `{other}`: f32, f16 or bf16")),
    };
    let pipeline = SdPipeline::open(folder).map_err(|e| e.to_string())?;
    let sd = StableDiffusion::load(&pipeline, &device, dtype).map_err(|e| e.to_string())?;
    sample(&sd, &pipeline, WARMUP_STEPS)?;
    let load_before = load_average();
    let start = Instant::now();
    let calls = sample(&sd, &pipeline, steps)?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"side\": \"sdpipe\", \"seconds\": {seconds:.4}, \"calls\": {calls}, \
         \"per_step\": {:.4}, \"threads\": {}, \"load_before\": {load_before}, \
         \"load_after\": {}}}",
        seconds / calls as f64,
        rayon::current_num_threads(),
        load_average()
    );
    Ok(())
}

/// One op of `bench_sample ops`, on inputs it borrows.
type Op<'a> = Box<dyn FnMut() -> candle_core::Result<Tensor> + 'a>;

/// Median wall time of `f` over 5 calls after one warm-up call.
fn median_seconds(mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn ops() -> candle_core::Result<()> {
    use sdpipe_unet::{conv, linear, ops, pointwise};
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    let (q, k, v) =
        (randn(&[2, 8, 1024, 16])?, randn(&[2, 8, 1024, 16])?, randn(&[2, 8, 1024, 16])?);
    let (kc, vc) = (randn(&[2, 8, 77, 16])?, randn(&[2, 8, 77, 16])?);
    let (q4, k4, v4) =
        (randn(&[2, 8, 1024, 4])?, randn(&[2, 8, 1024, 4])?, randn(&[2, 8, 1024, 4])?);
    let x = randn(&[2, 128, 32, 32])?;
    let w128 = (randn(&[128, 128, 3, 3])? * 0.03)?;
    let x256 = randn(&[2, 256, 16, 16])?;
    let w256 = (randn(&[256, 256, 3, 3])? * 0.02)?;
    let (b128, b256) = (randn(&[128])?, randn(&[256])?);
    let (gamma, beta) =
        (Tensor::ones(128, DType::F32, &dev)?, Tensor::zeros(128, DType::F32, &dev)?);
    let tokens = randn(&[2048, 128])?;
    let w_ff = (randn(&[1024, 128])? * 0.09)?;
    let h = randn(&[2048, 512])?;
    let cases: Vec<(&str, Op)> = vec![
        (
            "self-attention (2x8 heads, 1024x1024, d 16)",
            Box::new(|| ops::attention(&q, &k, &v, 0.25)),
        ),
        ("self-attention at the tiny model's d 4", Box::new(|| ops::attention(&q4, &k4, &v4, 0.5))),
        (
            "cross-attention (2x8 heads, 1024x77, d 16)",
            Box::new(|| ops::attention(&q, &kc, &vc, 0.25)),
        ),
        ("conv3x3 128->128 on 2x32x32", Box::new(|| conv::conv2d(&x, &w128, &b128, 1, 1))),
        ("conv3x3 256->256 on 2x16x16", Box::new(|| conv::conv2d(&x256, &w256, &b256, 1, 1))),
        (
            "group norm 32 groups, 2x128x32x32",
            Box::new(|| ops::group_norm(&x, &gamma, &beta, 32, 1e-5)),
        ),
        ("linear 128->1024 on 2048 tokens", Box::new(|| linear::linear(&tokens, &w_ff, None))),
        ("gelu (erf) on 2048x512", Box::new(|| pointwise::gelu(&h))),
    ];
    for (name, mut f) in cases {
        println!("{name}: {:.2} ms", median_seconds(&mut f)? * 1e3);
    }
    Ok(())
}

fn main() -> ExitCode {
    // As sdpipe runs the stage (src/main.rs).
    sdpipe_stages::process::set_up();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["write", dir, names @ ..] => write(&PathBuf::from(dir), names),
        ["ops"] => ops().map_err(|e| e.to_string()),
        ["time", folder, steps, rest @ ..] if rest.len() <= 2 => match steps.parse::<usize>() {
            Ok(steps) if steps > 0 => {
                let device = rest.first().copied().unwrap_or("cpu");
                time(&PathBuf::from(folder), steps, device, rest.get(1).copied().unwrap_or("f32"))
            }
            _ => Err(format!("steps must be a positive integer, got {steps:?}")),
        },
        _ => Err("usage: bench_sample write <dir> [model...] | time <folder> <steps> [device] \
                  [dtype] | ops"
            .into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_sample: {e}");
            ExitCode::FAILURE
        }
    }
}
