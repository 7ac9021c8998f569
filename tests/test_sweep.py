"""The loss-weight sweep (issue 17): the report reads `dvc exp show --json` (fast tests on a
recorded structure), and `bash scripts/sweep.sh` runs a two-value sweep through `dvc exp run
--queue` + `dvc queue start` on the quick profile's sizes in a git copy of the checkout (slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cmapkd.report import sweep

ROOT = Path(__file__).resolve().parents[1]


def _exp(name: str, value: float, recalls: dict[int, float], seeds=(0, 1), vqa: float = 0.4) -> dict:
    metrics = {f"reports/metrics/cmapkd-s{s}.json": {"data": {"retrieval_mean": r, "vqa_probe_overall": vqa}}
               for s, r in recalls.items()}
    metrics["reports/metrics/scratch-s0.json"] = {"data": {"retrieval_mean": 0.9, "vqa_probe_overall": 0.9}}
    return {"rev": "0" * 40, "name": name, "error": None,
            "data": {"params": {"params.yaml": {"data": {"seeds": list(seeds), "lambda2": value, "lambda3": 0.3}}},
                     "metrics": metrics}}


def _records(*exps) -> list:
    return [{"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
            {"rev": "1" * 40, "name": "main", "data": {}, "error": None,
             "experiments": [{"executor": None, "name": e["name"], "revs": [e]} for e in exps]}]


def test_collect_means_over_the_experiments_seeds_and_sorts_by_value():
    records = _records(_exp("sweep-lambda2-1.0", 1.0, {0: 0.30, 1: 0.34}),
                       _exp("sweep-lambda2-0.1", 0.1, {0: 0.20, 1: 0.22}),
                       _exp("quick", 0.5, {0: 0.9}),  # not a sweep experiment: ignored
                       _exp("sweep-lambda2-0.5", 0.5, {0: 0.25, 1: 0.25, 2: 0.99}))  # seed 2 is not in its seeds
    pts = sweep.collect(records, ["lambda2"])["lambda2"]
    assert [p.value for p in pts] == [0.1, 0.5, 1.0]
    assert pts[0].mean["retrieval_mean"] == pytest.approx(0.21) and pts[0].std["retrieval_mean"] == pytest.approx(0.02 ** 0.5 / 10)
    assert pts[1].seeds == (0, 1) and pts[1].mean["retrieval_mean"] == pytest.approx(0.25)
    with pytest.raises(sweep.SweepError, match=r"no finished experiment named sweep-lambda3-\*"):
        sweep.collect(records, ["lambda3"])
    broken = _records(_exp("sweep-lambda2-0.1", 0.1, {}))
    with pytest.raises(sweep.SweepError, match=r"sweep-lambda2-0.1: no reports/metrics/cmapkd-s\*\.json"):
        sweep.collect(broken, ["lambda2"])


def test_experiments_are_found_under_every_commit_and_the_newest_run_of_a_name_wins(monkeypatch):
    old = _exp("sweep-lambda2-0.1", 0.1, {0: 0.10, 1: 0.10})
    old["data"]["timestamp"] = "2026-12-01T10:00:00"
    new = _exp("sweep-lambda2-0.1", 0.1, {0: 0.30, 1: 0.30})
    new["data"]["timestamp"] = "2026-12-02T10:00:00"
    calls = []

    def fake_dvc(*args):
        calls.append(args)
        if args[:2] == ("exp", "list"):
            return "aaaaaaa:\n\t1111111 [sweep-lambda2-0.1]\nbbbbbbb:\n\t2222222 [quick]\ncccccc1:\n\t3333333 [sweep-lambda2-0.1]\n"
        return json.dumps(_records(old if args[4] == "aaaaaaa" else new))

    monkeypatch.setattr(sweep, "_dvc", fake_dvc)
    records = sweep.read_experiments(["lambda2"])
    assert [c[4] for c in calls if c[1] == "show"] == ["aaaaaaa", "cccccc1"]  # not the commit with only "quick"
    (pt,) = sweep.collect(records, ["lambda2"])["lambda2"]
    assert pt.mean["retrieval_mean"] == pytest.approx(0.30)


def test_report_marks_the_default_and_writes_every_file(tmp_path: Path):
    records = _records(_exp("sweep-lambda2-0.1", 0.1, {0: 0.20, 1: 0.22}), _exp("sweep-lambda2-0.5", 0.5, {0: 0.25, 1: 0.27}))
    exp_json = tmp_path / "exps.json"
    exp_json.write_text(json.dumps(records))
    out = tmp_path / "sweep"
    assert sweep.main(["--param", "lambda2", "--exp-json", str(exp_json), "--params", str(ROOT / "params.yaml"),
                       "--out", str(out)]) == 0
    md = (out / "sweep.md").read_text()
    assert "| lambda2 | 0.5 (default) | 2 | 26.0 ± 1.4 | 40.0 ± 0.0 |" in md
    assert "| lambda2 | 0.1 | 2 | 21.0 ± 1.4 |" in md
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("param,value,default,n,retrieval_mean_pct") and len(rows) == 3
    assert (out / "sweep.png").stat().st_size > 10_000 and (out / "sweep.pdf").is_file() and (out / "sweep.tex").is_file()
    assert sweep.main(["--param", "lambda9", "--exp-json", str(exp_json), "--params", str(ROOT / "params.yaml"),
                       "--out", str(out)]) == 2


def _quick_overrides() -> list[str]:
    """The quick profile's -S overrides, read from scripts/quick.sh (one source for its sizes)."""
    text = (ROOT / "scripts" / "quick.sh").read_text()
    return [shlex.split(m)[0] for m in re.findall(r"-S ('[^']+')", text)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="DVC experiments need git")
def test_two_value_sweep_through_the_queue_on_quick_sizes(tmp_path: Path):
    """9 minutes on 2 cores: the quick profile's `dvc repro`, then two queued experiments. CI runs it
    after the default suite (.ci/run)."""
    work = tmp_path / "repo"
    work.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    shutil.rmtree(work / "reports" / "metrics", ignore_errors=True)
    (work / "dvc.lock").unlink(missing_ok=True)
    venv = work / ".venv"
    venv.symlink_to(ROOT / ".venv")
    # DVC commits each experiment: give git an identity where the machine has none configured
    env = {"GIT_AUTHOR_NAME": "cmapkd test", "GIT_AUTHOR_EMAIL": "test@cmapkd.invalid",
           "GIT_COMMITTER_NAME": "cmapkd test", "GIT_COMMITTER_EMAIL": "test@cmapkd.invalid"} | dict(os.environ)
    run = lambda *cmd: subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1500)  # noqa: E731
    sets = [a for o in _quick_overrides() for a in ("-S", o)]
    r = run(str(venv / "bin" / "cmapkd"), "params", *sets, "--out", "params.yaml")
    assert r.returncode == 0, r.stderr
    r = run("git", "init", "-q")
    assert r.returncode == 0, r.stderr
    with (work / ".git" / "info" / "exclude").open("a") as f:
        f.write(".venv\n")  # a symlink here: /.venv/ in .gitignore matches only a directory
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "quick"]):
        r = run(*cmd)
        assert r.returncode == 0, r.stderr
    r = run("bash", "-c", "source .venv/bin/activate && dvc repro -q")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before = (work / "reports" / "metrics" / "cmapkd-s0.json").read_text()
    r = run("bash", "scripts/sweep.sh", "lambda2=0.1,1.0")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (work / "reports" / "metrics" / "cmapkd-s0.json").read_text() == before  # the workspace's results stay
    assert yaml.safe_load((work / "params.yaml").read_text())["lambda2"] == 0.5
    md = (work / "reports" / "sweep" / "sweep.md").read_text()
    assert re.search(r"\| lambda2 \| 0\.1 \| 1 \| \d+\.\d \|", md) and re.search(r"\| lambda2 \| 1 \| 1 \| \d+\.\d \|", md)
    assert (work / "reports" / "sweep" / "sweep.png").is_file()
