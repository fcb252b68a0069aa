#!/usr/bin/env python3
"""Parity fixtures for sdpipe-unet (run by hand; CI only reads what this writes).

Builds two tiny, seeded, randomly initialised diffusers `UNet2DConditionModel`s, saves each with
`save_pretrained` (safetensors, diffusers layout) and, for fixed inputs, the reference forward
output, the MSE loss against a fixed target and the gradient of that loss with respect to some
named weights. Everything lands in tests/fixtures/unet/:

  tiny/       the SD1.x-shaped tiny model (block_out_channels (32, 64), conv projections).
              Weights are saved in float16 (`save_pretrained` of the half model) to keep the
              committed fixture small; the reference is computed in float32 from exactly those
              (exactly representable) values, so nothing is lost.
  tiny/io.safetensors
  linear/     an even smaller variant covering the other config branches: linear projections,
              per-block head counts, three blocks with two layers each, upcast_attention,
              flip_sin_to_cos false, freq_shift 1, a non-square latent; also float16 on disk.
              Its io.safetensors holds the gradient of every parameter except the bulky 3x3
              convolution kernels (a few of those are kept).
  linear/io.safetensors

io.safetensors holds: sample, timesteps (float32, integral values), encoder_hidden_states,
target, t_emb (time_proj output), emb (time_embedding output), out (UNet prediction),
loss (scalar as shape [1]) and grad.<param name> for the chosen parameters.

Usage: python3 tests/parity/unet.py   (from the repository root)
Versions used for the committed fixtures are printed and stored in versions.txt.
"""

import os
import re
import sys

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "unet")

TINY_GRADS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "down_blocks.0.resnets.0.norm1.weight",
    "down_blocks.0.attentions.0.norm.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.bias",
    "down_blocks.0.downsamplers.0.conv.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
    "mid_block.resnets.1.time_emb_proj.weight",
    "up_blocks.0.resnets.1.conv_shortcut.weight",
    "up_blocks.0.upsamplers.0.conv.weight",
    "up_blocks.1.attentions.1.proj_out.bias",
    "up_blocks.1.resnets.1.conv2.weight",
    "conv_norm_out.bias",
    "conv_out.weight",
]


def build(config, seed):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config)
    # Default init leaves some layers at zero-free random values already; perturb norms too so
    # their gradients are not trivially structured (weight 1 / bias 0 everywhere).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def reference(model, sample, timesteps, ctx, target, grad_names):
    model.zero_grad()
    out = model(sample, timesteps, encoder_hidden_states=ctx).sample
    loss = F.mse_loss(out.float(), target.float(), reduction="mean")
    loss.backward()
    params = dict(model.named_parameters())
    with torch.no_grad():
        t_emb = model.time_proj(timesteps)
        emb = model.time_embedding(t_emb)
    tensors = {
        "sample": sample,
        "timesteps": timesteps.float(),
        "encoder_hidden_states": ctx,
        "target": target,
        "t_emb": t_emb,
        "emb": emb,
        "out": out.detach(),
        "loss": loss.detach().reshape(1),
    }
    for name in grad_names:
        tensors["grad." + name] = params[name].grad.detach().clone()
    return {k: v.contiguous() for k, v in tensors.items()}


def tiny():
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    model = build(config, seed=0)
    out_dir = os.path.join(ROOT, "tiny")
    # Round to float16 once, save that, and compute the reference in float32 from the rounded
    # values: the Rust side loads the same numbers and upcasts them to float32.
    model = model.half().float()
    model.half().save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True)
    model = model.float()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([3, 999], dtype=torch.int64)
    ctx = torch.randn(2, 77, 32, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    tensors = reference(model, sample, timesteps, ctx, target, TINY_GRADS)
    save_file(tensors, os.path.join(out_dir, "io.safetensors"))
    return tensors


def linear():
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=[2, 4, 4],
        norm_num_groups=4,
        norm_eps=1e-6,
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    model = build(config, seed=2)
    out_dir = os.path.join(ROOT, "linear")
    model = model.half().float()
    model.half().save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True)
    model = model.float()
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 12, generator=g)
    timesteps = torch.tensor([421], dtype=torch.int64)
    ctx = torch.randn(1, 5, 12, generator=g)
    target = torch.randn(1, 4, 8, 12, generator=g)
    # Every parameter's gradient but most 3x3 kernels (they are most of the bytes).
    bulky = re.compile(r"(resnets\.\d+\.conv[12]|conv_shortcut|samplers\.0\.conv)\.weight$")
    names = [n for n, _ in model.named_parameters() if not bulky.search(n)]
    names += [
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.1.downsamplers.0.conv.weight",
        "up_blocks.1.resnets.0.conv_shortcut.weight",
        "up_blocks.2.resnets.2.conv2.weight",
    ]
    tensors = reference(model, sample, timesteps, ctx, target, names)
    save_file(tensors, os.path.join(out_dir, "io.safetensors"))
    return tensors


def main():
    torch.set_num_threads(1)
    versions = f"torch {torch.__version__}\ndiffusers {diffusers.__version__}\npython {sys.version.split()[0]}\n"
    print(versions, end="")
    for name, fn in (("tiny", tiny), ("linear", linear)):
        tensors = fn()
        print(f"{name}: out[0,0,0,:4] = {tensors['out'][0, 0, 0, :4].tolist()}, "
              f"loss = {tensors['loss'].item():.6f}")
    with open(os.path.join(ROOT, "versions.txt"), "w") as f:
        f.write(versions)


if __name__ == "__main__":
    main()
