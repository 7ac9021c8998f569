#!/usr/bin/env bash
# Quick smoke profile of the whole pipeline (about 5 minutes on 2 cores after set-up): one seed, two
# baselines, one ablation, the stage-3 evaluation only, smaller splits (4 train steps per epoch,
# 200 test scenes), a shorter teacher schedule and a smaller VQA-probe train set.
# It is a DVC experiment of the default params: `dvc exp show` lists it next to the others, and
# `dvc exp apply`/`git checkout params.yaml` go back. Extra arguments go to `dvc exp run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
exec dvc exp run -n "quick" --force \
  -S 'seeds=[0]' \
  -S 'baselines.methods=[scratch,clipkd]' \
  -S 'prepare.emojiscenes.splits.train=256' \
  -S 'prepare.emojiscenes.splits.teacher_extra=256' \
  -S 'prepare.emojiscenes.splits.val=100' \
  -S 'prepare.emojiscenes.splits.test=200' \
  -S 'prepare.emojiscenes.zeroshot_emoji=100' \
  -S 'prepare.emojiscenes.fashion_mnist=300' \
  -S 'teacher.epochs=5' \
  -S 'student_init.epochs=5' \
  -S 'evaluate.vqa_probe.train_images=300' \
  -S 'ablation_runs=[onestage]' \
  -S 'stage_evals=[stage3]' \
  "$@"
