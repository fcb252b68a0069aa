#!/usr/bin/env python3
"""Load what `pipelines/unsplash.yaml` wrote with the reference tools themselves.

The Rust end-to-end test (tests/integration/seed.rs) checks the layouts; this script checks that
the tools a researcher would hand them to accept them. Run by hand:

    SDPIPE_SEED_KEEP=/tmp/seed cargo test --test integration seed::the_committed
    python3 tests/parity/check_seed_outputs.py /tmp/seed

Needs datasets, diffusers, transformers and torch. Checks:
  - dataset/dataset loads with datasets.load_dataset("imagefolder"), with the train and test
    splits, an `image` and a `text` column, and the captions sdpipe wrote;
  - finetune/model loads with StableDiffusionPipeline.from_pretrained and generates an image;
  - its UNet differs from the base model's (training changed the weights).
"""

import json
import os
import sys

import torch


def main(root):
    import datasets
    from diffusers import StableDiffusionPipeline

    data_dir = os.path.join(root, "dataset", "dataset")
    ds = datasets.load_dataset("imagefolder", data_dir=data_dir)
    captions = {}
    with open(os.path.join(root, "caption", "captions.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            captions[row["id"]] = row["text"]
    assert set(ds) == {"train", "test"}, ds
    for split in ds.values():
        assert {"image", "text"} <= set(split.column_names), split.column_names
        assert all(t in captions.values() for t in split["text"]), split["text"]
    print(f"imagefolder: {ds}")

    pipe = StableDiffusionPipeline.from_pretrained(
        os.path.join(root, "finetune", "model"), safety_checker=None)
    image = pipe(ds["test"]["text"][0], num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0)).images[0]
    print(f"finetuned pipeline: {type(pipe).__name__}, sample {image.size}")
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "seed", "sd")
    base_unet = StableDiffusionPipeline.from_pretrained(base, safety_checker=None).unet
    changed = sum(not torch.equal(a, b) for a, b in
                  zip(base_unet.state_dict().values(), pipe.unet.state_dict().values()))
    assert changed > 0, "the finetuned UNet equals the base model's"
    print(f"finetuned UNet: {changed} of {len(base_unet.state_dict())} tensors changed")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
