//! Peak memory and time of one UNet training step (forward + loss + all parameter gradients),
//! with or without gradient checkpointing. Run one setting per process so peaks do not mix:
//!
//! ```text
//! cargo run --release -p sdpipe-unet --example train_memory -- <tiny|mid|sd15> <latent> <batch> <plain|checkpointed> [steps]
//! ```
//!
//! Prints one JSON line: the config, parameter count, exact peak heap bytes during the step
//! (counting allocator) above the bytes live before it (model + inputs), peak RSS (`VmHWM`,
//! reset before the step), and seconds per step (the first step is a warm-up and not timed).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdpipe_unet::memory::{peak_rss_bytes, reset_peak_rss, CountingAlloc};
use sdpipe_unet::{BlockKind, UNet, UNetConfig};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

fn config(name: &str) -> UNetConfig {
    let sd = |channels: Vec<usize>, context: usize| UNetConfig {
        block_out_channels: channels,
        down_blocks: vec![
            BlockKind::CrossAttn,
            BlockKind::CrossAttn,
            BlockKind::CrossAttn,
            BlockKind::Plain,
        ],
        up_blocks: vec![
            BlockKind::Plain,
            BlockKind::CrossAttn,
            BlockKind::CrossAttn,
            BlockKind::CrossAttn,
        ],
        layers_per_block: vec![2; 4],
        attention_heads: vec![8; 4],
        transformer_layers_per_block: vec![1; 4],
        cross_attention_dim: vec![context; 4],
        ..UNetConfig::tiny()
    };
    match name {
        "tiny" => UNetConfig::tiny(),
        // SD1.5's layout (4 blocks, 2 layers, 8 heads, CLIP-L context) at 1/5 of its width.
        "mid" => sd(vec![64, 128, 256, 256], 768),
        "sd15" => sd(vec![320, 640, 1280, 1280], 768),
        other => panic!("unknown config `{other}` (tiny, mid, sd15)"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!(
            "usage: train_memory <tiny|mid|sd15> <latent> <batch> <plain|checkpointed> [steps]"
        );
        std::process::exit(2);
    }
    let (name, latent, batch) =
        (&args[0], args[1].parse::<usize>().unwrap(), args[2].parse::<usize>().unwrap());
    let checkpointing = match args[3].as_str() {
        "plain" => false,
        "checkpointed" => true,
        other => panic!("`{other}`: expected plain or checkpointed"),
    };
    let steps: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(2);
    let device = Device::Cpu;
    let config = config(name);
    let context_dim = config.cross_attention_dim[0];
    let unet = UNet::random(config, 0, &device).unwrap();
    let x = Tensor::randn(0f32, 1.0, (batch, 4, latent, latent), &device).unwrap();
    let noise = Tensor::randn(0f32, 1.0, (batch, 4, latent, latent), &device).unwrap();
    let t = Tensor::new(&vec![500f32; batch][..], &device).unwrap();
    let context = Tensor::randn(0f32, 1.0, (batch, 77, context_dim), &device).unwrap();
    let loss_fn = |p: &Tensor| (p - &noise)?.sqr()?.mean_all();

    let mut seconds = Vec::new();
    let (mut heap_peak, mut rss_peak, mut baseline) = (0usize, 0u64, 0usize);
    for step in 0..steps.max(1) {
        baseline = ALLOC.live_bytes();
        ALLOC.reset_peak();
        let rss_reset = reset_peak_rss();
        let start = Instant::now();
        let (loss, grads) = unet.loss_and_grads(&x, &t, &context, checkpointing, loss_fn).unwrap();
        let _ = loss.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        let elapsed = start.elapsed().as_secs_f64();
        heap_peak = heap_peak.max(ALLOC.peak_bytes() - baseline);
        if rss_reset {
            rss_peak = rss_peak.max(peak_rss_bytes().unwrap_or(0));
        }
        drop(grads);
        if step > 0 || steps == 1 {
            seconds.push(elapsed);
        }
    }
    let mean = seconds.iter().sum::<f64>() / seconds.len() as f64;
    let mib = |b: f64| (b / (1024.0 * 1024.0) * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "config": name,
            "latent": latent,
            "batch": batch,
            "checkpointing": checkpointing,
            "parameters": unet.parameter_count(),
            "live_before_step_mib": mib(baseline as f64),
            "step_heap_peak_mib": mib(heap_peak as f64),
            "peak_rss_mib": mib(rss_peak as f64),
            "seconds_per_step": (mean * 1000.0).round() / 1000.0,
            "threads": candle_core::utils::get_num_threads(),
        })
    );
}
