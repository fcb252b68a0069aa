//! Seconds per sampling step (one guided UNet call on a batch of 2) for the tiny pipeline and a
//! mid-size random one: `cargo run --release -p sdpipe-diffusion --example bench_sample`.
//! Numbers go to docs/bench/sample.md.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdpipe_diffusion::schedulers::SamplerKind;
use sdpipe_diffusion::{write_tiny, SdPipeline, StableDiffusion, TinySpec};

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
    for (name, spec) in configs {
        let dir = tempfile::tempdir().unwrap();
        write_tiny(dir.path(), &spec).unwrap();
        let pipeline = SdPipeline::open(dir.path()).unwrap();
        let sd = StableDiffusion::load(&pipeline, &Device::Cpu, DType::F32).unwrap();
        let side = pipeline.unet.sample_size;
        let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), &Device::Cpu).unwrap();
        let cond = sd.embed(&["a cat on a table"]).unwrap();
        let uncond = sd.embed(&[""]).unwrap();
        let steps = 10;
        let mut sampler = SamplerKind::Pndm.build(&pipeline.scheduler, steps).unwrap();
        let calls = sampler.timesteps().len();
        let start = Instant::now();
        let out = sd
            .denoise(&latents, &cond, Some(&uncond), 7.5, sampler.as_mut(), &mut |_, _| Ok(()))
            .unwrap();
        let per_call = start.elapsed().as_secs_f64() / calls as f64;
        let start = Instant::now();
        sd.decode(&out).unwrap();
        let decode = start.elapsed().as_secs_f64();
        println!(
            "{name}: {per_call:.4} s per step (guided, batch 2, {calls} calls), VAE decode \
             {decode:.3} s, {threads} threads"
        );
    }
}
