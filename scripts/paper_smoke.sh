#!/usr/bin/env bash
# The paper setting end to end on CPU (issue 16; at most ~10 minutes on 2 cores after set-up): the
# whole DAG with `setting: paper` (configs/paper.yaml) and configs/paper_smoke.yaml merged over
# params.yaml, i.e. open_clip ViTs on both sides (tiny ones), the student starting from a checkpoint
# file, COCO Karpathy + ImageNet val + VQAv2 files written from scikit-image's sample photos, every
# stage, every table and figure, then a check that every row is there (cmapkd.paper_smoke).
# It runs in a copy of this checkout (default scratch/paper_smoke, replaced each time), so the
# workspace's own params and results are never touched.   usage: bash scripts/paper_smoke.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
work="${1:-scratch/paper_smoke}"
case "$(realpath -m "$work")" in
  "$(pwd)") echo "paper_smoke: DIR must not be the project itself" >&2; exit 2 ;;
esac
rm -rf "$work"
mkdir -p "$work"
# the checkout's files as they are now (tracked and untracked, not ignored ones)
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work"
cd "$work"
# the default run's results that git tracks (metrics, ranks, tables, figures) are not this run's
rm -rf dvc.lock reports/metrics reports/ranks reports/tables reports/figures reports/train reports/teacher \
  reports/student_init
dvc config --local core.no_scm true   # the copy is not a git repository
python -m cmapkd.paper_smoke inputs .
cmapkd params --overlay configs/paper.yaml --overlay configs/paper_smoke.yaml --out params.yaml
start=$SECONDS
dvc repro
echo "paper smoke: dvc repro took $((SECONDS - start)) s"
python -m cmapkd.paper_smoke check .
