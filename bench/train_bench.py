#!/usr/bin/env python3
"""The PyTorch/diffusers side of docs/bench/train.md: seconds per optimiser step and peak RSS of
the reference training step on a random UNet, one configuration per process.

    python3 bench/train_bench.py <tiny|mid|sd15> <MODE> <steps> <threads> [device] [no|fp16|bf16]

MODE is `plain` or `checkpointing` (gradient checkpointing) for full finetuning, `lora-plain` or
`lora-checkpointing` for LoRA as train_text_to_image_lora.py sets it up: peft adapters of rank 4
(alpha 4, gaussian init) on to_q/to_k/to_v/to_out.0, the base frozen, AdamW (lr 1e-4) and
clipping over the adapters only, no EMA (that script has none).

On CUDA (scripts/gpu-check.sh) the step is timed after torch.cuda.synchronize(), and mixed
precision is the diffusers recipe's: autocast around the forward, fp32 master weights and AdamW
state, and for fp16 a GradScaler.

The step is the script's: MSE on epsilon, backward, clip_grad_norm_(1.0), AdamW, EMAModel.step,
on random latents and text states (the frozen VAE and text encoder are left out, as in
stages/train/examples/train_bench.rs). Same configurations as the Rust side.
"""

import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

CONFIGS = {
    # diffusers' own tiny test UNet (= sdpipe_unet::UNetConfig::tiny()), 16x16 latents
    "tiny": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        16,
    ),
    "mid": (
        dict(
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=256,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        32,
    ),
    # SD1.5's UNet (runwayml/stable-diffusion-v1-5/unet/config.json), 64x64 latents (512 px)
    "sd15": (
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        64,
    ),
}


def main():
    name, mode, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    device = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
    precision = sys.argv[6] if len(sys.argv) > 6 else "no"
    cuda = device.type == "cuda"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config, side = CONFIGS[name]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, sample_size=side, **config)
    unet = unet.to(device).train()
    lora = mode.startswith("lora-")
    if mode.endswith("checkpointing"):
        unet.enable_gradient_checkpointing()
    if lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4 if lora else 1e-5, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    ema = None
    if not lora:
        ema = EMAModel(params, model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.to(device)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents = torch.randn(1, 4, side, side, device=device)
    noise = torch.randn(1, 4, side, side, device=device)
    context = torch.randn(1, 77, config["cross_attention_dim"], device=device)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        t = torch.tensor([step * 97 % 1000], device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            pred = unet(noisy, t, context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if ema is not None:
            ema.step(params)
        if cuda:
            torch.cuda.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - started)
    times.sort()
    print(json.dumps({
        "impl": "diffusers", "config": name, "params": sum(p.numel() for p in unet.parameters()),
        "trained_params": sum(p.numel() for p in params),
        "latent": side, "checkpointing": mode.endswith("checkpointing"), "lora": lora, "threads": threads, "steps": steps,
        "device": str(device), "mixed_precision": precision,
        "median_s_per_step": round(times[len(times) // 2], 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_allocated_mib":
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
    }))


if __name__ == "__main__":
    main()
