#!/usr/bin/env python3
"""The PyTorch/diffusers side of docs/bench/train.md: seconds per optimiser step and peak RSS of
the reference training step on a random UNet, on CPU, one configuration per process.

    python3 bench/train_bench.py <tiny|mid> <plain|checkpointing> <steps> <threads>

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
}


def main():
    name, mode, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config, side = CONFIGS[name]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, sample_size=side, **config).train()
    if mode == "checkpointing":
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents = torch.randn(1, 4, side, side)
    noise = torch.randn(1, 4, side, side)
    context = torch.randn(1, 77, config["cross_attention_dim"])
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        t = torch.tensor([step * 97 % 1000])
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, context).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        if step > 0:
            times.append(time.perf_counter() - started)
    times.sort()
    print(json.dumps({
        "impl": "diffusers", "config": name, "params": sum(p.numel() for p in unet.parameters()),
        "latent": side, "checkpointing": mode == "checkpointing", "threads": threads, "steps": steps,
        "median_s_per_step": round(times[len(times) // 2], 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
