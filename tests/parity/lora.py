#!/usr/bin/env python3
"""Parity fixtures for sdpipe-unet's LoRA (run by hand; CI only reads what this writes).

LoRA as diffusers' examples/text_to_image/train_text_to_image_lora.py sets it up with peft
(`LoraConfig(r, lora_alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v",
"to_out.0"])`, `unet.add_adapter`), on the tiny UNet of tests/fixtures/unet/tiny/unet (written by
tests/parity/unet.py), with rank 4 and alpha 8 so that the scale alpha/r = 2 is exercised. The
adapters' A and B are both set to random non-zero values (rounded to float16-representable
numbers, stored as float32 as diffusers saves them): with B = 0, as peft initialises it, A would
get no gradient and the LoRA would change no output. Everything lands in tests/fixtures/lora/:

  pytorch_lora_weights.safetensors
      written by `StableDiffusionPipeline.save_lora_weights(dir,
      unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
      unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": [...]})`.
      Without that metadata diffusers' loader assumes alpha = r (the script trains with
      alpha = r and passes none); with it the loaded scale is 2.
  io.safetensors
      sample, timesteps (float32, integral values), encoder_hidden_states, target;
      out.1.0, out.0.5: the output of a fresh pipeline's UNet after
        `pipe.load_lora_weights(dir)`, at `cross_attention_kwargs={"scale": s}` (checked here
        against `UNet2DConditionModel.load_lora_adapter` and `pipe.fuse_lora(lora_scale=s)`);
      loss: the MSE of the training model (peft adapters as trained, unmerged) against target,
        as shape [1];
      grad.<key>: the gradient of that loss for every adapter matrix, under the key the file
        stores the matrix with (unet.<module>.lora.down.weight / .lora.up.weight).
  steps.safetensors
      two complete optimiser steps of train_text_to_image_lora.py's loop on the training model
      above (adapters set from pytorch_lora_weights.safetensors, base frozen, `unet.train()`),
      each on its own fixed batch of two: DDPMScheduler (SD's scaled_linear, 0.00085..0.012,
      1000 steps) `add_noise`, the UNet's prediction, `F.mse_loss(pred.float(), noise.float())`
      (epsilon, no SNR weighting, no accumulation), backward, `clip_grad_norm_` over the adapter
      parameters at max_grad_norm 1.0, `torch.optim.AdamW(adapters, lr=1e-4, betas=(0.9, 0.999),
      weight_decay=1e-2, eps=1e-8)`, no EMA (the script has none). Step 1's context is drawn with
      std 8 so that its gradient norm (2.17) exceeds 1.0 and clipping acts; step 2's, std 1, does
      not (0.188), so the clip coefficients differ and clipping changes step 2's update.
        x0_<s>, noise_<s>, context_<s>   the batch of step s (1, 2): latents, ε, text states
        t_<s>                            its timesteps, int64
        loss_<s>, grad_norm_<s>          [1] each: the loss and clip_grad_norm_'s total norm
        grad_<s>.<key>                   every adapter gradient of step s, before clipping
        after_<s>.<key>                  every adapter matrix after step s's update
      (keys as in the LoRA file). The script as written clips nothing: its `lora_layers` is a
      `filter` iterator that `optimizer_cls(lora_layers, ...)` exhausts, so the later
      `accelerator.clip_grad_norm_(lora_layers, ...)` gets no parameters and returns 0 (checked
      here with accelerate). These fixtures clip, as the script evidently means to, as
      train_text_to_image.py does with its parameters, and as sdpipe does; the difference it
      makes to step 2 is printed.
  versions.txt

The other direction, a LoRA file sdpipe wrote loaded by diffusers:

  SDPIPE_LORA_EXPORT=/tmp/lora cargo test -p sdpipe-unet --test lora -- --ignored export
  python3 tests/parity/lora.py --check /tmp/lora

loads /tmp/lora/pytorch_lora_weights.safetensors into the tiny UNet with
`pipe.load_lora_weights` and with `UNet2DConditionModel.load_lora_adapter`, and compares the
outputs with sdpipe's, stored beside it in io.safetensors (out.1.0 and out.0.5 from sdpipe's
merged inference UNet, out.train from its unmerged training UNet at scale 1). It exits non-zero
when any differs by more than 1e-4.

Usage: python3 tests/parity/lora.py [--check DIR]   (from the repository root)
Needs, beyond the other parity scripts' packages, `pip install peft accelerate` (diffusers' LoRA
support and the script's clipping check use them).
Versions used for the committed fixtures are printed and stored in versions.txt.
"""

import os
import sys

import diffusers
import peft
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
ROOT = os.path.join(FIXTURES, "lora")
BASE = os.path.join(FIXTURES, "unet", "tiny", "unet")
WEIGHTS = "pytorch_lora_weights.safetensors"

RANK = 4
ALPHA = 8
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
SCALES = (1.0, 0.5)
TOLERANCE = 1e-4

# train_text_to_image_lora.py's defaults for the optimiser step (--learning_rate, --adam_beta1/2,
# --adam_weight_decay, --adam_epsilon, --max_grad_norm).
LR = 1e-4
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-2
EPS = 1e-8
MAX_GRAD_NORM = 1.0


def base_unet():
    # float16 on disk (tests/parity/unet.py); computed in float32, as sdpipe does.
    return UNet2DConditionModel.from_pretrained(BASE).float()


def pipeline():
    """A pipeline holding only the UNet: `load_lora_weights` needs no other component."""
    return StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=base_unet(), scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def file_key(peft_name):
    """The key save_lora_weights stores a peft parameter under."""
    name = peft_name.replace(".lora_A.default.weight", ".lora.down.weight")
    return "unet." + name.replace(".lora_B.default.weight", ".lora.up.weight")


def outputs(unet, io, scale):
    with torch.no_grad():
        return unet(io["sample"], io["timesteps"], io["encoder_hidden_states"],
                    cross_attention_kwargs={"scale": scale}).sample


def loaded_by_diffusers(directory, io):
    """{(how, scale): output} for the LoRA in `directory`, loaded the ways diffusers offers, and
    the UNet `load_lora_weights` gave.

    `load_lora_adapter` reads the file's metadata only when told the file is safetensors
    (`use_safetensors=True` or `weight_name`); given the file's path alone it silently drops
    it and takes alpha = r.
    """
    results = {}
    loaded = pipeline()
    loaded.load_lora_weights(directory)
    for s in SCALES:
        results[("pipe.load_lora_weights", s)] = outputs(loaded.unet, io, s)
    unet = base_unet()
    unet.load_lora_adapter(directory, prefix="unet", use_safetensors=True)
    for s in SCALES:
        results[("UNet.load_lora_adapter", s)] = outputs(unet, io, s)
    for s in SCALES:
        pipe = pipeline()
        pipe.load_lora_weights(directory)
        pipe.fuse_lora(lora_scale=s)
        results[("pipe.fuse_lora", s)] = outputs(pipe.unet, io, 1.0)
    return results, loaded.unet


def peft_name(key):
    """The peft parameter a LoRA file key names (the inverse of `file_key`)."""
    name = key[len("unet."):].replace(".lora.down.weight", ".lora_A.default.weight")
    return name.replace(".lora.up.weight", ".lora_B.default.weight")


def training_model(lora_file):
    """The script's training UNet: base frozen, peft adapters added, then set from `lora_file`."""
    unet = base_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    params = dict(unet.named_parameters())
    saved = load_file(lora_file)
    with torch.no_grad():
        for key, value in saved.items():
            params[peft_name(key)].copy_(value)
    assert {peft_name(k) for k in saved} == {n for n, p in params.items() if p.requires_grad}
    return unet


def training_steps(lora_file, batches, clip=True):
    """The script's loop body for each batch in turn; returns (steps, base state before, after).

    Every step: {"loss", "grad_norm", "grad.<key>" (before clipping), "after.<key>"}.
    """
    unet = training_model(lora_file)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", num_train_timesteps=1000)
    lora = {file_key(n): p for n, p in unet.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(list(lora.values()), lr=LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY, eps=EPS)
    unet.train()
    steps = []
    for batch in batches:
        noisy_latents = noise_scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])
        model_pred = unet(noisy_latents, batch["t"], batch["context"], return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), batch["noise"].float(), reduction="mean")
        loss.backward()
        step = {"loss": loss.detach().reshape(1)}
        step.update({f"grad.{k}": p.grad.detach().clone() for k, p in lora.items()})
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(list(lora.values()), MAX_GRAD_NORM)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in lora.values()]))
        step["grad_norm"] = norm.detach().reshape(1)
        optimizer.step()
        optimizer.zero_grad()
        step.update({f"after.{k}": p.detach().clone() for k, p in lora.items()})
        steps.append(step)
    base_after = {n: p.detach() for n, p in unet.named_parameters() if not p.requires_grad}
    for n, value in base_before.items():
        assert torch.equal(value, base_after[n]), f"the frozen {n} changed"
    return steps, len(base_before)


def script_clips_nothing():
    """train_text_to_image_lora.py's clipping, as written: `lora_layers = filter(...)`, consumed
    by the optimiser, then handed to `accelerator.clip_grad_norm_`. Returns what that returns."""
    from accelerate import Accelerator

    w = torch.nn.Parameter(torch.ones(3))
    lora_layers = filter(lambda p: p.requires_grad, [w])
    torch.optim.AdamW(lora_layers, lr=LR)
    (w * 10).sum().backward()
    norm = Accelerator(cpu=True).clip_grad_norm_(lora_layers, MAX_GRAD_NORM)
    assert torch.equal(w.grad, torch.full((3,), 10.0)), "the gradient is left unclipped"
    return norm.item()


def write_steps():
    """steps.safetensors (see the module docs)."""
    g = torch.Generator().manual_seed(12)
    out = {}
    batches = []
    for s, (timesteps, context_std) in enumerate((([10, 700], 8.0), ([999, 250], 1.0)), 1):
        batch = {
            "x0": torch.randn(2, 4, 8, 8, generator=g),
            "noise": torch.randn(2, 4, 8, 8, generator=g),
            "context": torch.randn(2, 5, 32, generator=g) * context_std,
            "t": torch.tensor(timesteps, dtype=torch.int64),
        }
        batches.append(batch)
        out.update({f"{k}_{s}": v for k, v in batch.items()})
    lora_file = os.path.join(ROOT, WEIGHTS)
    steps, frozen = training_steps(lora_file, batches)
    for s, step in enumerate(steps, 1):
        for name, value in step.items():
            head, _, key = name.partition(".")
            out[f"{head}_{s}.{key}" if key else f"{name}_{s}"] = value
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "steps.safetensors"))

    again, _ = training_steps(lora_file, batches)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(steps, again) for k in a), "deterministic"
    unclipped, _ = training_steps(lora_file, batches, clip=False)
    diff = max((steps[1][k] - unclipped[1][k]).abs().max().item()
               for k in steps[1] if k.startswith("after."))
    moved = max((steps[1][k] - load_file(lora_file)[k[len("after."):]]).abs().max().item()
                for k in steps[1] if k.startswith("after."))
    grads = torch.cat([v.flatten() for s in steps for k, v in s.items() if k.startswith("grad.")])
    for s, step in enumerate(steps, 1):
        print(f"step {s}: loss {step['loss'].item():.6f}, grad norm {step['grad_norm'].item():.6f}")
    print(f"{frozen} frozen base tensors unchanged; the adapters moved by up to {moved:.3e}; "
          f"smallest |gradient| {grads.abs().min().item():.3e}")
    print(f"the script as written clips nothing (accelerate's clip_grad_norm_ of the exhausted "
          f"filter returns {script_clips_nothing()}); unclipped, step 2 would end up to "
          f"{diff:.3e} away")


def write():
    torch.set_num_threads(1)
    os.makedirs(ROOT, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    io = {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([10.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
        "target": torch.randn(2, 4, 8, 8, generator=g),
    }

    # The training model, as the script builds it, with both adapter matrices set non-zero.
    unet = base_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    lora = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in lora.items():
            std = 1.0 / RANK if "lora_A" in name else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * std).half().float())
    pred = unet(io["sample"], io["timesteps"], io["encoder_hidden_states"]).sample
    loss = F.mse_loss(pred.float(), io["target"].float(), reduction="mean")
    loss.backward()
    StableDiffusionPipeline.save_lora_weights(
        ROOT,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
        unet_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS},
    )
    saved = load_file(os.path.join(ROOT, WEIGHTS))
    grads = {file_key(n): p.grad.detach().clone() for n, p in lora.items()}
    assert set(grads) == set(saved), "the gradients' keys are the file's"
    for key, value in saved.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, lora[key[len("unet."):].replace(".lora.down.", ".lora_A.default.")
                                       .replace(".lora.up.", ".lora_B.default.")])

    results, _ = loaded_by_diffusers(ROOT, io)
    for s in SCALES:
        reference = results[("pipe.load_lora_weights", s)]
        for (how, scale), out in results.items():
            if scale == s:
                diff = (out - reference).abs().max().item()
                assert diff < 1e-5, f"{how} at scale {s} differs from load_lora_weights by {diff}"
        io[f"out.{s}"] = reference
    diff = (pred.detach() - io["out.1.0"]).abs().max().item()
    assert diff < 1e-5, f"the training model and the loaded LoRA differ by {diff}"
    with torch.no_grad():
        unet = base_unet()
        effect = (unet(io["sample"], io["timesteps"], io["encoder_hidden_states"]).sample
                  - io["out.1.0"]).abs().max().item()
    io["loss"] = loss.detach().reshape(1)
    io.update({"grad." + k: v for k, v in grads.items()})
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(ROOT, "io.safetensors"))

    write_steps()

    import accelerate

    versions = (f"torch {torch.__version__}\ndiffusers {diffusers.__version__}\n"
                f"peft {peft.__version__}\naccelerate {accelerate.__version__}\n"
                f"python {sys.version.split()[0]}\n")
    print(versions, end="")
    with open(os.path.join(ROOT, "versions.txt"), "w") as f:
        f.write(versions)
    with safe_open(os.path.join(ROOT, WEIGHTS), "pt") as f:
        print(f"{len(saved)} tensors, metadata {f.metadata()}")
    print(f"max |LoRA output - base output| = {effect:.4f}; loss = {loss.item():.6f}")


def check(directory):
    io = load_file(os.path.join(directory, "io.safetensors"))
    with safe_open(os.path.join(directory, WEIGHTS), "pt") as f:
        print(f"{directory}/{WEIGHTS}: {len(list(f.keys()))} tensors, metadata {f.metadata()}")
    results, unet = loaded_by_diffusers(directory, io)
    layer = next(m for m in unet.modules() if hasattr(m, "scaling") and m.scaling)
    print(f"diffusers built: {unet.peft_config}")
    print(f"a loaded layer's scaling (alpha/r): {layer.scaling}")
    worst = 0.0
    for (how, s), out in sorted(results.items()):
        diff = (out - io[f"out.{s}"]).abs().max().item()
        worst = max(worst, diff)
        print(f"{how} at scale {s}: max |diffusers - sdpipe merged| = {diff:.3e}")
    diff = (results[("pipe.load_lora_weights", 1.0)] - io["out.train"]).abs().max().item()
    worst = max(worst, diff)
    print(f"pipe.load_lora_weights at scale 1.0: max |diffusers - sdpipe training UNet| = {diff:.3e}")
    base = outputs(base_unet(), io, 1.0)
    print(f"(the LoRA moves the output by up to {(base - io['out.1.0']).abs().max().item():.3e})")
    print("PASS" if worst <= TOLERANCE else f"FAIL: {worst:.3e} > {TOLERANCE:.0e}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(check(sys.argv[2]))
    elif len(sys.argv) == 1:
        write()
    else:
        sys.exit(__doc__)
