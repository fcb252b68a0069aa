#!/usr/bin/env bash
# Prints `pipelines/demo.yaml` with five stages appended that judge its models on more held-out
# dusk captions: `heldout` captions (the synthetic kind's dusk grammar, seed 3, none of them in
# the demo's data), each model sampled on them exactly as the demo samples its test captions,
# and `scene-accuracy` on each. The stages it shares with the demo keep their keys, so a run of
# the printed file reuses every cached stage of the demo and the models judged are its own.
# Used by bench/demo.sh and bench/demo-seeds.sh.
#
#   bench/heldout.sh <demo.yaml> [count]     (default: 96 captions)
set -euo pipefail
DEMO=$1
COUNT=${2:-96}
cat "$DEMO"
# The held-out captions: an imagefolder whose train split holds all of them (the sample kind
# reads one split; the test split must not be the only one).
cat <<EOT

  heldout_data:
    uses: synthetic
    with: {count: $COUNT, seed: 3, style: dusk, resolution: "\${vars.resolution}"}
  heldout_set:
    uses: imagefolder
    with: {images: heldout_data.images, photos: heldout_data.photos}
  heldout_base:
    uses: sample
    with: {pipeline: pretrain.model, prompts: heldout_set.dataset, split: train, scheduler: "\${vars.scheduler}", steps: "\${vars.sampling_steps}", guidance_scale: "\${vars.guidance}", seed: "\${vars.seed}"}
  heldout_finetuned:
    uses: sample
    with: {pipeline: finetune.model, prompts: heldout_set.dataset, split: train, scheduler: "\${vars.scheduler}", steps: "\${vars.sampling_steps}", guidance_scale: "\${vars.guidance}", seed: "\${vars.seed}"}
  heldout_scene_base:
    uses: scene-accuracy
    with: {samples: heldout_base.images, samples_jsonl: heldout_base.samples}
  heldout_scene_finetuned:
    uses: scene-accuracy
    with: {samples: heldout_finetuned.images, samples_jsonl: heldout_finetuned.samples}
EOT
