#!/usr/bin/env python3
"""Reference fixtures for sdpipe's CLIP metric kinds `clip-score` and `cmmd` (crate sdpipe-metrics).

Run by hand (CI has no Python):  python3 tests/parity/clip.py     (from anywhere)
Needs torch, transformers (tested with 5.25), Pillow, numpy; torchvision only for the
informational comparison with transformers 5's torchvision image-processor backend.
torchmetrics and the CMMD code are *not* needed: their formulas are reproduced below with
transformers directly, each citing the source it follows.

Writes tests/fixtures/clip/:
  model/        a tiny CLIPModel with random weights in the layout of openai/clip-vit-*:
                config.json (CLIPConfig: text_config, vision_config, projection_dim),
                model.safetensors (save_pretrained; text and vision towers, visual_projection,
                text_projection, logit_scale), tokenizer.json + tokenizer_config.json (a
                CLIPTokenizer over a small byte-level BPE vocabulary built here), and
                preprocessor_config.json (CLIPImageProcessor: shortest edge 32, centre crop 32,
                bicubic, 1/255, OpenAI CLIP mean/std).
  images/       fixed test images of different sizes and modes (PNG), the "samples".
  other/        a second small set (PNG), for CMMD between two sets.
  clip_pixels/  each image after the CLIP-score preprocessing's Pillow steps (shortest-edge
                bicubic resize, centre crop), uint8 PNG: the exact intermediate that is then
                rescaled and normalised.
  cmmd_pixels/  each image (both sets) after the CMMD reader's Pillow steps (square centre crop,
                bicubic resize to the crop size), uint8 PNG.
  reference.json
                per image: the caption, token ids (after truncation), image and text embeddings
                (projected, before and after L2 normalisation), the CLIP score; the mean as
                torchmetrics reports it; pixel_values statistics; the torchvision backend's
                difference from the PIL one; CMMD image embeddings of both sets and the CMMD
                values (set vs other, set vs itself) in float64 and as the reference computes
                them in float32; the text pooling rule with the legacy `eos_token_id == 2`.

What is reproduced, and from where:
- CLIP score: torchmetrics `src/torchmetrics/functional/multimodal/clip_score.py`
  (`_get_features`, `_clip_score_update`, `clip_score`): CLIPProcessor on the images (uint8
  [C, H, W] tensors) and on the captions with `padding=True`; input_ids and attention_mask cut
  to `text_config.max_position_embeddings`; `get_image_features` / `get_text_features`
  (projected pooled outputs); each divided by its L2 norm; score = 100 * sum(img * txt); the
  metric is max(mean(score), 0). The image processor is the PIL one (`CLIPImageProcessorPil`,
  what `CLIPImageProcessor` was before transformers 5); transformers 5's default torchvision
  backend differs by up to a level or two after resizing (recorded below).
- CMMD: google-research/google-research `cmmd/` (io_util.py, embedding.py, distance.py) and its
  transformers port (sayakpaul/cmmd-pytorch, embedding.py): each image read with PIL,
  centre-cropped to a square of its shorter side at ((h - l) // 2, (w - l) // 2), resized to
  the model's input size with PIL bicubic, float32 / 255, resized again with bicubic to the same
  size (the identity), normalised with the CLIP mean/std (no rescale, resize or crop in the
  processor), `CLIPVisionModelWithProjection(...).image_embeds` divided by its L2 norm.
  MMD (distance.py): Gaussian RBF kernel with sigma = 10, the *biased* (V-statistic) estimator
  over all pairs including i == j, scaled by 1000:
  1000 * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)),  k = exp(-|a - b|^2 / (2 sigma^2)),
  with |a - b|^2 = |a|^2 + |b|^2 - 2 a.b as the reference expands it.
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "clip")
MODEL = os.path.join(ROOT, "model")
SIZE = 32  # shortest edge and crop: the model's input size (openai: 224, or 336)
MAX_POSITIONS = 24  # the text model's positions (openai: 77): small, so truncation is tested
SIGMA = 10.0
SCALE = 1000.0
# Seed of the random weights: chosen so that the mean score is positive while some per-image
# scores are negative (the clamp is then tested both ways).
WEIGHT_SEED = 6

CAPTIONS = {
    "wide": "there is a red photo of the sea",
    "tall": "A Man standing on the Street, with a blue sky!",
    "small": "a tree",
    "gray": "there are two boats on the sea and a man on a boat with a tree in the city at night "
            "and the sky is dark and there is a red car on the street",
    "square": "the blue sky",
}

WORDS = ["a", "the", "of", "on", "in", "there", "is", "are", "photo", "sky", "sea", "man",
         "tree", "red", "blue", "street", "with", "and", "boat", "two", "city", "night", "dark",
         "car", "standing", "at"]


def byte_symbols():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 bytes are
    mapped to code points from 256 up, in byte order (as CLIP's tokenizer builds it)."""
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
    """A CLIPTokenizer over a small byte-level BPE vocabulary (the 512 byte symbols with and
    without `</w>`, merges for a few words, the two special tokens), as transformers saves it."""
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            rule = f"{parts[0]} {parts[1]}"
            if rule not in merges:
                merges.append(rule)
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    scratch = os.path.join(folder, "_tokenizer_src")
    os.makedirs(scratch)
    with open(os.path.join(scratch, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(scratch, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(scratch, "vocab.json"), os.path.join(scratch, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    shutil.rmtree(scratch)
    return tok


def init_weights(model, gen):
    """Weights with std 1/sqrt(fan_in), biases 0.1, embeddings std 1, LayerNorms at identity:
    transformers' init (std 0.02) would make every embedding nearly the same direction, and
    the scores would test float noise rather than the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name == "logit_scale":
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # class embedding
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, p in model.named_parameters():
            if "embedding.weight" in name and "patch" not in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def smooth(w, h, seed):
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = r.uniform(0.5, 4, 3)
        img[..., c] = 127 + 100 * np.sin(fx * x / w * 6.28 + ph) * np.cos(fy * y / h * 6.28)
    return img


def make_images():
    rng = np.random.default_rng(11)
    images = {}
    # Wider than tall, downscaled (antialiased bicubic), with hard edges.
    a = Image.fromarray(np.clip(smooth(80, 50, 1), 0, 255).astype(np.uint8))
    ImageDraw.Draw(a).ellipse((10, 5, 40, 35), fill=(250, 30, 30))
    images["wide"] = a
    # Taller than wide, odd sizes: the crop offsets round down.
    b = smooth(45, 71, 2) + rng.normal(0, 20, (71, 45, 3))
    images["tall"] = Image.fromarray(np.clip(b, 0, 255).astype(np.uint8))
    # Smaller than the input size: upscaled, with overshoot and clipping.
    c = smooth(21, 17, 3) + rng.normal(0, 30, (17, 21, 3))
    images["small"] = Image.fromarray(np.clip(c, 0, 255).astype(np.uint8))
    # Grayscale ("L"): replicated to RGB.
    g = np.clip(smooth(40, 40, 4)[..., 0], 0, 255).astype(np.uint8)
    images["gray"] = Image.fromarray(g, mode="L")
    # Exactly the input size: no resize at all.
    s = Image.fromarray(np.clip(smooth(SIZE, SIZE, 5), 0, 255).astype(np.uint8))
    ImageDraw.Draw(s).rectangle((4, 8, 20, 28), fill=(20, 20, 220))
    images["square"] = s

    other = {}
    for i, (w, h) in enumerate([(48, 48), (60, 36), (33, 40)]):
        o = smooth(w, h, 20 + i) * 0.6 + 40 + rng.normal(0, 10, (h, w, 3))
        other[f"o{i}"] = Image.fromarray(np.clip(o, 0, 255).astype(np.uint8))
    return images, other


def save_set(images, folder):
    os.makedirs(folder)
    paths = {}
    for name, img in images.items():
        path = os.path.join(folder, f"{name}.png")
        img.save(path, optimize=True)
        paths[name] = path
    return paths


def cmmd_read(path, size):
    """cmmd/io_util.py `_read_image` + `_center_crop_and_resize`, with the grayscale tiling of
    `_get_img_generator_fn`; returns the uint8 image and the float32 / 255 array."""
    im = Image.open(path)
    im.load()
    w, h = im.size
    side = min(w, h)
    top = (h - side) // 2
    left = (w - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    x = np.asarray(im).astype(np.float32)
    if x.ndim == 2:
        x = np.tile(x[..., np.newaxis], (1, 1, 3))
    return x.astype(np.uint8), x / 255.0


def mmd(x, y, dtype):
    """cmmd/distance.py, in numpy at `dtype` (the reference runs in JAX's default float32)."""
    x = np.asarray(x, dtype)
    y = np.asarray(y, dtype)
    x_sq = np.diag(x @ x.T)
    y_sq = np.diag(y @ y.T)
    gamma = dtype(1 / (2 * SIGMA ** 2))
    k_xx = np.mean(np.exp(-gamma * (-2 * (x @ x.T) + x_sq[:, None] + x_sq[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * (x @ y.T) + x_sq[:, None] + y_sq[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * (y @ y.T) + y_sq[:, None] + y_sq[None, :])))
    return float(dtype(SCALE) * (k_xx + k_yy - 2 * k_xy))


def main():
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(MODEL)
    torch.manual_seed(0)

    tok = clip_tokenizer(ROOT)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_POSITIONS,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, projection_dim=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=SIZE, patch_size=4, projection_dim=16,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    init_weights(model, torch.Generator().manual_seed(WEIGHT_SEED))
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                      crop_size={"height": SIZE, "width": SIZE})
    model.save_pretrained(MODEL, safe_serialization=True)
    processor.save_pretrained(MODEL)
    tok.save_pretrained(MODEL)
    for extra in ["vocab.json", "merges.txt", "special_tokens_map.json"]:
        path = os.path.join(MODEL, extra)
        if os.path.exists(path):  # keep the fast-tokenizer layout current transformers writes
            os.remove(path)
    # Reload everything from disk: what Rust loads is what is tested.
    model = CLIPModel.from_pretrained(MODEL).eval()
    processor = CLIPImageProcessorPil.from_pretrained(MODEL)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL)

    images, other = make_images()
    paths = save_set(images, os.path.join(ROOT, "images"))
    other_paths = save_set(other, os.path.join(ROOT, "other"))
    names = list(paths)

    refs = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
            "size": SIZE, "max_positions": MAX_POSITIONS, "sigma": SIGMA, "scale": SCALE,
            "images": {}, "cmmd": {}}

    # ------------------------------------------------------------------ CLIP score
    os.makedirs(os.path.join(ROOT, "clip_pixels"))
    tensors = [torch.from_numpy(np.asarray(Image.open(paths[n]).convert("RGB"))).permute(2, 0, 1)
               for n in names]
    # torchmetrics passes uint8 [C, H, W] tensors; the PIL backend converts them back to arrays.
    pv = processor(images=[t for t in tensors], return_tensors="pt")["pixel_values"]
    try:
        from transformers import CLIPImageProcessor
        tv = CLIPImageProcessor.from_pretrained(MODEL)(images=tensors, return_tensors="pt")[
            "pixel_values"]
        std_levels = torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255
        tv_levels = ((tv - pv).abs() * std_levels).amax(dim=(1, 2, 3)).tolist()
    except Exception as e:  # torchvision missing
        tv_levels = [None] * len(names)
        print("torchvision backend not compared:", e)
    mean = np.array(processor.image_mean, np.float32)
    std = np.array(processor.image_std, np.float32)
    for i, n in enumerate(names):
        # The PIL steps by hand, checked against the processor before they are relied on.
        im = Image.open(paths[n]).convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(SIZE * long / short)
        im = im.resize((SIZE, new_long) if w <= h else (new_long, SIZE), Image.BICUBIC)
        w, h = im.size
        top, left = (h - SIZE) // 2, (w - SIZE) // 2
        im = im.crop((left, top, left + SIZE, top + SIZE))
        im.save(os.path.join(ROOT, "clip_pixels", f"{n}.png"))
        arr = (np.asarray(im).astype(np.float64) * (1 / 255)).astype(np.float32)
        mine = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())
        assert (mine - pv[i]).abs().max() == 0, (n, (mine - pv[i]).abs().max())

    enc = tok(text=[CAPTIONS[n] for n in names], return_tensors="pt", padding=True)
    untruncated = [len(tok(CAPTIONS[n])["input_ids"]) for n in names]
    if enc["attention_mask"].shape[-1] > MAX_POSITIONS:
        enc["attention_mask"] = enc["attention_mask"][..., :MAX_POSITIONS]
        enc["input_ids"] = enc["input_ids"][..., :MAX_POSITIONS]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pv).pooler_output
        txt = model.get_text_features(input_ids=enc["input_ids"],
                                      attention_mask=enc["attention_mask"]).pooler_output
        # The legacy pooling rule (eos_token_id == 2 in the config, as the openai checkpoints
        # have it): the position of the largest token id.
        model.text_model.eos_token_id = 2
        txt_legacy = model.get_text_features(input_ids=enc["input_ids"],
                                             attention_mask=enc["attention_mask"]).pooler_output
        model.text_model.eos_token_id = config.text_config.eos_token_id
    img_n = img / img.norm(p=2, dim=-1, keepdim=True)
    txt_n = txt / txt.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (img_n * txt_n).sum(axis=-1)
    txt_legacy_n = txt_legacy / txt_legacy.norm(p=2, dim=-1, keepdim=True)
    score_legacy = 100 * (img_n * txt_legacy_n).sum(axis=-1)
    for i, n in enumerate(names):
        ids = [int(t) for t, m in zip(enc["input_ids"][i], enc["attention_mask"][i]) if m]
        refs["images"][n] = {
            "file": os.path.basename(paths[n]),
            "size": list(Image.open(paths[n]).size),
            "caption": CAPTIONS[n],
            "input_ids": ids,
            "untruncated_length": untruncated[i],
            "pixel_sum": float(pv[i].double().sum()),
            "torchvision_vs_pil_levels": tv_levels[i],
            "image_embeds": img[i].tolist(),
            "text_embeds": txt[i].tolist(),
            "image_embeds_normalized": img_n[i].tolist(),
            "text_embeds_normalized": txt_n[i].tolist(),
            "score": float(score[i]),
            "score_legacy_pooling": float(score_legacy[i]),
        }
    refs["order"] = names
    refs["clip_score"] = float(torch.max(score.mean(0), torch.zeros(())))
    refs["clip_score_legacy_pooling"] = float(torch.max(score_legacy.mean(0), torch.zeros(())))

    # ------------------------------------------------------------------ CMMD
    vision = CLIPVisionModelWithProjection.from_pretrained(MODEL).eval()
    size = processor.crop_size["height"]
    os.makedirs(os.path.join(ROOT, "cmmd_pixels"))
    normalize_only = dict(do_normalize=True, do_center_crop=False, do_resize=False,
                          do_rescale=False, do_convert_rgb=False, return_tensors="pt")

    def embed(set_paths, prefix):
        rows, pixel_sums = [], []
        for n, p in sorted(set_paths.items()):  # _get_image_list sorts the paths
            u8, x = cmmd_read(p, size)
            Image.fromarray(u8).save(os.path.join(ROOT, "cmmd_pixels", f"{prefix}{n}.png"))
            t = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
            # embedding.py `_resize_bicubic`: to the same size, the identity.
            t2 = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic")
            assert torch.equal(t, t2)
            inputs = processor(images=list(t2), input_data_format="channels_first",
                               **normalize_only)
            assert (inputs["pixel_values"] - (t2 - torch.tensor(mean).view(1, 3, 1, 1))
                    / torch.tensor(std).view(1, 3, 1, 1)).abs().max() == 0
            pixel_sums.append(float(inputs["pixel_values"].double().sum()))
            with torch.no_grad():
                e = vision(**{"pixel_values": inputs["pixel_values"]}).image_embeds
            e = e / torch.linalg.norm(e, axis=-1, keepdims=True)
            rows.append(e[0])
        return torch.stack(rows), pixel_sums

    a, a_sums = embed(paths, "")
    b, b_sums = embed(other_paths, "other_")
    refs["cmmd"] = {
        "images_order": sorted(paths),
        "other_order": sorted(other_paths),
        "images_pixel_sums": a_sums,
        "other_pixel_sums": b_sums,
        "images_embeds": a.tolist(),
        "other_embeds": b.tolist(),
        "images_vs_other": mmd(a.numpy(), b.numpy(), np.float64),
        "images_vs_other_float32": mmd(a.numpy(), b.numpy(), np.float32),
        "images_vs_images": mmd(a.numpy(), a.numpy(), np.float64),
        "images_vs_images_float32": mmd(a.numpy(), a.numpy(), np.float32),
    }
    with open(os.path.join(ROOT, "reference.json"), "w") as f:
        json.dump(refs, f, indent=1)
        f.write("\n")

    for n in names:
        r = refs["images"][n]
        print(f"{n:7} score {r['score']:8.3f} (legacy pooling {r['score_legacy_pooling']:8.3f})"
              f" ids {len(r['input_ids'])}/{r['untruncated_length']}"
              f" torchvision vs PIL {r['torchvision_vs_pil_levels']} levels")
    print(f"clip score {refs['clip_score']:.4f}; cmmd images vs other "
          f"{refs['cmmd']['images_vs_other']:.6f} (float32 {refs['cmmd']['images_vs_other_float32']:.6f}),"
          f" vs itself {refs['cmmd']['images_vs_images']:.3e}")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"fixtures: {total / 1e6:.2f} MB in {ROOT}")


if __name__ == "__main__":
    sys.exit(main())
