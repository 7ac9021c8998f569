"""Training runs end to end on a tiny EmojiScenes: the distill stage entry point chains stages
through --init, writes what DVC expects, is deterministic per seed, the online teacher matches the
cached one, baselines and ablations plan the right work, and bad inputs are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_fixtures import emoji_params
from safetensors.torch import load_file

from cmapkd.config import AblationVariant, SplitSizes, apply_overrides, load_params, read_params_file
from cmapkd.data.build import build_dataset
from cmapkd.distill import runs as R

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "teacher.epochs=2", "teacher.batch_size=16", "teacher.feature_batch_size=32",
    "cache_teacher.batch_size=32", "distill.batch_size=16", "distill.ckpt_every=0", "distill.eval_batch_size=64",
    "distill.stage1.epochs=1", "distill.stage2.epochs=1", "distill.stage3.epochs=1",
    "distill.stage4.policy_epochs=1", "distill.stage4.joint_epochs=1", "teacher.splits=[train]",
    "student_init.epochs=2", "student_init.batch_size=16", "student_init.feature_batch_size=32",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny data set, a teacher (2 epochs of heads) and its cache, in a project-like folder."""
    base = tmp_path_factory.mktemp("runs")
    build_dataset(emoji_params(0, splits=SplitSizes(train=32, val=16, test=4), zeroshot_emoji=0, fashion_mnist=0,
                               vqa_per_image=1), base / "data", progress=False)
    raw = apply_overrides(read_params_file(ROOT / "params.yaml"), TINY, ROOT / "params.yaml")
    (base / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from cmapkd.stages.cache_teacher import main as cache_main
    from cmapkd.stages.teacher import main as teacher_main

    assert teacher_main(["--params", str(base / "params.yaml"), "--data", str(base / "data"), "--out",
                         str(base / "teacher"), "--metrics", str(base / "teacher.json"), "--no-progress"]) == 0
    assert cache_main(["--params", str(base / "params.yaml"), "--data", str(base / "data"), "--teacher",
                       str(base / "teacher"), "--out", str(base / "cache"), "--no-progress"]) == 0
    assert teacher_main(["--role", "student", "--params", str(base / "params.yaml"), "--data", str(base / "data"),
                         "--out", str(base / "student_init"), "--metrics", "", "--no-progress"]) == 0
    return base


def distill(project: Path, *args: str, params: str = "params.yaml") -> int:
    from cmapkd.stages.distill import main

    return main(["--params", str(project / params), "--data", str(project / "data"), "--teacher",
                 str(project / "teacher"), "--cache", str(project / "cache"), "--scratch", str(project / "scratch"),
                 "--student-init", str(project / "student_init"),
                 "--live", str(project / "dvclive"), "--no-progress", *args])


def test_stages_chain_through_init_and_write_dvc_outputs(project):
    out1, out2 = project / "models/cmapkd-stage1-s0", project / "models/cmapkd-stage2-s0"
    assert distill(project, "--run", "stage1", "--out", str(out1), "--metrics", str(project / "m1.json")) == 0
    assert distill(project, "--run", "stage2", "--init", str(out1), "--out", str(out2)) == 0
    s1 = json.loads((project / "m1.json").read_text())
    assert s1 == json.loads((out1 / "summary.json").read_text())
    assert s1["method"] == "cmapkd" and s1["seed"] == 0 and s1["steps"] == 2  # 32 images / batch 16, 1 epoch
    assert s1["vis_levels"] == [4] and s1["txt_levels"] == [4]
    assert 0.0 <= s1["val"]["retrieval_mean"] <= 1.0
    # DVCLive wrote every loss term per step under dvclive/<model>/ for `dvc plots`
    tsv = project / "dvclive/cmapkd-stage1-s0/plots/metrics/loss/intra_v.tsv"
    assert tsv.is_file() and len(tsv.read_text().splitlines()) == 1 + 2
    # stage 2 started from stage 1: the weights moved on from there, the summary records the init
    a, b = load_file(str(out1 / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert set(a) == set(b) and not any(k.startswith("teacher.") for k in a)
    assert any(not (a[k] == b[k]).all() for k in a if k.startswith("student."))


def test_same_seed_same_bytes_other_seed_other_weights(project):
    outs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = project / f"models/seedcheck-{tag}"
        assert distill(project, "--run", "scratch", "--seed", str(seed), "--out", str(out)) == 0
        outs[tag] = load_file(str(out / "model.safetensors"))
    assert all((outs["a"][k] == outs["b"][k]).all() for k in outs["a"])
    assert any(not (outs["a"][k] == outs["c"][k]).all() for k in outs["a"])


def test_online_teacher_matches_cached_targets(project):
    """The online teacher computes what the cache stored (fp16), so the first-step losses agree."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["distill"]["teacher_mode"] = "online"
    (project / "online.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cached, online = project / "models/cached", project / "models/online"
    assert distill(project, "--run", "stage1", "--out", str(cached)) == 0
    assert distill(project, "--run", "stage1", "--out", str(online), params="online.yaml") == 0
    first = [json.loads((o / "summary.json").read_text()) for o in (cached, online)]
    runs = [project / f"dvclive/{o.name}/plots/metrics/loss/total.tsv" for o in (cached, online)]
    step1 = [float(r.read_text().splitlines()[1].split("\t")[-1]) for r in runs]
    assert step1[0] == pytest.approx(step1[1], rel=2e-3)
    assert first[0]["steps"] == first[1]["steps"]


def test_stage_without_init_or_with_wrong_cache_is_a_clear_error(project, capsys):
    assert distill(project, "--run", "stage2", "--out", str(project / "models/x")) == 2
    assert "stage1" in capsys.readouterr().err
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["cache_teacher"]["num_views"] = 3  # the cache holds 2 views
    (project / "views3.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert distill(project, "--run", "stage1", "--out", str(project / "models/y"), params="views3.yaml") == 2
    assert "num_views" in capsys.readouterr().err
    assert distill(project, "--ablation", "nosuch", "--out", str(project / "models/z")) == 2
    assert "nosuch" in capsys.readouterr().err


def test_ablations_rerun_only_the_stages_they_change():
    params = load_params(None, ROOT / "params.yaml")
    starts = {}
    for name, variant in params.ablations.items():
        runs = R.chain(variant)
        starts[name] = next((r for r in runs if R.variant_changes_stage(params, variant, r)), runs[-1])
    # stage 1 distils P5 / L4 only, so "P5 only" and "L4 only" first differ at stage 2
    assert starts == {"p5only": "stage2", "l4only": "stage2", "uniform": "stage4b", "manual": "stage4b",
                      "noalign": "stage1", "norelation": "stage1", "onestage": "onestage"}
    assert R.chain(params.ablations["uniform"]) == ["stage1", "stage2", "stage3", "stage4b"]
    p = R.plan(params, "stage3", params.ablations["p5only"])
    assert p.vis_levels == [4] and p.txt_levels == [1, 2, 3, 4]
    assert "align_single" not in R.plan(params, "stage1", params.ablations["noalign"]).terms
    one = R.plan(params, "onestage", params.ablations["onestage"])
    assert one.epochs == R.student_epochs(params.distill) + params.distill.stage4.policy_epochs
    with pytest.raises(ValueError, match="unknown loss term"):
        R.plan(params, "stage1", AblationVariant(drop_terms=["intra_x"]))


def test_baselines_get_the_student_update_budget_of_cmapkd():
    params = load_params(None, ROOT / "params.yaml")
    d = params.distill
    budget = d.stage1.epochs + d.stage2.epochs + d.stage3.epochs + d.stage4.joint_epochs
    for name in params.baselines.methods:
        assert R.plan(params, name).epochs == budget, name


def test_ablation_chain_reuses_the_main_chain(project):
    """"uniform" starts from the main chain's stage 3 and trains only stage 4b."""
    main = {}
    prev = None
    for stage in ("stage1", "stage2", "stage3"):
        out = project / f"models/main-{stage}"
        args = ["--run", stage, "--out", str(out)] + (["--init", str(prev)] if prev else [])
        assert distill(project, *args) == 0
        main[stage], prev = out, out
    out = project / "models/abl-uniform"
    assert distill(project, "--ablation", "uniform", "--main-chain", str(project / "models/main-{}"),
                   "--out", str(out)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["started_at"] == "stage4b" and s["run"] == "stage4b" and s["level_weights"] == "uniform"


def test_finished_ablation_chain_leaves_no_intermediates_and_reuse_keys_track_the_cache(project, tmp_path):
    """A chain's intermediate stages serve only a resume after an interruption: once the chain has
    finished they are gone (a later run, e.g. after a code change, cannot reuse them), and their
    reuse key changes with the teacher cache."""
    from cmapkd.config import AblationVariant, load_params
    from cmapkd.distill.runs import _reuse_key

    main1 = project / "models/main2-stage1"
    assert distill(project, "--run", "stage1", "--out", str(main1)) == 0
    out = project / "models/abl-p5only"
    assert distill(project, "--ablation", "p5only", "--main-chain", str(project / "models/main2-{}"),
                   "--out", str(out)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["started_at"] == "stage2" and s["run"] == "stage4b"
    assert not list((project / "scratch" / "abl-p5only").glob("out-*"))

    params = load_params(["seed", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4"],
                         path=project / "params.yaml")
    a, b = tmp_path / "a", tmp_path / "b"
    for d, text in ((a, '{"teacher": 1}'), (b, '{"teacher": 2}')):
        d.mkdir()
        (d / "identity.json").write_text(text)
    key = lambda c: _reuse_key(params, "stage2", AblationVariant(vis_levels=[4]), main1, c)  # noqa: E731
    assert key(a) == key(a) != key(b)
