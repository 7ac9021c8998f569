"""The DVC pipeline's dependency structure: `dvc exp run -S lambda2=0.3` must re-run exactly the
stages that use lambda2 (and what reads their outputs), never the data, teacher, cache or the
baselines; every training stage writes a model, DVCLive logs and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        out = {}
        for st in repo.index.stages:
            params = [k for d in st.deps if d.__class__.__name__ == "ParamsDependency" for k in d.params]
            paths = [d.def_path for d in st.deps if d.__class__.__name__ != "ParamsDependency"]
            out[st.addressing] = {"params": params, "deps": paths, "outs": [o.def_path for o in st.outs]}
        return out


def downstream(stages: dict, roots: set[str]) -> set[str]:
    """Stages that use `roots`' outputs, transitively (a dep equal to or inside an out)."""
    changed = set(roots)
    while True:
        outs = [o for s in changed for o in stages[s]["outs"]]
        more = {name for name, s in stages.items() if name not in changed and any(
            d == o or d.startswith(o.rstrip("/") + "/") or o.startswith(d.rstrip("/") + "/")
            for d in s["deps"] for o in outs)}
        if not more:
            return changed
        changed |= more


def test_lambda2_reruns_only_cmapkd_and_what_reads_it(stages):
    direct = {n for n, s in stages.items() if "lambda2" in s["params"]}
    rerun = downstream(stages, direct)
    assert {"stage1@0", "stage4b@1", "ablation@uniform", "evaluate_cmapkd@1", "tables", "figures"} <= rerun
    kinds = {n.split("@")[0] for n in rerun}
    assert not kinds & {"prepare", "teacher", "cache_teacher", "baseline", "evaluate_baseline", "evaluate_teacher"}


def test_a_baseline_setting_reruns_only_that_baseline(stages):
    """Each baseline stage records its own method's section only (a small dvc.lock, fewer re-runs):
    `-S baselines.kd.lr=3e-4` re-runs KD's runs and what reads them, no other method."""
    seeds = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())["seeds"]
    direct = {n for n, s in stages.items() if "baselines.kd" in s["params"]}
    assert direct == {f"baseline@kd-{s}" for s in seeds}
    rerun = downstream(stages, direct)
    assert rerun == direct | {f"evaluate_baseline@kd-{s}" for s in seeds} | {"tables"}
    for n, s in stages.items():
        assert "baselines" not in s["params"] and "model" not in s["params"], n  # whole sections
        if n.startswith(("baseline@", "stage", "ablation@", "evaluate_baseline@", "evaluate_cmapkd@")):
            # the teacher reaches them through models/teacher and the cache, not its params
            assert "model.teacher" not in s["params"] and "models/teacher" in s["deps"], n


def test_every_training_stage_has_a_model_live_logs_and_metrics(stages):
    train = [n for n in stages if n.split("@")[0] in ("stage1", "stage2", "stage3", "stage4a", "stage4b",
                                                       "baseline", "ablation")]
    params = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())
    n_seeds, n_methods = len(params["seeds"]), len(params["baselines"]["methods"])
    assert len(train) == 5 * n_seeds + n_methods * n_seeds + len(params["ablation_runs"])
    for n in train:
        outs = stages[n]["outs"]
        assert any(o.startswith("models/") for o in outs) and any(o.startswith("dvclive/") for o in outs), n
    evaluated = {n.split("@")[1] for n in stages if n.startswith("evaluate_baseline@")}
    assert evaluated == {f"{m}-{s}" for m in params["baselines"]["methods"] for s in params["seeds"]}


def test_lock_holds_only_the_pipelines_stages(stages):
    """DVC never drops the dvc.lock entry of a stage that left the pipeline (a seed or method
    removed from params.yaml), and after every stage it re-parses and rewrites the whole lock
    (~5 s per stage for 12,000 lines on 2 cores, README Known limits): stale entries cost every
    `dvc repro` time, so the committed lock must not carry them."""
    lock = __import__("yaml").safe_load((ROOT / "dvc.lock").read_text())["stages"]
    stale = sorted(set(lock) - set(stages))
    assert not stale, f"dvc.lock has entries of stages no longer in dvc.yaml: {stale}"
