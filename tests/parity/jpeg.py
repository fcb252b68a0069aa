#!/usr/bin/env python3
"""Reference fixtures for sdpipe's JPEG decoder (crate sdpipe-jpeg, stages/jpeg).

Run by hand from the repository root (CI reads the committed outputs only):

    python3 tests/parity/jpeg.py

Needs Pillow built with libjpeg-turbo, and numpy. Writes tests/fixtures/jpeg/:

  *.jpg           small JPEGs that Pillow encodes from one deterministic synthetic picture
                  (hard edges, a ring, smooth gradients in every channel, hashed noise), one
                  per decoder path that matters: chroma subsampling 4:2:0 / 4:2:2 / 4:4:4,
                  baseline and progressive, grayscale, an RGB (Adobe, no YCbCr transform)
                  file, CMYK (Adobe inverted, as Pillow writes it), restart markers, optimised
                  Huffman tables, quality 95 and 75, sizes that are not a multiple of the MCU
                  (97x61, 333x250, 1x1).
                  Two are cut by this script after encoding, the way real downloads break yet
                  Pillow still decodes them: `progressive_partial_420.jpg` keeps only the first
                  scans of a progressive file and ends with EOI (libjpeg's progressive block
                  smoothing fills in the missing AC coefficients), and `baseline_cut_eoi.jpg`
                  stops in the middle of the entropy-coded data followed by EOI (libjpeg warns
                  "premature end of data segment" and fills the rest of the image).
  reference.json  per file: width, height, Pillow's mode, the SHA-256 of
                  `Image.open(f).convert("RGB").tobytes()` (rows top to bottom, RGB interleaved),
                  and short SHA-256s of every row and every column of it, so that a test can say
                  where a mismatch starts; plus the Pillow and libjpeg-turbo versions used.

The picture is computed with integer arithmetic only (no RNG), so it is the same on any
machine; the bytes of the JPEGs still depend on the libjpeg-turbo encoder, which is why the
JPEGs themselves are committed and the tests only decode them.
"""

import hashlib
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image, features

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "jpeg"))


def picture(width, height):
    """An RGB uint8 array with content every JPEG stage sees: edges, gradients and noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    # Gradients: red across, green down, blue along the diagonal.
    r = (x * 255) // max(width - 1, 1)
    g = (y * 255) // max(height - 1, 1)
    b = ((x + y) * 255) // max(width + height - 2, 1)
    # Noise from an integer hash of the coordinates (deterministic, no RNG state).
    h = (x * 73856093) ^ (y * 19349663)
    h = (h ^ (h >> 13)) * 1274126177
    noise = ((h >> 16) & 63) - 32
    img = np.stack([r, g, b], axis=-1) + noise[..., None] // np.array([1, 2, 3])
    # Hard edges: a dark rectangle, a saturated ring, and a one-pixel checker stripe.
    img[height // 5 : height // 2, width // 6 : width // 2] = [20, 30, 200]
    cy, cx = height * 0.6, width * 0.65
    d2 = (y - cy) ** 2 + (x - cx) ** 2
    rad = min(width, height) * 0.25
    img[(d2 < rad**2) & (d2 > (rad * 0.6) ** 2)] = [250, 200, 10]
    stripe = (y >= height * 0.85) & (y < height * 0.85 + 6)
    img[stripe & (((x + y) & 1) == 0)] = [255, 255, 255]
    img[stripe & (((x + y) & 1) == 1)] = [0, 0, 0]
    return np.clip(img, 0, 255).astype(np.uint8)


def rgb(width, height):
    return Image.fromarray(picture(width, height), "RGB")


def cmyk(width, height):
    # Not RGB->CMYK through Pillow's naive conversion (K would be 0 everywhere): K carries
    # the luminance so that all four channels have content.
    a = picture(width, height).astype(np.int64)
    k = 255 - a.max(axis=-1)
    c = 255 - a[..., 0] - k
    m = 255 - a[..., 1] - k
    yy = 255 - a[..., 2] - k
    arr = np.clip(np.stack([c, m, yy, k], axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "CMYK")


def short_sha(pixels):
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:6]


def progressive_prefix(data, scans):
    """The bytes of `data` up to its `scans`+1-th SOS marker, then EOI."""
    pos, seen = 2, 0
    while pos < len(data):
        assert data[pos] == 0xFF, "expected a marker"
        marker = data[pos + 1]
        if marker == 0xDA:
            seen += 1
            if seen > scans:
                return data[:pos] + b"\xff\xd9"
            # Skip the header, then the entropy-coded data up to the next real marker.
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            while not (data[pos] == 0xFF and data[pos + 1] != 0x00 and not 0xD0 <= data[pos + 1] <= 0xD7):
                pos += 1
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise ValueError("file has fewer scans")


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    base = rgb(128, 96)
    # name -> (image, save options)
    cases = {
        "baseline_420_q75.jpg": (base, dict(quality=75, subsampling="4:2:0")),
        "baseline_420_q95.jpg": (base, dict(quality=95, subsampling="4:2:0")),
        "baseline_422.jpg": (base, dict(quality=85, subsampling="4:2:2")),
        "baseline_444_q95.jpg": (base, dict(quality=95, subsampling="4:4:4")),
        "baseline_444_q75.jpg": (base, dict(quality=75, subsampling="4:4:4")),
        "progressive_420.jpg": (base, dict(quality=80, subsampling="4:2:0", progressive=True)),
        "progressive_444.jpg": (base, dict(quality=90, subsampling="4:4:4", progressive=True)),
        "progressive_422_optimized.jpg": (
            base,
            dict(quality=80, subsampling="4:2:2", progressive=True, optimize=True),
        ),
        "optimized_420.jpg": (base, dict(quality=85, subsampling="4:2:0", optimize=True)),
        "restart_420.jpg": (base, dict(quality=85, subsampling="4:2:0", restart_marker_blocks=7)),
        "restart_rows_444.jpg": (base, dict(quality=85, subsampling="4:4:4", restart_marker_rows=1)),
        "grayscale.jpg": (base.convert("L"), dict(quality=85)),
        "grayscale_progressive.jpg": (base.convert("L"), dict(quality=85, progressive=True)),
        "rgb_adobe.jpg": (base, dict(quality=90, keep_rgb=True)),
        "cmyk.jpg": (cmyk(96, 72), dict(quality=90)),
        "cmyk_progressive.jpg": (cmyk(61, 47), dict(quality=85, progressive=True)),
        "odd_97x61_420.jpg": (rgb(97, 61), dict(quality=85, subsampling="4:2:0")),
        "odd_97x61_422_progressive.jpg": (
            rgb(97, 61),
            dict(quality=85, subsampling="4:2:2", progressive=True),
        ),
        "odd_333x250_420.jpg": (rgb(333, 250), dict(quality=70, subsampling="4:2:0")),
        "odd_333x250_progressive_420.jpg": (
            rgb(333, 250),
            dict(quality=60, subsampling="4:2:0", progressive=True),
        ),
        "tiny_1x1.jpg": (rgb(1, 1), dict(quality=90, subsampling="4:2:0")),
        "tiny_1x1_gray.jpg": (rgb(1, 1).convert("L"), dict(quality=90)),
        "odd_17x9_444.jpg": (rgb(17, 9), dict(quality=90, subsampling="4:4:4")),
    }
    for name, (img, opts) in cases.items():
        img.save(os.path.join(OUT, name), "JPEG", **opts)

    # Derived files: cut after encoding (see the module docstring).
    with open(os.path.join(OUT, "progressive_420.jpg"), "rb") as f:
        prog = f.read()
    # Pillow's progressive script starts with a DC scan of all components, then AC scans;
    # keeping 3 scans leaves most AC coefficients unknown, so block smoothing is in play.
    with open(os.path.join(OUT, "progressive_partial_420.jpg"), "wb") as f:
        f.write(progressive_prefix(prog, 3))
    with open(os.path.join(OUT, "baseline_420_q95.jpg"), "rb") as f:
        baseline = f.read()
    with open(os.path.join(OUT, "baseline_cut_eoi.jpg"), "wb") as f:
        f.write(baseline[: len(baseline) * 3 // 5] + b"\xff\xd9")

    files = {}
    for name in sorted(os.listdir(OUT)):
        if not name.endswith(".jpg"):
            continue
        with Image.open(os.path.join(OUT, name)) as im:
            mode = im.mode
            out = im.convert("RGB")
        files[name] = {
            "width": out.width,
            "height": out.height,
            "mode": mode,
            "rgb_sha256": hashlib.sha256(out.tobytes()).hexdigest(),
            # Locators for a mismatch: the first 6 hex digits of the SHA-256 of each row's and
            # each column's RGB bytes (the full pixels would not fit the size budget).
            "row_sha256_6": [short_sha(row) for row in np.asarray(out)],
            "col_sha256_6": [short_sha(col) for col in np.asarray(out).transpose(1, 0, 2)],
        }
    reference = {
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "files": files,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        # One line per file: the hash lists would otherwise take one line per row.
        meta = {k: v for k, v in reference.items() if k != "files"}
        lines = [f"    {json.dumps(n)}: {json.dumps(e, sort_keys=True)}" for n, e in files.items()]
        text = json.dumps(meta, indent=2, sort_keys=True)[:-2]
        text += ',\n  "files": {\n' + ",\n".join(lines) + "\n  }\n}"
        assert json.loads(text) == reference
        f.write(text + "\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(files)} JPEGs and reference.json to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
