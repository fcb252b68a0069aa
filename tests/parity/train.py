#!/usr/bin/env python3
"""Parity fixtures for sdpipe-train (run by hand; CI only reads what this writes).

Reproduces, with the reference libraries, the pieces of diffusers' examples/text_to_image/
train_text_to_image.py that sdpipe-train reimplements, on tiny seeded random models, and writes
inputs and reference outputs to tests/fixtures/train/:

  unet/        a tiny UNet2DConditionModel (channels (8, 16), 4 groups, cross-attention width 8),
               save_pretrained (float32 safetensors, diffusers layout).
  vae/         a tiny AutoencoderKL (channels (8, 16), 4 groups, 4 latent channels).
  image.png    a 23x17 random RGB image (lossless, so no JPEG decoder is involved).
  io.safetensors:
    resized_16, resized_40      PIL bilinear resize (torchvision Resize(16) / Resize(40)) as uint8 HWC
    pixels                      the full train transform at resolution 16, centre crop, no flip
    pixels_flipped              the same with the horizontal flip applied
    vae_mean, vae_logvar        the VAE posterior of `pixels`
    posterior_noise, latents    latents = posterior.mean + posterior.std * noise, x scaling_factor
    x0, ehs                     fixed latents (2, 4, 8, 8) and text states (2, 77, 8)
    noise_1, t_1                step 1's noise and timesteps (one micro-batch of 2)
    noise_2a, t_2a, noise_2b, t_2b   step 2's two accumulated micro-batches
    pred_1                      the UNet's prediction on step 1's noisy latents
    loss_1, grad_norm_1         step 1: epsilon MSE; clip_grad_norm_ total norm
    loss_2a, loss_2b, grad_norm_2   step 2: min-SNR (gamma 5) epsilon losses, accumulation 2
    loss_v                      v-prediction MSE with the initial weights on step 1's inputs
    grad_1.<name>, grad_2.<name>  every UNet gradient of steps 1 and 2 (summed over step 2's
                                micro-batches), before clipping
    after_2.<name>, ema_2.<name>  every UNet weight and its EMA after step 2 (AdamW, lr 1e-3,
                                wd 1e-2; clip_grad_norm_ 1.0 before each step)
  schedules.json  diffusers get_scheduler multipliers for steps 0..12 (warmup 3, horizon 10),
                  DDPMScheduler alphas_cumprod at a few timesteps, compute_snr values.
  versions.txt

Usage: python3 tests/parity/train.py   (from the repository root)

       python3 tests/parity/train.py --check DIR
         loads DIR, a pipeline folder written by the `train` stage, with diffusers'
         StableDiffusionPipeline.from_pretrained, checks every UNet tensor against the safetensors
         file, and runs two denoising steps. To make one from the tiny test model:
           SDPIPE_TRAIN_EXPORT=/tmp/trained cargo test -p sdpipe-train --test train_stage \
             export_a_trained_pipeline -- --ignored
"""

import json
import os
import sys

import diffusers
import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "train")
SCALING = 0.18215
LR = 1e-3
GAMMA = 5.0


def main():
    os.makedirs(ROOT, exist_ok=True)
    torch.manual_seed(0)
    io = {}

    # --- the image transform -------------------------------------------------------------
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8), "RGB")
    image.save(os.path.join(ROOT, "image.png"))
    image = Image.open(os.path.join(ROOT, "image.png")).convert("RGB")
    bilinear = transforms.InterpolationMode.BILINEAR
    for size in (16, 40):
        resized = transforms.Resize(size, interpolation=bilinear)(image)
        io[f"resized_{size}"] = torch.from_numpy(np.array(resized).copy())
    tail = [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    plain = transforms.Compose([transforms.Resize(16, interpolation=bilinear), transforms.CenterCrop(16)] + tail)
    flipped = transforms.Compose(
        [transforms.Resize(16, interpolation=bilinear), transforms.CenterCrop(16), transforms.RandomHorizontalFlip(p=1.0)]
        + tail
    )
    io["pixels"] = plain(image).unsqueeze(0)
    io["pixels_flipped"] = flipped(image).unsqueeze(0)

    # --- the frozen VAE's posterior ------------------------------------------------------
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=SCALING,
    ).eval()
    vae.save_pretrained(os.path.join(ROOT, "vae"), safe_serialization=True)
    with torch.no_grad():
        dist = vae.encode(io["pixels"]).latent_dist
        io["vae_mean"] = dist.mean.clone()
        io["vae_logvar"] = dist.logvar.clone()
        io["posterior_noise"] = torch.randn_like(dist.mean)
        io["latents"] = (dist.mean + dist.std * io["posterior_noise"]) * vae.config.scaling_factor

    # --- the UNet training steps ---------------------------------------------------------
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    unet.save_pretrained(os.path.join(ROOT, "unet"), safe_serialization=True)
    unet.train()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

    io["x0"] = torch.randn(2, 4, 8, 8)
    io["ehs"] = torch.randn(2, 77, 8)
    for name in ("noise_1", "noise_2a", "noise_2b"):
        io[name] = torch.randn(2, 4, 8, 8)
    io["t_1"] = torch.tensor([10, 700])
    io["t_2a"] = torch.tensor([3, 999])
    io["t_2b"] = torch.tensor([250, 500])

    def pred(noise, t):
        noisy = scheduler.add_noise(io["x0"], noise, t)
        return unet(noisy, t, io["ehs"]).sample

    # v-prediction loss with the initial weights.
    with torch.no_grad():
        target_v = scheduler.get_velocity(io["x0"], io["noise_1"], io["t_1"])
        io["loss_v"] = F.mse_loss(pred(io["noise_1"], io["t_1"]).float(), target_v.float()).reshape(1)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    names = [n for n, _ in unet.named_parameters()]

    # Step 1: one micro-batch, epsilon target, plain MSE.
    model_pred = pred(io["noise_1"], io["t_1"])
    io["pred_1"] = model_pred.detach().clone()
    loss = F.mse_loss(model_pred.float(), io["noise_1"].float(), reduction="mean")
    io["loss_1"] = loss.detach().reshape(1)
    loss.backward()
    for n, p in unet.named_parameters():
        io[f"grad_1.{n}"] = p.grad.detach().clone()
    io["grad_norm_1"] = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0).reshape(1)
    optimizer.step()
    optimizer.zero_grad()
    ema.step(unet.parameters())

    # Step 2: two accumulated micro-batches, min-SNR weighted (as the script: loss / accumulation).
    for part in ("2a", "2b"):
        noise, t = io[f"noise_{part}"], io[f"t_{part}"]
        model_pred = pred(noise, t)
        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
        io[f"loss_{part}"] = loss.detach().reshape(1)
        (loss / 2).backward()
    for n, p in unet.named_parameters():
        io[f"grad_2.{n}"] = p.grad.detach().clone()
    io["grad_norm_2"] = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0).reshape(1)
    optimizer.step()
    optimizer.zero_grad()
    ema.step(unet.parameters())
    for n, p in unet.named_parameters():
        io[f"after_2.{n}"] = p.detach().clone()
    for n, s in zip(names, ema.shadow_params):
        io[f"ema_2.{n}"] = s.detach().clone()

    io = {k: v.contiguous() for k, v in io.items()}
    io["t_1"], io["t_2a"], io["t_2b"] = (io[k].to(torch.int64) for k in ("t_1", "t_2a", "t_2b"))
    save_file(io, os.path.join(ROOT, "io.safetensors"))

    # --- schedules -----------------------------------------------------------------------
    dummy = torch.nn.Parameter(torch.zeros(1))
    factors = {}
    for kind in ("constant", "constant_with_warmup", "linear", "cosine"):
        opt = torch.optim.SGD([dummy], lr=1.0)
        sched = get_scheduler(kind, optimizer=opt, num_warmup_steps=3, num_training_steps=10)
        values = []
        for _ in range(13):
            values.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        factors[kind] = values
    timesteps = [0, 1, 10, 250, 499, 500, 700, 999]
    schedules = {
        "lr_factors": factors,
        "timesteps": timesteps,
        "alphas_cumprod": [scheduler.alphas_cumprod[t].item() for t in timesteps],
        "snr": compute_snr(scheduler, torch.tensor(timesteps)).tolist(),
    }
    with open(os.path.join(ROOT, "schedules.json"), "w") as f:
        json.dump(schedules, f, indent=1)

    versions = (
        f"python {sys.version.split()[0]}\ntorch {torch.__version__}\ndiffusers {diffusers.__version__}\n"
        f"torchvision {torchvision.__version__}\nPillow {PIL.__version__}\nnumpy {np.__version__}\n"
    )
    with open(os.path.join(ROOT, "versions.txt"), "w") as f:
        f.write(versions)
    print(versions, end="")


def check(folder):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    saved = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    state = pipe.unet.state_dict()
    assert set(saved) == set(state), sorted(set(saved) ^ set(state))
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe("a red circle", num_inference_steps=2, height=size, width=size, output_type="np").images[0]
    assert np.isfinite(image).all()
    print(f"{folder}: loaded by diffusers {diffusers.__version__}; {len(saved)} UNet tensors identical; "
          f"sampled a {image.shape[1]}x{image.shape[0]} image")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    else:
        main()
