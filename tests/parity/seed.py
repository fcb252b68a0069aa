#!/usr/bin/env python3
"""Fixtures for the end-to-end test of the committed `pipelines/unsplash.yaml`
(tests/integration/seed.rs).

Run by hand from the repository root (CI reads the committed outputs only):

    python3 tests/parity/seed.py

Needs torch, diffusers, transformers and Pillow (versions used are written to versions.txt).
Writes tests/fixtures/seed/:

  photos/<id>.jpg   the photos the loopback Unsplash server serves, written by Pillow as
                    Unsplash's CDN serves them: baseline and progressive, 4:2:0 and 4:4:4,
                    landscape, portrait and square. Ids contain `-` and `_`.
  captions.json     per photo, what transformers' BlipForConditionalGeneration.generate
                    (num_beams=3, max_length=20, min_length=5) gives on that JPEG as Pillow
                    decodes it, with the slow (PIL) BlipImageProcessor, for the tiny BLIP that
                    tests/parity/blip.py wrote to tests/fixtures/blip/model.
  sd/               a tiny Stable Diffusion 1.5-shaped pipeline written by diffusers'
                    StableDiffusionPipeline.save_pretrained (fp32 safetensors): the same
                    components and block types as stable-diffusion-v1-5 (CrossAttnDownBlock2D
                    down to DownBlock2D, a four-level VAE with 8x downsampling, a CLIP text
                    encoder with quick-GELU, PNDM with SD1.5's scheduler config, a
                    CLIPImageProcessor feature extractor, no safety checker), only narrow.
                    The tokenizer is whatever today's transformers writes for CLIPTokenizer.
  sd-variants/      the same pipeline saved the other ways the hub has it: `fp16/` with
                    variant="fp16" in float16 (`*.fp16.safetensors`), `sharded/` with every
                    weight file split by max_shard_size (`*.safetensors.index.json`), `bin/`
                    with safe_serialization=False (PyTorch pickles), and `slow-tokenizer/` with
                    only vocab.json + merges.txt as older repos ship them. Each variant also has
                    `reference.json`: the UNet's and text encoder's outputs on fixed inputs as
                    diffusers loads that folder, so a loader test compares numbers, not names.
  versions.txt

The checks that need a Python reference on sdpipe's *outputs* (the imagefolder loads with
`datasets.load_dataset("imagefolder")`, the finetuned folder with
`StableDiffusionPipeline.from_pretrained`) are in tests/parity/check_seed_outputs.py.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "fixtures", "seed")
BLIP = os.path.join(HERE, "..", "fixtures", "blip", "model")
GEN = dict(num_beams=3, max_length=20, min_length=5)

# (id, width, height, progressive, subsampling) — subsampling as Pillow names it: 2 = 4:2:0,
# 0 = 4:4:4. Small, but every shape the seed's photos come in.
PHOTOS = [
    ("Xk-2_pLm9aQ", 96, 64, False, 2),
    ("q_7Rt-Yv3wE", 64, 96, True, 2),
    ("Lm0-_Zx8cVb", 72, 72, False, 0),
    ("a-B_c-D_e12", 120, 80, True, 0),
    ("_9Hj-kLmNoP", 80, 64, False, 2),
    ("Pq-rS_tUv-w", 64, 80, True, 2),
]


def photo(index, width, height):
    """A deterministic picture with what real photos have: a sky-like gradient, shapes with hard
    and soft edges, texture and noise (so JPEG's quantisation and upsampling matter)."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top = rng.uniform(40, 220, 3)
    bottom = rng.uniform(20, 200, 3)
    t = (y / max(height - 1, 1))[..., None]
    base = top * (1 - t) + bottom * t
    base += 18 * np.sin(x[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
        x1, y1 = x0 + rng.uniform(8, width * 0.5), y0 + rng.uniform(8, height * 0.5)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_photos():
    folder = os.path.join(ROOT, "photos")
    os.makedirs(folder)
    paths = {}
    for index, (pid, w, h, progressive, subsampling) in enumerate(PHOTOS):
        path = os.path.join(folder, f"{pid}.jpg")
        photo(index, w, h).save(path, "JPEG", quality=80, progressive=progressive,
                                subsampling=subsampling)
        paths[pid] = path
    return paths


def captions(paths):
    from transformers import BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(BLIP).eval()
    tok = BlipProcessor.from_pretrained(BLIP).tokenizer
    proc = BlipImageProcessorPil()
    out = {}
    for pid, path in paths.items():
        pixel_values = proc(images=Image.open(path), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ids = model.generate(pixel_values=pixel_values, **GEN)[0]
        out[pid] = tok.decode(ids, skip_special_tokens=True)
    return out


def byte_symbols():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 bytes are
    mapped to code points from 256 up, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def clip_tokenizer(folder):
    """A CLIPTokenizer with a small byte-level BPE vocabulary (the 512 byte symbols, with and
    without `</w>`, a few merges, and the two special tokens), saved as transformers does."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    words = ["a", "the", "of", "on", "in", "there", "is", "are", "photo", "sky", "sea", "man",
             "tree", "red", "blue", "street", "with", "and"]
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if f"{pair[0]} {pair[1]}" not in merges:
                merges.append(f"{pair[0]} {pair[1]}")
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    scratch = os.path.join(folder, "_src")
    os.makedirs(scratch)
    with open(os.path.join(scratch, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(scratch, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(scratch, "vocab.json"), os.path.join(scratch, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    shutil.rmtree(scratch)
    return tok


def tiny_pipeline():
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(os.path.join(ROOT, "_tok"))
    shutil.rmtree(os.path.join(ROOT, "_tok"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, sample_size=32)
    # SD1.5's scheduler_config.json, field for field.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=feature_extractor, requires_safety_checker=False)


def reference_outputs(folder, variant=None):
    """The UNet's noise prediction and the text encoder's last hidden state on fixed inputs, as
    diffusers loads `folder` (in float32 whatever the files hold, as sdpipe loads on CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, variant=variant, safety_checker=None, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    ids = pipe.tokenizer(["a red photo of the sea"], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    latents = torch.randn((1, 4, 4, 4), generator=gen)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        eps = pipe.unet(latents, 500, encoder_hidden_states=hidden).sample
    return {"prompt": "a red photo of the sea", "input_ids": ids[0].tolist(),
            "latents": latents.flatten().tolist(), "timestep": 500,
            "hidden_sum": float(hidden.double().sum()), "hidden_abs_sum": float(hidden.double().abs().sum()),
            "eps": eps.flatten().tolist()}


def main():
    import diffusers
    import PIL
    import transformers

    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    paths = write_photos()
    with open(os.path.join(ROOT, "captions.json"), "w") as f:
        json.dump({"generate": GEN, "captions": captions(paths)}, f, indent=1)
        f.write("\n")

    pipe = tiny_pipeline()
    sd = os.path.join(ROOT, "sd")
    pipe.save_pretrained(sd, safe_serialization=True)
    variants = os.path.join(ROOT, "sd-variants")
    pipe.to(torch.float16).save_pretrained(os.path.join(variants, "fp16"), variant="fp16")
    pipe.to(torch.float32)
    pipe.save_pretrained(os.path.join(variants, "sharded"), max_shard_size="40KB")
    pipe.save_pretrained(os.path.join(variants, "bin"), safe_serialization=False)
    slow = os.path.join(variants, "slow-tokenizer")
    pipe.save_pretrained(slow)
    # Older repos (SD1.5 itself) ship the slow tokenizer files only.
    tok_dir = os.path.join(slow, "tokenizer")
    with open(os.path.join(tok_dir, "tokenizer.json")) as f:
        bpe = json.load(f)["model"]
    for name in os.listdir(tok_dir):
        os.remove(os.path.join(tok_dir, name))
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(bpe["vocab"], f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        lines = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        f.write("#version: 0.2\n" + "\n".join(lines) + "\n")
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>",
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    for name, variant in [("sd", None), ("fp16", "fp16"), ("sharded", None), ("bin", None),
                          ("slow-tokenizer", None)]:
        folder = sd if name == "sd" else os.path.join(variants, name)
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(reference_outputs(folder, variant), f)
            f.write("\n")

    with open(os.path.join(ROOT, "versions.txt"), "w") as f:
        f.write(f"python {sys.version.split()[0]}\ntorch {torch.__version__}\n"
                f"diffusers {diffusers.__version__}\ntransformers {transformers.__version__}\n"
                f"Pillow {PIL.__version__}\nnumpy {np.__version__}\n")
    for pid, text in json.load(open(os.path.join(ROOT, "captions.json")))["captions"].items():
        print(f"{pid:12} {text!r}")
    for dirpath, _, files in sorted(os.walk(ROOT)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            print(f"{os.path.getsize(path):>8}  {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
