#!/usr/bin/env bash
# The GPU check of the paper setting (at most ~5 minutes on one GPU): builds ViT-L-14 -> ViT-B-16
# (pretrained when the hub is reachable, random otherwise, said in the output), times bf16 training
# steps (plain open_clip contrastive, CMAPKD with cached teacher targets, CMAPKD with the online
# teacher), prints samples/s and peak memory of each and the teacher-cache write rate
# (benchmarks/gpu_check.py). Without a GPU it says so and exits 0. Extra arguments go to the script
# (e.g. --batch-size 128, --random-weights, --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "gpu_check: no .venv here: run 'make setup' (or 'make test') first" >&2
  exit 2
fi
exec .venv/bin/python benchmarks/gpu_check.py "$@"
