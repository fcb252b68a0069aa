#!/usr/bin/env python3
"""Throughput of the reference metric networks on PyTorch CPU, for comparison with
`stages/metrics/examples/bench_metrics.rs` (same inputs, batch sizes and thread count):
pytorch-fid's InceptionV3 pool3 features (images/s, 299 resize included) and lpips alex
(pairs/s), on synthetic 512x512 images, random weights (same architecture, same cost).

Usage: python3 bench/metrics.py [threads] [images] [pairs] [profile]   (bench/metrics.sh runs
both). Besides wall-clock rates it reports CPU seconds per image / pair (all threads): on a
shared machine wall time depends on other jobs, CPU time much less. With `profile`, it first
prints (to stderr) the CPU time of each AlexNet trunk layer on one LPIPS batch, as
bench_metrics' `profile` does for sdpipe.
"""

import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "parity", os.path.join(HERE, "..", "tests", "parity", "metrics.py"))
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)

SIZE, FID_BATCH, LPIPS_BATCH = 512, 8, 4


def images(n, phase):
    b, c, y, x = np.meshgrid(np.arange(n), np.arange(3), np.arange(SIZE), np.arange(SIZE),
                             indexing="ij")
    t = np.sin(x * 0.031 + y * 0.017 * (c + 1) + b + phase)
    return torch.from_numpy((0.5 + 0.5 * t).astype(np.float32))


def profile_alexnet(lp, x):
    """CPU seconds (least of three runs) of each layer of lpips' AlexNet trunk on `x`, each
    conv timed together with its ReLU."""
    layers = [m for s in (lp.net.slice1, lp.net.slice2, lp.net.slice3, lp.net.slice4,
                          lp.net.slice5) for m in s]
    total, i = 0.0, 0
    while i < len(layers):
        group = layers[i:i + 2] if isinstance(layers[i], torch.nn.Conv2d) else layers[i:i + 1]
        best = float("inf")
        for _ in range(3):
            start, y = time.process_time(), x
            for m in group:
                y = m(y)
            best = min(best, time.process_time() - start)
        name = type(group[0]).__name__
        print("%12s %s -> %s: CPU %.4f s" % (name, list(x.shape), list(y.shape), best),
              file=sys.stderr)
        total, x, i = total + best, y, i + len(group)
    print("%12s CPU %.4f s" % ("trunk", total), file=sys.stderr)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    n_images = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    n_pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    with torch.no_grad():
        model = parity.fid_model()
        batch = images(FID_BATCH, 0.0)
        model(batch[:1])
        start, cpu_start, done = time.perf_counter(), time.process_time(), 0
        while done < n_images:
            model(batch)
            done += FID_BATCH
        fid_rate = done / (time.perf_counter() - start)
        fid_cpu = (time.process_time() - cpu_start) / done if done else float("nan")

        lp = parity.lpips_model("alex")
        a, b = images(LPIPS_BATCH, 0.0) * 2 - 1, images(LPIPS_BATCH, 0.5) * 2 - 1
        if len(sys.argv) > 4 and sys.argv[4] == "profile":
            profile_alexnet(lp, torch.cat([a, b]))
        lp(a[:1], b[:1])
        start, cpu_start, done = time.perf_counter(), time.process_time(), 0
        while done < n_pairs:
            lp(a, b)
            done += LPIPS_BATCH
        lpips_rate = done / (time.perf_counter() - start)
        lpips_cpu = (time.process_time() - cpu_start) / done if done else float("nan")
    print(json.dumps({"impl": "pytorch-fid %s / lpips, torch %s CPU" % (
        parity.pytorch_fid.__version__, torch.__version__), "threads": threads, "size": SIZE,
        "inception_images_per_s": round(fid_rate, 3),
        "inception_cpu_s_per_image": round(fid_cpu, 3),
        "lpips_alex_pairs_per_s": round(lpips_rate, 3),
        "lpips_alex_cpu_s_per_pair": round(lpips_cpu, 3)}))


if __name__ == "__main__":
    main()
