#!/usr/bin/env bash
# Loss-weight sensitivity through DVC's experiment queue (issue 17; README "Loss-weight sensitivity", docs/reports.md "The loss-weight sweep"):
#   bash scripts/sweep.sh [PARAM=V1,V2,... ...] [-- extra `dvc exp run` arguments]
# Default: lambda2=0.1,0.25,0.5,1.0. Each value of each PARAM (any params.yaml key, one changed at a
# time) becomes an experiment `sweep-PARAM-VALUE` (`dvc exp run --queue -S PARAM=VALUE`), run one
# at a time by `dvc queue start` in DVC's temporary workspaces: the workspace's own params and
# results are never changed, and stages a value does not touch come from the DVC cache (run
# `dvc repro` first). The experiments skip the ablations and the stage evaluations (ablation_runs=[],
# stage_evals=[]): the sweep reads CMAPKD's own rows. Then `python -m cmapkd.report.sweep` writes
# reports/sweep/sweep.{md,csv,tex,png,pdf} from `dvc exp show --json`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
sweeps=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    *=*) sweeps+=("$1"); shift ;;
    *) echo "sweep: expected PARAM=V1,V2,... (or -- then dvc exp run arguments), got '$1'" >&2; exit 2 ;;
  esac
done
[ ${#sweeps[@]} -gt 0 ] || sweeps=("lambda2=0.1,0.25,0.5,1.0")
# DVC commits every experiment: without a git identity on this machine, use a neutral one
if [ -z "$(git config user.name || true)" ] && [ -z "${GIT_AUTHOR_NAME:-}" ]; then
  export GIT_AUTHOR_NAME="cmapkd sweep" GIT_AUTHOR_EMAIL="sweep@cmapkd.invalid"
  export GIT_COMMITTER_NAME="cmapkd sweep" GIT_COMMITTER_EMAIL="sweep@cmapkd.invalid"
fi
restrict=(-S 'ablation_runs=[]' -S 'stage_evals=[]')
params=()
names=()
for s in "${sweeps[@]}"; do
  p="${s%%=*}"
  IFS=, read -ra values <<< "${s#*=}"
  params+=(--param "$p")
  for v in "${values[@]}"; do
    # a typo in the key or a value of the wrong type stops here, before anything is queued
    cmapkd params -S "$p=$v" "${restrict[@]}" >/dev/null
    name="sweep-$p-$v"
    # an earlier sweep's experiment and queue entry of the same name
    dvc exp remove "$name" >/dev/null 2>&1 || true
    dvc queue remove "$name" >/dev/null 2>&1 || true
    dvc exp run --queue -n "$name" -S "$p=$v" "${restrict[@]}" ${extra[@]+"${extra[@]}"}
    names+=("$name")
  done
done
start=$SECONDS
dvc queue start -j 1
# the status of each of this sweep's experiments (empty while `dvc queue status` cannot answer, e.g.
# while the worker holds DVC's lock)
status_of() { grep -E "^[0-9a-f]+ +$1 " <<< "$2" | awk '{print $NF}'; }
restarts=0
while true; do
  # every `dvc queue status` writes a message to the worker's mailbox; poll slowly (see below)
  sleep 30
  out=$(dvc queue status 2>/dev/null) || continue
  done_n=0
  for name in "${names[@]}"; do
    case "$(status_of "$name" "$out")" in Success|Failed) done_n=$((done_n + 1)) ;; esac
  done
  echo "sweep: $done_n of ${#names[@]} experiments finished, $((SECONDS - start)) s"
  [ "$done_n" -lt "${#names[@]}" ] || break
  # celery's filesystem broker can read a mailbox message while it is still being written; the
  # worker then stops ("Unrecoverable error: JSONDecodeError" in .dvc/tmp/exps/celery/*.out) after
  # its current experiment and leaves the rest queued. Start a new worker for them.
  if grep -q "Worker status: 0 active, 0 idle" <<< "$out"; then
    [ "$restarts" -lt 5 ] || { echo "sweep: the queue worker stopped 5 times; see .dvc/tmp/exps/celery/" >&2; exit 1; }
    restarts=$((restarts + 1))
    echo "sweep: the queue worker stopped with experiments still queued; starting it again ($restarts)"
    dvc queue start -j 1
  fi
done
failed=0
for name in "${names[@]}"; do
  if [ "$(status_of "$name" "$out")" = Failed ]; then
    echo "sweep: experiment $name failed; its log:" >&2
    dvc queue logs "$name" >&2 || true
    failed=1
  fi
done
[ $failed = 0 ] || exit 1
echo "sweep: ${#names[@]} experiments in $((SECONDS - start)) s"
python -m cmapkd.report.sweep "${params[@]}" --out reports/sweep
