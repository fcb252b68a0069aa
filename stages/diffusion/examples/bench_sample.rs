//! Seconds per sampling step (one guided UNet call on a batch of 2 plus the scheduler update)
//! for the tiny pipeline and a mid-size random one, and the UNet call alone next to
//! candle-transformers' SD UNet (the one `sample` ran before it used sdpipe-unet) on the same
//! weights and inputs: `cargo run --release -p sdpipe-diffusion --example bench_sample`.
//! Numbers go to docs/bench/sample.md.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use sdpipe_diffusion::schedulers::SamplerKind;
use sdpipe_diffusion::{write_tiny, SdPipeline, StableDiffusion, TinySpec};

/// Seconds per call of `a` and of `b`, each the median of `rounds` calls made alternately, so
/// both see the same background load.
fn alternating_medians(rounds: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ta.push(time(&mut a));
        tb.push(time(&mut b));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(ta), median(tb))
}

fn main() {
    let threads = rayon::current_num_threads();
    let configs = [
        ("tiny (UNet 32/64, 64 px → 32² latents)", TinySpec::default()),
        (
            "mid (UNet 128/256/256, 256 px → 32² latents)",
            TinySpec {
                unet_channels: vec![128, 256, 256],
                layers_per_block: 2,
                vae_channels: vec![32, 64, 64, 64],
                image_size: 256,
                clip_hidden: 128,
                ..TinySpec::default()
            },
        ),
    ];
    let device = Device::Cpu;
    for (name, spec) in configs {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &spec).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let sd = StableDiffusion::load(&pipeline, &device, DType::F32).unwrap();
        let side = pipeline.unet.sample_size;
        let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device).unwrap();
        let cond = sd.embed(&["a cat on a table"]).unwrap();
        let uncond = sd.embed(&[""]).unwrap();
        let steps = 10;
        let mut sampler = SamplerKind::Pndm.build(&pipeline.scheduler, steps).unwrap();
        let calls = sampler.timesteps().len();
        let start = Instant::now();
        let out = sd
            .denoise(&latents, &cond, Some(&uncond), 7.5, sampler.as_mut(), &mut |_, _| Ok(()))
            .unwrap();
        let per_step = start.elapsed().as_secs_f64() / calls as f64;
        let start = Instant::now();
        sd.decode(&out).unwrap();
        let decode = start.elapsed().as_secs_f64();

        // The UNet call alone, both implementations, same batch-of-2 inputs.
        let x = Tensor::cat(&[&latents, &latents], 0).unwrap();
        let context = Tensor::cat(&[&uncond, &cond], 0).unwrap();
        let t = Tensor::new(&[501f32], &device).unwrap();
        let files = pipeline.weight_files("unet").unwrap();
        // SAFETY: the temporary folder is not written while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &device) }.unwrap();
        let candle = UNet2DConditionModel::new(
            vb,
            pipeline.unet.in_channels,
            pipeline.unet.out_channels,
            false,
            pipeline.candle_unet_config().unwrap(),
        )
        .unwrap();
        let (ours, theirs) = alternating_medians(
            5,
            || {
                sd.unet.predict(&x, &t, &context).unwrap();
            },
            || {
                candle.forward(&x, 501.0, &context).unwrap();
            },
        );
        println!(
            "{name}: {per_step:.4} s per step (guided, batch 2, {calls} calls), VAE decode \
             {decode:.3} s; UNet call alone (medians of 5, alternating): sdpipe-unet {ours:.4} s, \
             candle-transformers {theirs:.4} s; {threads} threads"
        );
    }
}
