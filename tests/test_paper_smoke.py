"""The paper setting end to end (issue 16): `bash scripts/paper_smoke.sh` runs the whole DAG with
configs/paper.yaml + configs/paper_smoke.yaml on the packaged photos, and its check fails when a
metrics file, table row or figure is missing. About 3 minutes on 2 cores."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cmapkd import paper_smoke
from cmapkd.config import ParamsError, load_params, write_params

ROOT = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_params_merges_overlays_in_order_and_checks_keys(tmp_path: Path):
    out = tmp_path / "params.yaml"
    p = write_params(out, ROOT / "params.yaml", [ROOT / "configs" / "paper.yaml", ROOT / "configs" / "paper_smoke.yaml"],
                     ["lambda2=0.3"])
    assert p.setting == "paper" and p.prepare.format == "coco_karpathy"
    assert p.prepare.resolution == 64  # paper_smoke.yaml (last) wins over paper.yaml's 224
    assert p.model.student.open_clip_model == "CMAPKD-Tiny-8-64"
    assert tuple(p.model.student.trainable_blocks) == (-1, -1)  # from paper.yaml, untouched by the smoke overlay
    assert p.lambda2 == 0.3 and load_params(path=out).lambda2 == 0.3
    assert out.read_text().startswith("# written by `cmapkd params`")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  student:\n    open_clip_modle: ViT-B-16\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml.*open_clip_modle"):
        write_params(tmp_path / "never.yaml", ROOT / "params.yaml", [bad])
    assert not (tmp_path / "never.yaml").exists() and not list(tmp_path.glob(".never*"))


def test_params_command_writes_the_paper_params(tmp_path: Path, capsys):
    """`cmapkd params --overlay configs/paper.yaml -S ... --out params.yaml`: README's step 3."""
    from cmapkd.cli import main as cli_main

    out = tmp_path / "params.yaml"
    argv = ["params", "--file", str(ROOT / "params.yaml"), "--overlay", str(ROOT / "configs" / "paper.yaml"),
            "-S", "prepare.paper.karpathy_json=/data/coco/dataset_coco.json", "--out", str(out)]
    assert cli_main(argv) == 0
    p = load_params(path=out)
    assert p.prepare.paper.karpathy_json == "/data/coco/dataset_coco.json" and p.prepare.resolution == 224
    assert p.evaluate.zeroshot == ["imagenet"] and p.model.teacher.open_clip_model == "ViT-L-14-quickgelu"
    assert cli_main([*argv[:-2], "-S", "prepare.paper.karpathy_jsn=x", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "karpathy_jsn" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()


def test_check_names_what_is_missing(tmp_path: Path):
    write_params(tmp_path / "params.yaml", ROOT / "params.yaml", [ROOT / "configs" / "paper.yaml", ROOT / "configs" / "paper_smoke.yaml"])
    (tmp_path / "reports" / "tables").mkdir(parents=True)
    with (tmp_path / "reports" / "tables" / "table2.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "model", "method", "role", "n", "seeds", "mean_pct", "mean_pct_std"])
        w.writerow([0, "teacher", "Teacher", "teacher", 1, 0, "", ""])
    problems = paper_smoke.check_outputs(tmp_path)
    assert "reports/metrics/cmapkd-s0.json missing" in problems
    assert "reports/metrics/abl-onestage.json missing" in problems
    assert any(p.startswith("reports/tables/table2.csv: rows ['teacher'], expected ['teacher', 'student_init'") for p in problems)
    assert "reports/tables/table2.csv: row 'teacher', column 'mean_pct' is '', not a number" in problems
    assert "reports/tables/table3.csv missing" in problems
    assert "reports/figures/fig4_alsn_radar.png missing" in problems


@pytest.mark.skipif(shutil.which("git") is None, reason="the script copies the checkout with git ls-files")
def test_paper_smoke_runs_the_whole_dag(tmp_path: Path):
    params_before = _digest(ROOT / "params.yaml")
    lock_before = _digest(ROOT / "dvc.lock")
    work = tmp_path / "paper_smoke"
    # as a user runs it: stages warm-started (conftest turns that off for the other tests; cold, the
    # ~50 stage processes would spend ~4 minutes importing torch), the server gone soon after
    env = {k: v for k, v in os.environ.items() if k != "CMAPKD_WARM"} | {"CMAPKD_WARM_IDLE": "10"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "paper_smoke.sh"), str(work)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "every metrics file, table row and figure is there" in r.stdout
    # the workspace's own params and lock are untouched
    assert _digest(ROOT / "params.yaml") == params_before and _digest(ROOT / "dvc.lock") == lock_before
    # the paper code path: COCO Karpathy test split, ImageNet zero-shot, open_clip ViTs from checkpoint files
    table2 = (work / "reports" / "tables" / "table2.md").read_text()
    assert "on the COCO (Karpathy test split)" in table2
    table3 = (work / "reports" / "tables" / "table3.md").read_text()
    assert "ImageNet-1k Top-1" in table3 and "open_clip's 7 simple prompt templates" in table3
    info = json.loads((work / "data" / "processed" / "emojiscenes" / "info.json").read_text())
    assert info["counts"]["splits"] == {"train": 48, "val": 16, "test": 32}
    assert info["counts"]["zeroshot"] == {"imagenet": 72}  # 6 photos with an ImageNet class x 12 crops
    assert info["counts"]["vqa_questions"]["test"] == 3 * 32
    spec = json.loads((work / "models" / "student_init" / "spec.json").read_text())
    assert "smoke_inputs/weights/student.safetensors" in json.dumps(spec)
    metrics = json.loads((work / "reports" / "metrics" / "cmapkd-s0.json").read_text())
    assert metrics["seed"] == 0 and 0.0 <= metrics["retrieval_mean"] <= 1.0
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["setting"] == "paper" and params["model"]["teacher"]["open_clip_model"] == "CMAPKD-Small-8-64"
