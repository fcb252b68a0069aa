#!/usr/bin/env python3
"""The diffusers side of bench/sample.sh: seconds per sampling step of diffusers'
StableDiffusionPipeline on PyTorch CPU, on a pipeline folder written by
`stages/diffusion/examples/bench_sample.rs write` (the diffusers layout, loaded as is).

    python3 bench/sample.py <folder> <steps> <threads> [device] [f32|f16|bf16]
    python3 bench/sample.py ops <threads>

Same call as the sdpipe side: one prompt, guidance 7.5 with the empty negative prompt (a UNet
batch of 2 per step), PNDM from the folder's scheduler config, the folder's resolution,
output_type="latent" (prompt encoding, initial latents and the denoising loop; no VAE decode).
One warm-up call of 2 steps, then one timed call. Loading is not timed. Prints one JSON line,
in the same fields as the Rust side.

`ops` times torch's counterparts of `bench_sample ops` (the UNet's main ops at the mid model's
shapes, and the tiny model's self-attention), attention as diffusers runs it on torch 2:
F.scaled_dot_product_attention.
"""

import json
import sys
import time

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging

PROMPT = "a cat on a table"
GUIDANCE = 7.5
WARMUP_STEPS = 2


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def median_seconds(f):
    f()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ops(threads):
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    q, k, v = (torch.randn(2, 8, 1024, 16) for _ in range(3))
    kc, vc = torch.randn(2, 8, 77, 16), torch.randn(2, 8, 77, 16)
    q4, k4, v4 = (torch.randn(2, 8, 1024, 4) for _ in range(3))
    x, w128 = torch.randn(2, 128, 32, 32), torch.randn(128, 128, 3, 3) * 0.03
    x256, w256 = torch.randn(2, 256, 16, 16), torch.randn(256, 256, 3, 3) * 0.02
    b128, b256 = torch.randn(128), torch.randn(256)
    gamma, beta = torch.ones(128), torch.zeros(128)
    tokens, w_ff, h = torch.randn(2048, 128), torch.randn(1024, 128) * 0.09, torch.randn(2048, 512)
    cases = [
        ("self-attention (2x8 heads, 1024x1024, d 16)",
         lambda: F.scaled_dot_product_attention(q, k, v)),
        ("self-attention at the tiny model's d 4",
         lambda: F.scaled_dot_product_attention(q4, k4, v4)),
        ("cross-attention (2x8 heads, 1024x77, d 16)",
         lambda: F.scaled_dot_product_attention(q, kc, vc)),
        ("conv3x3 128->128 on 2x32x32", lambda: F.conv2d(x, w128, b128, padding=1)),
        ("conv3x3 256->256 on 2x16x16", lambda: F.conv2d(x256, w256, b256, padding=1)),
        ("group norm 32 groups, 2x128x32x32", lambda: F.group_norm(x, 32, gamma, beta, 1e-5)),
        ("linear 128->1024 on 2048 tokens", lambda: F.linear(tokens, w_ff)),
        ("gelu (erf) on 2048x512", lambda: F.gelu(h)),
    ]
    with torch.no_grad():
        for name, f in cases:
            print("%s: %.2f ms" % (name, median_seconds(f) * 1e3))


def main():
    if sys.argv[1] == "ops":
        return ops(int(sys.argv[2]))
    folder, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    device = torch.device(sys.argv[4] if len(sys.argv) > 4 else "cpu")
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
        sys.argv[5] if len(sys.argv) > 5 else "f32"]
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    logging.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler", type(pipe.scheduler)

    def sample(n):
        with torch.no_grad():
            return pipe(PROMPT, num_inference_steps=n, guidance_scale=GUIDANCE,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).images

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sample(WARMUP_STEPS)
    load_before = load_average()
    start = time.perf_counter()
    out = sample(steps)
    synchronize()
    seconds = time.perf_counter() - start
    # The pipeline's scheduler keeps the timesteps of the last call: PNDM makes steps + 1.
    calls = len(pipe.scheduler.timesteps)
    assert out.shape[0] == 1
    print(json.dumps({"side": "diffusers", "seconds": round(seconds, 4), "calls": calls,
                      "per_step": round(seconds / calls, 4), "threads": torch.get_num_threads(),
                      "load_before": load_before, "load_after": load_average()}))


if __name__ == "__main__":
    main()
