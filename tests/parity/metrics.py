#!/usr/bin/env python3
"""Parity fixtures for sdpipe-metrics (run by hand; CI only reads what this writes).

The reference tools run here exactly as published — pytorch-fid's InceptionV3 and
calculate_frechet_distance, lpips.LPIPS, clean-fid's kernel_distance — but with *random*
weights, since the published ones cannot be downloaded. The random weights come from a
closed-form recipe (`uniform` below, mirrored bit for bit by stages/metrics/src/recipe.rs), so
the Rust tests rebuild the same networks and the fixtures need not hold ~100 MB of weights.

Writes tests/fixtures/metrics/:
  real/img{0..5}.png   64x48 test images ("ground truth"; fixed smooth random patterns)
  fake/img{0..4}.png   48x48 ("samples"), so the two sets differ in size and count
  lpips/ref/p{0..3}.png, lpips/dist/p{0..3}.png   LPIPS pairs (two 64x64, two 72x56)
  features.safetensors  pytorch-fid pool3 features of real/ and fake/ (float32 [N, 2048]),
                        and `resized_probe`: img0 of real/ after pytorch-fid's 299 resize,
                        sampled on a 13x13 grid of positions (float32 [3, 13, 13])
  reference.json        FID (pytorch-fid, and the exact nuclear-norm value), KID on explicit
                        subsets (clean-fid), a covariance-path FID case with its features,
                        LPIPS per pair (alex, vgg; and alex with the *published* lpips linear
                        layers from the installed package), recipe spot values
  pth/                  small checkpoints for the converter: lpips alex linear layers in the
                        legacy and the zip format (random recipe values), a copy of the lpips
                        package's published v0.1 alex.pth (Python 2 legacy pickle, BSD-2-Clause,
                        see pth/NOTICE), and layout edge cases (views, offsets, transposes,
                        Parameters, float16, int64) in both formats with their expected values

With --big DIR it also writes, outside the repository, full-size random checkpoints in the
published layouts (pytorch-fid Inception with fc and num_batches_tracked, torchvision AlexNet
with the classifier; legacy and zip) for the ignored Rust test `converts_full_size_checkpoints`.

Usage: python3 tests/parity/metrics.py [--big /tmp/sdpipe-metrics-pth]   (from the repo root)
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

import cleanfid
import cleanfid.fid
import lpips
import pytorch_fid
import pytorch_fid.inception as pfi
import scipy
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "metrics")

# ---------------------------------------------------------------- the random-weights recipe
PHI = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def mix_int(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for c in data:
        h ^= c
        h = (h * 0x100000001B3) & M64
    return h


def uniform(name, seed, n):
    """n values in [-1, 1), exact in float32 (see recipe.rs)."""
    key = fnv1a64(name.encode()) ^ mix_int((seed + PHI) & M64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(PHI)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 8388608.0) - np.float32(1.0)


def recipe_values(name, shape, role, seed=0):
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(name, seed, n)
    f = np.float32
    if role == "conv":
        a = f(np.sqrt(6.0 / float(np.prod(shape[1:]))))
        v = u * a
    elif role == "bn_weight":
        v = f(1.0) + f(0.25) * u
    elif role in ("bn_bias", "bn_mean", "bias"):
        v = f(0.1) * u
    elif role == "bn_var":
        v = f(1.0) + f(0.5) * u
    elif role == "lin":
        v = (u + f(1.0)) * f(0.05)
    else:
        raise ValueError(role)
    assert v.dtype == np.float32
    return torch.from_numpy(v.reshape(shape).copy())


def inception_role(name):
    if name.endswith("conv.weight") or name == "fc.weight":
        return "conv"
    for suffix, role in [("bn.weight", "bn_weight"), ("bn.bias", "bn_bias"),
                         ("bn.running_mean", "bn_mean"), ("bn.running_var", "bn_var"),
                         ("fc.bias", "bias")]:
        if name.endswith(suffix):
            return role
    return None


# ---------------------------------------------------------------- networks with recipe weights
def fid_state_dict(seed=0):
    """A state dict for fid_inception_v3 in the published layout, values from the recipe."""
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    sd = {}
    for name, t in net.state_dict().items():
        role = inception_role(name)
        sd[name] = t.clone() if role is None else recipe_values(name, tuple(t.shape), role, seed)
    return sd


def fid_model(seed=0):
    """pytorch-fid's own InceptionV3 (block 3, resize and normalise on), recipe weights loaded
    through its own loading code."""
    sd = fid_state_dict(seed)
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    try:
        model = pfi.InceptionV3([3])
    finally:
        pfi.load_state_dict_from_url = original
    return model.eval()


ALEX_CONVS = [0, 3, 6, 8, 10]
VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def lpips_model(net, lin_from_package=False, seed=0):
    """lpips.LPIPS with a random trunk and random (or the package's published) linear layers,
    trunk and linear weights from the recipe, loaded with strict=True."""
    model = lpips.LPIPS(pretrained=lin_from_package, net=net, pnet_rand=True, verbose=False)
    sd = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "net":  # net.slice3.6.weight -> features.6.weight
            tv = "features.%s.%s" % (parts[2], parts[3])
            role = "conv" if parts[3] == "weight" else "bias"
            sd[name] = recipe_values(tv, tuple(t.shape), role, seed)
        elif parts[0].startswith("lin") and not lin_from_package:
            # `lins.3.model.1.weight` is the same parameter as `lin3.model.1.weight`.
            canonical = "lin%s.model.1.weight" % parts[1] if parts[0] == "lins" else name
            sd[name] = recipe_values(canonical, tuple(t.shape), "lin", seed)
        else:
            sd[name] = t.clone()
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---------------------------------------------------------------- fixed images
def pattern(rng, w, h):
    """A smooth random image: a few random sinusoids per channel plus mild noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        acc = np.zeros((h, w))
        for _ in range(4):
            fx, fy = rng.uniform(-0.3, 0.3, size=2)
            acc += rng.uniform(0.2, 1.0) * np.sin(fx * x + fy * y + rng.uniform(0, 6.3))
        img[:, :, c] = acc
    img = (img - img.min()) / (img.max() - img.min() + 1e-9)
    img = 0.85 * img + 0.15 * rng.uniform(size=img.shape)
    return Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_images():
    rng = np.random.default_rng(20240601)
    sets = {"real": (6, 64, 48), "fake": (5, 48, 48)}
    paths = {}
    for name, (n, w, h) in sets.items():
        os.makedirs(os.path.join(ROOT, name), exist_ok=True)
        paths[name] = []
        for i in range(n):
            p = os.path.join(ROOT, name, "img%d.png" % i)
            pattern(rng, w, h).save(p, optimize=True)
            paths[name].append(p)
    pairs = []
    for side in ("ref", "dist"):
        os.makedirs(os.path.join(ROOT, "lpips", side), exist_ok=True)
    for i, (w, h) in enumerate([(64, 64), (64, 64), (72, 56), (72, 56)]):
        ref = pattern(rng, w, h)
        # The distorted image: the reference blended with another pattern, increasingly.
        other = pattern(rng, w, h)
        alpha = 0.15 * (i + 1)
        dist = Image.blend(ref, other, alpha)
        pr = os.path.join(ROOT, "lpips", "ref", "p%d.png" % i)
        pd = os.path.join(ROOT, "lpips", "dist", "p%d.png" % i)
        ref.save(pr, optimize=True)
        dist.save(pd, optimize=True)
        pairs.append((pr, pd))
    return paths, pairs


def to_unit(path):
    """pytorch-fid's ImagePathDataset: PIL convert('RGB'), ToTensor."""
    return torchvision.transforms.functional.to_tensor(Image.open(path).convert("RGB"))


def to_signed(path):
    """lpips' im2tensor: x / 127.5 - 1 (float64 numpy, then float32)."""
    return lpips.im2tensor(np.array(Image.open(path).convert("RGB")))


# ---------------------------------------------------------------- references
def fid_features(model, paths):
    batch = torch.stack([to_unit(p) for p in paths])
    with torch.no_grad():
        pred = model(batch)[0]
    return pred.squeeze(3).squeeze(2).numpy()


def nuclear_fid(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = a - mu1, b - mu2
    n1, n2 = len(a) - 1, len(b) - 1
    s = np.linalg.svd(c1 @ c2.T / np.sqrt(n1 * n2), compute_uv=False)
    return float(((mu1 - mu2) ** 2).sum() + (c1 ** 2).sum() / n1 + (c2 ** 2).sum() / n2
                 - 2 * s.sum())


def pytorch_fid_value(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    return float(calculate_frechet_distance(mu1, s1, mu2, s2))


def clean_fid_kid_on_subsets(real, fake, subsets):
    """clean-fid's kernel_distance, with its np.random.choice calls answered from `subsets`
    (a list of (real_idx, fake_idx)); it draws fake (feats2) first, then real (feats1)."""
    queue = []
    for ix, iy in subsets:
        queue += [np.array(iy), np.array(ix)]
    original = np.random.choice
    np.random.choice = lambda *a, **k: queue.pop(0)
    try:
        value = cleanfid.fid.kernel_distance(real.astype(np.float64), fake.astype(np.float64),
                                             num_subsets=len(subsets),
                                             max_subset_size=len(subsets[0][0]))
    finally:
        np.random.choice = original
    assert not queue
    return float(value)


def write_pth():
    d = os.path.join(ROOT, "pth")
    os.makedirs(d, exist_ok=True)
    lin = {}
    for i, c in enumerate([64, 192, 384, 256, 256]):
        name = "lin%d.model.1.weight" % i
        lin[name] = recipe_values(name, (1, c, 1, 1), "lin")
    torch.save(lin, os.path.join(d, "lin_alex_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(lin, os.path.join(d, "lin_alex_zip.pth"))
    published = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    shutil.copyfile(published, os.path.join(d, "lpips_v0.1_alex.pth"))
    with open(os.path.join(d, "NOTICE"), "w") as f:
        f.write(
            "lpips_v0.1_alex.pth is the file lpips/weights/v0.1/alex.pth shipped in the `lpips`\n"
            "Python package (version %s), copied unchanged to test that sdpipe reads the\n"
            "published legacy checkpoint. lpips: Copyright (c) 2018, Richard Zhang, Phillip\n"
            "Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang. All rights reserved.\n"
            "Redistributed under the BSD 2-Clause License of the lpips package.\n" % lpips_version())
    # Layout edge cases: views share one storage; expected values are their contiguous copies.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8.0
    layouts = {
        "plain": base,
        "transposed": base.t(),
        "row_view": base[2],
        "column_slice": base[:, 1:3],
        "half": (base / 3.0).half(),
        "param": torch.nn.Parameter(base[1:3] * 2.0),
        "long": torch.arange(5, dtype=torch.int64) - 2,
        "scalar": torch.tensor(1.5),
    }
    torch.save(layouts, os.path.join(d, "layouts_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(layouts, os.path.join(d, "layouts_zip.pth"))
    expected = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                    "values": v.detach().double().flatten().tolist()}
                for k, v in layouts.items()}
    with open(os.path.join(d, "layouts.json"), "w") as f:
        json.dump(expected, f, indent=1)


def lpips_version():
    try:
        from importlib.metadata import version
        return version("lpips")
    except Exception:
        return "unknown"


def write_big(out):
    os.makedirs(out, exist_ok=True)
    sd = fid_state_dict()
    torch.save(sd, os.path.join(out, "inception_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(sd, os.path.join(out, "inception_zip.pth"))
    alex = torchvision.models.alexnet(weights=None).state_dict()
    for name in list(alex):
        if name.startswith("features."):
            role = "conv" if name.endswith("weight") else "bias"
            alex[name] = recipe_values(name, tuple(alex[name].shape), role)
    torch.save(alex, os.path.join(out, "alexnet_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(alex, os.path.join(out, "alexnet_zip.pth"))
    print("wrote full-size checkpoints to", out)


def main():
    torch.manual_seed(0)
    if "--recipe-check" in sys.argv:
        print([float(x) for x in uniform("features.0.weight", 0, 3)])
        return
    os.makedirs(ROOT, exist_ok=True)
    paths, pairs = write_images()

    model = fid_model()
    real = fid_features(model, paths["real"])
    fake = fid_features(model, paths["fake"])

    # The 299 resize of one image, probed on a grid (the whole tensor would be 1 MB).
    resized = F.interpolate(to_unit(paths["real"][0])[None], size=(299, 299), mode="bilinear",
                            align_corners=False)[0]
    grid = np.linspace(0, 298, 13).round().astype(int)
    probe = resized.numpy()[:, grid][:, :, grid]

    save_file({"real": real.astype(np.float32), "fake": fake.astype(np.float32),
               "resized_probe": np.ascontiguousarray(probe, dtype=np.float32),
               "probe_grid": grid.astype(np.int64)},
              os.path.join(ROOT, "features.safetensors"))

    rng = np.random.default_rng(7)
    subsets = [(sorted(rng.choice(6, 4, replace=False).tolist()),
                sorted(rng.choice(5, 4, replace=False).tolist())) for _ in range(3)]
    whole = [(list(range(5)), list(range(5)))]

    # Covariance-path case: more samples than dimensions, non-singular covariances.
    g = np.random.default_rng(11)
    cov_a = g.normal(size=(40, 16)).astype(np.float32)
    cov_b = (g.normal(size=(30, 16)) * 1.3 + 0.4).astype(np.float32)

    ref = {
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "pytorch_fid": pytorch_fid.__version__, "lpips": lpips_version(),
                     "clean_fid": getattr(cleanfid, "__version__", "0.1.35"),
                     "scipy": scipy.__version__, "numpy": np.__version__},
        "recipe_first_three": [float(x) for x in uniform("features.0.weight", 0, 3)],
        "fid": {
            "pytorch_fid": pytorch_fid_value(real, fake),
            "nuclear_norm": nuclear_fid(real, fake),
        },
        "kid_subsets": {
            "subsets": subsets,
            "clean_fid": clean_fid_kid_on_subsets(real, fake, subsets),
            "first_five_of_each": clean_fid_kid_on_subsets(real[:5], fake, whole),
        },
        "covariance_case": {
            "a": cov_a.tolist(), "b": cov_b.tolist(),
            "pytorch_fid": pytorch_fid_value(cov_a, cov_b),
        },
        "lpips": {},
    }
    for key, net, from_package in [("alex", "alex", False), ("vgg", "vgg", False),
                                   ("alex_published_lin", "alex", True)]:
        m = lpips_model(net, lin_from_package=from_package)
        values = []
        with torch.no_grad():
            for pr, pd in pairs:
                values.append(float(m(to_signed(pr), to_signed(pd)).item()))
        ref["lpips"][key] = values
    with open(os.path.join(ROOT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    write_pth()
    print(json.dumps({k: ref[k] for k in ("fid", "lpips")}, indent=1))
    print("kid on subsets", ref["kid_subsets"]["clean_fid"], "cov case",
          ref["covariance_case"]["pytorch_fid"])
    if "--big" in sys.argv:
        write_big(sys.argv[sys.argv.index("--big") + 1])


if __name__ == "__main__":
    main()
