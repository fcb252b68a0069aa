//! Seconds per optimiser step and peak memory of sdpipe's training step on a random UNet (not a
//! test; see docs/bench/train.md). One configuration per process, so the peak RSS is its own.
//!
//! cargo run --release -p sdpipe-train --example train_bench -- <tiny|mid|sd15> \
//!     <plain|checkpointing|lora-plain|lora-checkpointing> <steps> <threads> [device] \
//!     [no|fp16|bf16]
//!
//! The step is the real one (`Objective::loss_and_grads` + `apply_update`: MSE on ε, backward,
//! clipping, AdamW, EMA; with `fp16` or `bf16` the UNet under autocast as `mixed_precision`
//! runs it, fp16 with loss scaling and `apply_scaled_update`) on random latents and text states; the frozen VAE and text encoder are
//! left out, as in bench/train_bench.py. The `lora-*` modes train rank-4 adapters on
//! to_q/to_k/to_v/to_out.0 of a frozen random UNet, as train_text_to_image_lora.py does (lr 1e-4,
//! no EMA: that script has none).

use std::time::Instant;

use candle_core::{Tensor, Var};
use sdpipe_stages::api::DeviceChoice;
use sdpipe_train::denoiser::Denoiser;
use sdpipe_train::ema::Ema;
use sdpipe_train::grad_scaler::GradScaler;
use sdpipe_train::objective::{NoiseSchedule, Prediction, ScheduleConfig};
use sdpipe_train::optim::{AdamW, AdamWConfig};
use sdpipe_train::trainer::{apply_scaled_update, apply_update, Objective};
use sdpipe_unet::{BlockKind, LoraConfig, UNet, UNetConfig};

/// `(config, latent side)`: the tiny test model at 16×16 latents, a mid-size SD-shaped model
/// (channels 64/128/256, two resnets per block, cross-attention in the first two) at 32×32, and
/// SD1.5's UNet (860 M parameters) at 64×64 latents (512 px), for scripts/gpu-check.sh.
fn config(name: &str) -> (UNetConfig, usize) {
    match name {
        "tiny" => (UNetConfig::tiny(), 16),
        "mid" => {
            use BlockKind::{CrossAttn, Plain};
            let c = UNetConfig {
                block_out_channels: vec![64, 128, 256],
                down_blocks: vec![CrossAttn, CrossAttn, Plain],
                up_blocks: vec![Plain, CrossAttn, CrossAttn],
                layers_per_block: vec![2, 2, 2],
                attention_heads: vec![8, 8, 8],
                transformer_layers_per_block: vec![1, 1, 1],
                cross_attention_dim: vec![256, 256, 256],
                ..UNetConfig::tiny()
            };
            (c, 32)
        }
        "sd15" => {
            use BlockKind::{CrossAttn, Plain};
            let c = UNetConfig {
                block_out_channels: vec![320, 640, 1280, 1280],
                down_blocks: vec![CrossAttn, CrossAttn, CrossAttn, Plain],
                up_blocks: vec![Plain, CrossAttn, CrossAttn, CrossAttn],
                layers_per_block: vec![2, 2, 2, 2],
                attention_heads: vec![8, 8, 8, 8],
                transformer_layers_per_block: vec![1, 1, 1, 1],
                cross_attention_dim: vec![768, 768, 768, 768],
                ..UNetConfig::tiny()
            };
            (c, 64)
        }
        other => panic!("unknown config {other} (tiny, mid, sd15)"),
    }
}

/// The random UNet `name` saved to a scratch folder and loaded back for LoRA training, as the
/// `train-lora` stage builds it from weight files. A child process writes the folder, so the
/// random model's memory does not count in this process's peak RSS.
fn lora_unet(name: &str, device: &candle_core::Device) -> UNet {
    let dir = std::env::temp_dir().join(format!("sdpipe-train-bench-{}", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new(exe).args(["--write", name]).arg(&dir).status();
    assert!(status.unwrap().success(), "writing the random UNet");
    let weights = [dir.join("diffusion_pytorch_model.safetensors")];
    let unet =
        UNet::for_lora_training(&dir, &weights, &LoraConfig::new(4, 4.0), 0, device).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    unet
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn main() {
    // As sdpipe runs the stage (src/main.rs).
    sdpipe_stages::process::set_up();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--write") {
        let unet = UNet::random(config(&args[2]).0, 0, &candle_core::Device::Cpu).unwrap();
        unet.save_pretrained(std::path::Path::new(&args[3])).unwrap();
        return;
    }
    let name = args.get(1).map(String::as_str).unwrap_or("tiny");
    let mode = args.get(2).map_or("plain", String::as_str);
    let checkpointing = mode.ends_with("checkpointing");
    let lora = mode.starts_with("lora-");
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2);
    let device = args.get(5).map_or("cpu", String::as_str);
    let device = DeviceChoice::parse(device).unwrap().open().unwrap();
    let mixed_precision = args.get(6).map_or("no", String::as_str);
    let autocast = match mixed_precision {
        "no" => None,
        "fp16" => Some(candle_core::DType::F16),
        "bf16" => Some(candle_core::DType::BF16),
        other => panic!("mixed precision `{other}`: no, fp16 or bf16"),
    };
    let mut scaler = (mixed_precision == "fp16").then(GradScaler::default);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let (config, side) = config(name);
        let context_dim = config.cross_attention_dim[0];
        let unet =
            if lora { lora_unet(name, &device) } else { UNet::random(config, 0, &device).unwrap() };
        unet.set_autocast(autocast).unwrap();
        let vars: Vec<Var> = Denoiser::parameters(&unet).into_iter().map(|(_, v)| v).collect();
        let mut adam = AdamW::new(
            vars.len(),
            AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 },
        );
        let mut ema = (!lora).then(|| Ema::new(&vars).unwrap());
        let lr = if lora { 1e-4 } else { 1e-5 };
        let schedule = NoiseSchedule::new(&ScheduleConfig::sd15()).unwrap();
        let objective = |scaler: Option<GradScaler>| Objective {
            schedule: &schedule,
            prediction: Prediction::Epsilon,
            snr_gamma: None,
            accumulation: 1,
            loss_scale: scaler.map_or(1.0, |s| s.scale),
            checkpointing,
        };
        let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device).unwrap();
        let context = Tensor::randn(0f32, 1.0, (1, 77, context_dim), &device).unwrap();
        let mut times = Vec::new();
        for step in 0..=steps {
            let started = Instant::now();
            let t = [(step * 97 % 1000) as u32];
            let (_, grads) =
                objective(scaler).loss_and_grads(&unet, &latents, &noise, &t, &context).unwrap();
            match &mut scaler {
                Some(scaler) => {
                    apply_scaled_update(&vars, grads, scaler, 1.0, &mut adam, lr, ema.as_mut())
                        .unwrap();
                }
                None => {
                    apply_update(&vars, grads, 1.0, &mut adam, lr, ema.as_mut()).unwrap();
                }
            }
            device.synchronize().unwrap(); // a GPU queues its work: time the step, not its launch
            if step > 0 {
                times.push(started.elapsed().as_secs_f64()); // the first step is warm-up
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{{\"impl\": \"sdpipe\", \"config\": \"{name}\", \"params\": {}, \"latent\": {side}, \
             \"trained_params\": {}, \"checkpointing\": {checkpointing}, \"lora\": {lora}, \
             \"threads\": {threads}, \"steps\": {steps}, \
             \"mixed_precision\": \"{mixed_precision}\", \
             \"device\": \"{}\", \
             \"median_s_per_step\": {:.4}, \"peak_rss_mib\": {:.1}}}",
            unet.parameter_count(),
            vars.iter().map(|v| v.elem_count()).sum::<usize>(),
            sdpipe_stages::device::describe(&device),
            times[times.len() / 2],
            peak_rss_mib()
        );
    });
}
