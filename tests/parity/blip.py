#!/usr/bin/env python3
"""Reference fixtures for sdpipe's BLIP `caption` stage (crate sdpipe-caption).

Run by hand (CI has no Python):  python3 tests/parity/blip.py
Needs torch, transformers (tested with 5.24), Pillow, numpy, torchvision.

Writes tests/fixtures/blip/:
  model/        a tiny BlipForConditionalGeneration with random weights, saved with
                save_pretrained(safe_serialization=True) next to its BlipProcessor (tokenizer.json,
                preprocessor_config.json, ...): the layout of Salesforce/blip-image-captioning-*.
  images/       the fixed input images (PNG, a JPEG, a grayscale PNG).
  resized/      PIL's 384x384 bicubic resize of each image (uint8 PNG, lossless): the exact
                intermediate the slow (PIL) BlipImageProcessor normalises.
  reference.json
                per image: pixel statistics and a crop of the processor's pixel_values, the
                torchvision-backend processor's difference from the PIL one, and the token ids and
                decoded text of generate() with beam search (num_beams=3, max_length=20,
                min_length=5), greedy, and beam search with a conditional prompt; also a batched
                beam run over all images.

The architecture is the real one (ViT encoder at 384x384 with 16x16 patches, BERT decoder with
cross-attention, [DEC] start token, [SEP] as end), only narrower and shallower, with a tiny
WordPiece vocabulary. Weights are drawn wider than transformers' init (std 0.02 would make every
next-token distribution nearly uniform, so captions would hinge on 1e-4 logit gaps and test
float noise rather than the algorithm), and the [SEP] bias is set so that some captions end early,
some only by max_length, and the min_length rule changes at least one of them.
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
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipImageProcessorPil,
    BlipProcessor,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "blip")
MODEL = os.path.join(ROOT, "model")
GEN = dict(num_beams=3, max_length=20, min_length=5)
PROMPT = "a picture of"

WORDS = (
    "a an the of in on with and at by is are there two three dog cat man woman child people "
    "street city tree trees sky sea beach mountain house car bike road field grass water boat "
    "red blue green white black yellow small large old young sitting standing walking running "
    "picture photo view close up front top next to near under over his her their it this that "
    "table chair window door wall room light dark night day snow rain sun cloud flower bird"
).split()
PIECES = ["##s", "##ing", "##ed", "##er", "##y"]
PUNCT = [".", ",", "'", "-", "!", "?"]


def build_tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PUNCT + WORDS + PIECES
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    # As in the Salesforce checkpoints: [DEC] starts decoding, [ENC] is the encoder's marker.
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def init_weights(model, gen):
    """Weights with std 1/sqrt(fan_in) (LayerNorms kept at identity), embeddings std 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # class / position embeddings stored as 1-d or 3-d
                p.copy_(torch.randn(p.shape, generator=gen))
        # Embedding tables: unit-variance rows, like a trained model's scale after LayerNorm.
        for name, p in model.named_parameters():
            if "embeddings" in name and p.dim() >= 2 and "patch" not in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def make_images(path):
    rng = np.random.default_rng(7)
    os.makedirs(path, exist_ok=True)

    def smooth(w, h, seed):
        r = np.random.default_rng(seed)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = r.uniform(0.5, 4, 3)
            img[..., c] = 127 + 100 * np.sin(fx * x / w * 6.28 + ph) * np.cos(fy * y / h * 6.28)
        return img

    images = {}
    # Upscaled (61x47 -> 384x384), with fine noise so bicubic overshoot and clipping happen.
    a = smooth(61, 47, 1) + rng.normal(0, 25, (47, 61, 3))
    images["tiny-upscale"] = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    # Squashed: wider than 384 (downscaled), shorter (upscaled), with hard edges.
    b = Image.fromarray(np.clip(smooth(512, 300, 2), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(b)
    d.ellipse((60, 40, 260, 240), fill=(250, 30, 30))
    d.rectangle((300, 100, 480, 280), fill=(20, 20, 220))
    d.line((0, 0, 511, 299), fill=(255, 255, 255), width=3)
    images["squash"] = b
    # Grayscale ("L") source: converted to RGB first, as the processor does.
    g = Image.fromarray(np.clip(smooth(90, 120, 3)[..., 0], 0, 255).astype(np.uint8), mode="L")
    images["gray"] = g
    paths = {}
    for name, img in images.items():
        p = os.path.join(path, f"{name}.png")
        img.save(p, optimize=True)
        paths[name] = p
    # A JPEG: decoders (libjpeg in PIL, the image crate in Rust) may differ by a level or two.
    j = Image.fromarray(np.clip(smooth(400, 300, 4), 0, 255).astype(np.uint8))
    ImageDraw.Draw(j).ellipse((100, 50, 300, 250), fill=(240, 200, 40))
    p = os.path.join(path, "photo.jpg")
    j.save(p, quality=90)
    paths["photo"] = p
    return paths


def strip_fill(ids, eos):
    """Token ids up to and including the first end token (the rest is batch padding)."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos) + 1] if eos in ids[1:] else ids


def main():
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(MODEL)
    torch.manual_seed(0)

    tok = build_tokenizer()
    vocab_size = len(tok)
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision_config = dict(
        hidden_size=40,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=384,
        patch_size=16,
    )
    config = BlipConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=16,
        image_text_hidden_size=16,
    )
    model = BlipForConditionalGeneration(config).eval()
    init_weights(model, torch.Generator().manual_seed(1234))
    sep = config.text_config.sep_token_id
    with torch.no_grad():
        # Make [SEP] competitive so some captions end before max_length.
        model.text_decoder.cls.predictions.bias[sep] = 4.0

    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tok)
    model.save_pretrained(MODEL, safe_serialization=True)
    processor.save_pretrained(MODEL)
    # Reload from disk: what Rust loads is what is tested.
    model = BlipForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = BlipProcessor.from_pretrained(MODEL)
    tok = processor.tokenizer

    pil_proc = BlipImageProcessorPil()
    tv_proc = BlipImageProcessor()
    paths = make_images(os.path.join(ROOT, "images"))
    os.makedirs(os.path.join(ROOT, "resized"))

    refs = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
            "generate": GEN, "prompt": PROMPT, "images": {}}
    pixel_batch = []
    for name, path in paths.items():
        image = Image.open(path)
        pv = pil_proc(images=image, return_tensors="pt")["pixel_values"]
        tv = tv_proc(images=image, return_tensors="pt")["pixel_values"]
        resized = image.convert("RGB").resize((384, 384), Image.BICUBIC)
        resized.save(os.path.join(ROOT, "resized", f"{name}.png"), optimize=True)
        # The slow processor is exactly resize -> /255 -> normalise; check it before relying on it.
        arr = np.asarray(resized, np.float32) / 255.0
        mean = np.array(pil_proc.image_mean, np.float32)
        std = np.array(pil_proc.image_std, np.float32)
        mine = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())[None]
        assert (mine - pv).abs().max() < 1e-5, (name, (mine - pv).abs().max())
        std_levels = torch.tensor(pil_proc.image_std).view(1, 3, 1, 1) * 255
        pixel_batch.append(pv)
        with torch.no_grad():
            beam = model.generate(pixel_values=pv, **GEN, return_dict_in_generate=True,
                                  output_scores=True)
            greedy = model.generate(pixel_values=pv, max_length=20, min_length=5)
            no_min = model.generate(pixel_values=pv, num_beams=3, max_length=20, min_length=0)
            prompt_ids = processor(images=image, text=PROMPT, return_tensors="pt")["input_ids"]
            prompted = model.generate(pixel_values=pv, input_ids=prompt_ids, **GEN)
        beam_ids = strip_fill(beam.sequences[0], sep)
        refs["images"][name] = {
            "file": os.path.basename(path),
            "pixel": {
                "shape": list(pv.shape[1:]),
                "sum": float(pv.double().sum()),
                "mean_per_channel": pv[0].double().mean(dim=(1, 2)).tolist(),
                "std_per_channel": pv[0].double().std(dim=(1, 2)).tolist(),
                "crop_origin": [100, 200],
                "crop": pv[0, :, 100:108, 200:208].tolist(),
            },
            "torchvision_vs_pil": {
                "max_abs": float((tv - pv).abs().max()),
                "max_levels": float(((tv - pv).abs() * std_levels).max()),
            },
            "beam": {"ids": beam_ids, "text": tok.decode(beam_ids, skip_special_tokens=True),
                     "score": float(beam.sequences_scores[0])},
            "beam_without_min_length": strip_fill(no_min[0], sep),
            "greedy": {"ids": strip_fill(greedy[0], sep),
                       "text": tok.decode(greedy[0], skip_special_tokens=True)},
            "prompt": {"input_ids": prompt_ids[0].tolist(), "ids": strip_fill(prompted[0], sep),
                       "text": tok.decode(prompted[0], skip_special_tokens=True)},
        }
    with torch.no_grad():
        batched = model.generate(pixel_values=torch.cat(pixel_batch), **GEN)
    refs["batch_order"] = list(paths)
    refs["batched_beam"] = [strip_fill(row, sep) for row in batched]
    with open(os.path.join(ROOT, "reference.json"), "w") as f:
        json.dump(refs, f, indent=1)
        f.write("\n")

    # A summary to judge the fixture by: captions should differ, vary in length, and min_length
    # should matter somewhere.
    for name, r in refs["images"].items():
        print(f"{name:13} beam  {r['beam']['text']!r} ({len(r['beam']['ids'])} ids)")
        print(f"{'':13} greedy {r['greedy']['text']!r}")
        print(f"{'':13} prompt {r['prompt']['text']!r}")
        print(f"{'':13} min_length matters: {r['beam_without_min_length'] != r['beam']['ids']}"
              f"; torchvision vs PIL: {r['torchvision_vs_pil']['max_levels']:.2f} levels")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"fixtures: {total / 1e6:.2f} MB in {ROOT}")


if __name__ == "__main__":
    sys.exit(main())
