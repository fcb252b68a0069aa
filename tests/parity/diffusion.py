#!/usr/bin/env python3
"""Parity fixtures for sdpipe-diffusion (run by hand; CI reads the committed fixtures only).

    python3 tests/parity/diffusion.py            # from the repository root

Needs torch, diffusers and transformers, and cargo (it writes the tiny pipeline with
`cargo run -p sdpipe-diffusion --example tiny_sd`, so the fixtures are computed on exactly the
weights the Rust tests regenerate from the same seed). Writes tests/fixtures/diffusion/:

- layout.json      the tiny folder loads strictly in diffusers/transformers (no missing,
                   unexpected or mismatched tensors) and how its configs compare with what
                   diffusers' own save_pretrained writes for the loaded pipeline; per-tensor
                   fingerprints (sum, first value) so a drift in the Rust writer is caught by name.
- tokenizer.json   prompts and transformers' CLIPTokenizer ids (padding max_length 77,
                   truncation) with the tiny vocabulary.
- schedulers.json  for PNDM/DDIM/Euler built from the SD1.5 scheduler config: timesteps,
                   init_noise_sigma and the sample after every step of a fixed fake model
                   eps_k(x) = 0.3 * scale_model_input(x) + (1 + 0.01 k) * base.
- sample.safetensors + sample.json  the StableDiffusionPipeline run on the tiny folder with
                   given initial latents: text embeddings, final latents and decoded images
                   (float, [0, 1]) per scheduler.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "diffusion")
SEED = 0

PROMPTS = [
    "there is a photo of a man and a woman standing on a beach at sunset",
    "A Cat sitting on a wooden table, next to a window.",
    "",
    "   spaces   and\ttabs\nand newlines   ",
    "numbers 12345 and 3.14 and 1,000,000",
    "punctuation!!! ?? ... -- (brackets) [square] {curly} 'quotes' \"double\"",
    "it's what they're saying: we'll see, I'd say you've",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "emoji \U0001F600 and CJK \u6f22\u5b57 and arabic \u0645\u0631\u062d\u0628\u0627",
    "combining e\u0301 vs precomposed \u00e9",
    "a <|endoftext|> inside the text <|startoftext|>",
    " ".join(["there is a very long caption"] * 20),
    "UPPER lower MiXeD",
]


def write_tiny(folder):
    env = dict(os.environ)
    subprocess.run(
        ["cargo", "run", "--quiet", "-p", "sdpipe-diffusion", "--example", "tiny_sd", "--",
         folder, str(SEED)],
        cwd=ROOT, env=env, check=True,
    )


def strict_loads(folder):
    report = {}
    for name, cls, sub in [
        ("unet", UNet2DConditionModel, "unet"),
        ("vae", AutoencoderKL, "vae"),
        ("text_encoder", CLIPTextModel, "text_encoder"),
    ]:
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        report[name] = {k: sorted(map(str, v)) for k, v in info.items()}
        bad = {k: v for k, v in report[name].items() if v}
        assert not bad, f"{name} does not load strictly: {bad}"
    return report


def config_diffs(ours_dir, theirs_dir):
    """Keys whose values differ between our configs and diffusers' save_pretrained output."""
    diffs = {}
    for rel in ["model_index.json", "unet/config.json", "vae/config.json",
                "text_encoder/config.json", "scheduler/scheduler_config.json",
                "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]:
        ours_path, theirs_path = os.path.join(ours_dir, rel), os.path.join(theirs_dir, rel)
        if not os.path.exists(theirs_path):
            diffs[rel] = "diffusers does not write this file"
            continue
        ours, theirs = json.load(open(ours_path)), json.load(open(theirs_path))
        d = {}
        for key in sorted(set(ours) | set(theirs)):
            a, b = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
            if a != b:
                d[key] = {"sdpipe": a, "diffusers": b}
        if d:
            diffs[rel] = d
    return diffs


def fingerprints(folder):
    out = {}
    for comp, file in [("unet", "diffusion_pytorch_model.safetensors"),
                       ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")]:
        with safe_open(os.path.join(folder, comp, file), "pt") as f:
            out[comp] = {
                k: [list(f.get_tensor(k).shape), float(f.get_tensor(k).double().sum()),
                    float(f.get_tensor(k).flatten()[0])]
                for k in sorted(f.keys())
            }
    return out


def tokenizer_fixture(folder):
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    ids = [tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True)
           .input_ids for p in PROMPTS]
    return {"prompts": PROMPTS, "ids": ids, "model_max_length": tok.model_max_length}


def fake_run(scheduler, steps, base, x):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    samples = []
    for k, t in enumerate(scheduler.timesteps):
        eps = 0.3 * scheduler.scale_model_input(x, t) + (1 + 0.01 * k) * base
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        samples.append(x.flatten().tolist())
    return {
        "timesteps": [float(t) for t in scheduler.timesteps],
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "samples": samples,
    }


def scheduler_fixture(folder):
    config = PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((1, 4, 2, 2), generator=g)
    base = torch.randn((1, 4, 2, 2), generator=g)
    cases = []
    for name, cls, overrides, steps in [
        ("pndm", PNDMScheduler, {}, 50),
        ("pndm", PNDMScheduler, {}, 7),
        ("ddim", DDIMScheduler, {}, 50),
        ("ddim", DDIMScheduler, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 13),
        ("euler", EulerDiscreteScheduler, {}, 50),
        ("euler", EulerDiscreteScheduler, {"timestep_spacing": "linspace"}, 9),
        ("pndm", PNDMScheduler, {"beta_schedule": "squaredcos_cap_v2",
                                 "prediction_type": "v_prediction"}, 20),
    ]:
        cfg = dict(config)
        cfg.update(overrides)
        scheduler = cls.from_config(cfg)
        run = fake_run(scheduler, steps, base, x0.clone())
        run.update({"scheduler": name, "steps": steps, "config": {
            k: v for k, v in cfg.items() if not k.startswith("_")}})
        cases.append(run)
    return {"initial": x0.flatten().tolist(), "base": base.flatten().tolist(),
            "shape": list(x0.shape), "cases": cases}


def sample_fixture(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["there is a cat on a table", "a red boat on the sea at sunset"]
    height = width = 32
    steps, guidance = 10, 7.5
    g = torch.Generator().manual_seed(2)
    latents = torch.randn((len(prompts), 4, height // 2, width // 2), generator=g)
    tensors = {"init_latents": latents.contiguous()}
    with torch.no_grad():
        ids = pipe.tokenizer(prompts + [""], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        tensors["text_embeddings"] = pipe.text_encoder(ids)[0].contiguous()
    base_config = pipe.scheduler.config
    for name, cls in [("pndm", PNDMScheduler), ("ddim", DDIMScheduler),
                      ("euler", EulerDiscreteScheduler)]:
        pipe.scheduler = cls.from_config(base_config)
        kwargs = dict(height=height, width=width, num_inference_steps=steps,
                      guidance_scale=guidance, latents=latents.clone())
        with torch.no_grad():
            final = pipe(prompts, output_type="latent", **kwargs).images
            image = pipe(prompts, output_type="np", **kwargs).images
        tensors[f"{name}_latents"] = final.contiguous()
        tensors[f"{name}_image"] = torch.from_numpy(np.ascontiguousarray(image))
    # One run without guidance (scale 1: the unconditional branch is skipped).
    pipe.scheduler = PNDMScheduler.from_config(base_config)
    with torch.no_grad():
        tensors["pndm_noguidance_latents"] = pipe(
            prompts, output_type="latent", height=height, width=width,
            num_inference_steps=steps, guidance_scale=1.0, latents=latents.clone(),
        ).images.contiguous()
    meta = {"prompts": prompts, "height": height, "width": width, "steps": steps,
            "guidance_scale": guidance, "negative_prompt": ""}
    return tensors, meta


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tiny")
        write_tiny(folder)
        layout = {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                  "torch": torch.__version__, "seed": SEED, "loading": strict_loads(folder)}
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        resaved = os.path.join(tmp, "resaved")
        pipe.save_pretrained(resaved)
        layout["config_diffs_vs_diffusers_save_pretrained"] = config_diffs(folder, resaved)
        layout["fingerprints"] = fingerprints(folder)
        json.dump(layout, open(os.path.join(OUT, "layout.json"), "w"), indent=1, sort_keys=True)
        json.dump(tokenizer_fixture(folder), open(os.path.join(OUT, "tokenizer.json"), "w"))
        json.dump(scheduler_fixture(folder), open(os.path.join(OUT, "schedulers.json"), "w"))
        tensors, meta = sample_fixture(folder)
        save_file(tensors, os.path.join(OUT, "sample.safetensors"))
        json.dump(meta, open(os.path.join(OUT, "sample.json"), "w"), indent=1)
    print("wrote", OUT)
    print(json.dumps(layout["config_diffs_vs_diffusers_save_pretrained"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
