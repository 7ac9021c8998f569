#!/usr/bin/env bash
# Quick smoke profile of the whole pipeline (a few minutes on 2 cores): one seed, three baselines,
# one ablation, a smaller train split (8 steps per epoch) and teacher schedule.
# It is a DVC experiment of the default params: `dvc exp show` lists it next to the others, and
# `dvc exp apply`/`git checkout params.yaml` go back. Extra arguments go to `dvc exp run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
exec dvc exp run -n "quick" --force \
  -S 'seeds=[0]' \
  -S 'baselines.methods=[scratch,kd,clipkd]' \
  -S 'prepare.emojiscenes.splits.train=512' \
  -S 'teacher.epochs=8' \
  -S 'ablation_runs=[onestage]' \
  "$@"
