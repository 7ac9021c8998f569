#!/usr/bin/env bash
# Quick smoke profile of the whole pipeline (about 5 minutes on 2 cores after set-up): one seed, two
# baselines, one ablation, the stage-3 evaluation only, smaller splits (4 train steps per epoch,
# 100 test scenes), a shorter teacher schedule and a smaller VQA-probe train set.
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
  -S 'prepare.emojiscenes.splits.teacher_extra=128' \
  -S 'prepare.emojiscenes.splits.val=64' \
  -S 'prepare.emojiscenes.splits.test=100' \
  -S 'prepare.emojiscenes.zeroshot_emoji=60' \
  -S 'prepare.emojiscenes.fashion_mnist=100' \
  -S 'teacher.epochs=5' \
  -S 'student_init.epochs=5' \
  -S 'evaluate.vqa_probe.train_images=200' \
  -S 'evaluate.figure_samples=100' \
  -S 'report.fig3_samples=100' \
  -S 'report.tsne_samples=100' \
  -S 'ablation_runs=[onestage]' \
  -S 'stage_evals=[stage3]' \
  "$@"
