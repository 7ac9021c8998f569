"""Loss-weight sensitivity from a DVC experiment sweep (`bash scripts/sweep.sh`, issue 17).

The sweep queues one experiment per value (`dvc exp run --queue -n sweep-<param>-<value> -S
<param>=<value>`) and runs them with `dvc queue start`; this module reads the finished
experiments from `dvc exp show --json` and writes, for every swept param, CMAPKD's test mean
recall and VQA probe accuracy (mean +- sample std over the training seeds of the experiment)
against the value, with the params.yaml default marked:

    reports/sweep/sweep.{md,csv,tex}   one row per (param, value)
    reports/sweep/sweep.{png,pdf}      one column of panels per param

`python -m cmapkd.report.sweep --param lambda2 [--param lambda3] [--exp-json FILE] --out reports/sweep`
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

PREFIX = "sweep"
METRICS = (("retrieval_mean", "CMAPKD test mean recall (%)"), ("vqa_probe_overall", "CMAPKD VQA probe (%)"))
_CMAPKD = re.compile(r"^reports/metrics/cmapkd-s(?P<seed>\d+)\.json$")
_SCRATCH = re.compile(r"^reports/metrics/scratch-s(?P<seed>\d+)\.json$")


class SweepError(ValueError):
    """The experiments needed for the report are missing or malformed (the message says which)."""


def exp_name(param: str, value: str) -> str:
    """The experiment name of one sweep point (a valid git ref name)."""
    return f"{PREFIX}-{param}-{value}".replace("/", "-")


@dataclass(frozen=True)
class Point:
    param: str
    value: float
    experiment: str
    seeds: tuple[int, ...]
    mean: dict[str, float]  # metric -> mean over seeds (fraction)
    std: dict[str, float | None]  # None with one seed
    scratch: dict[str, float] | None = None  # Scratch's mean over the same seeds (a reference line), if run


def _get(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SweepError(f"params.yaml has no key '{dotted}'")
        node = node[part]
    return node


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    m = math.fsum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _experiments(records: list) -> list[dict]:
    """Every experiment's data dict (name added) from `dvc exp show --json` output; an experiment
    name found under several commits keeps its newest run."""
    out: dict[str, dict] = {}
    for baseline in records:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data")
                if rev.get("name") and data:
                    e = {"name": rev["name"], **data, "error": rev.get("error")}
                    if rev["name"] not in out or str(e.get("timestamp") or "") > str(out[rev["name"]].get("timestamp") or ""):
                        out[rev["name"]] = e
    return list(out.values())


def _dvc(*args: str) -> str:
    r = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SweepError(f"dvc {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def read_experiments(params: list[str]) -> list:
    """`dvc exp show --json` records of every commit that has experiments of this sweep (found with
    `dvc exp list -A`): a sweep run before the last commit is still found, without the minutes
    that `dvc exp show -A` spends on every commit of the history."""
    revs, rev = [], None
    for line in _dvc("exp", "list", "-A").splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            rev = line.strip()[:-1]
        elif rev and any(f"[{PREFIX}-{p}-" in line for p in params) and rev not in revs:
            revs.append(rev)
    records = []
    for rev in revs:
        records += json.loads(_dvc("exp", "show", "--json", "--rev", rev, "-n", "1"))
    return records


def collect(records: list, params: list[str]) -> dict[str, list[Point]]:
    """param -> its sweep points (sorted by value) from `dvc exp show --json` records."""
    exps = _experiments(records)
    found: dict[str, list[Point]] = {p: [] for p in params}
    for e in exps:
        for p in params:
            if not e["name"].startswith(f"{PREFIX}-{p}-"):
                continue
            if e.get("error"):
                raise SweepError(f"experiment {e['name']}: {e['error']}")
            values = (e.get("params") or {}).get("params.yaml", {}).get("data") or {}
            runs, scratch_runs = {}, {}
            for path, m in (e.get("metrics") or {}).items():
                for pattern, into in ((_CMAPKD, runs), (_SCRATCH, scratch_runs)):
                    hit = pattern.match(path)
                    if hit and m.get("data"):
                        into[int(hit["seed"])] = m["data"]
            seeds = [s for s in _get(values, "seeds") if s in runs]
            if not seeds:
                raise SweepError(f"experiment {e['name']}: no reports/metrics/cmapkd-s*.json of its seeds {_get(values, 'seeds')}")
            mean, std = {}, {}
            for key, _ in METRICS:
                mean[key], std[key] = _mean_std([float(runs[s][key]) for s in seeds])
            scratch = None
            if all(s in scratch_runs for s in seeds):
                scratch = {key: _mean_std([float(scratch_runs[s][key]) for s in seeds])[0] for key, _ in METRICS}
            found[p].append(Point(p, float(_get(values, p)), e["name"], tuple(seeds), mean, std, scratch))
    for p, pts in found.items():
        if not pts:
            raise SweepError(f"no finished experiment named {PREFIX}-{p}-* (run scripts/sweep.sh {p}=...)")
        pts.sort(key=lambda x: x.value)
    return found


def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def write_report(points: dict[str, list[Point]], defaults: dict[str, float], out_dir: str | Path) -> list[Path]:
    """The table (md, csv, tex) and the figure (png, pdf) of the sweep; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = ["param", "value", "default", "n", *(k for key, _ in METRICS for k in (f"{key}_pct", f"{key}_pct_std")), "experiment"]
    rows = []
    for p, pts in points.items():
        for x in pts:
            rows.append([p, f"{x.value:g}", "yes" if math.isclose(x.value, defaults[p]) else "", len(x.seeds),
                         *(v for key, _ in METRICS for v in (f"{100 * x.mean[key]:.4f}",
                                                             "" if x.std[key] is None else f"{100 * x.std[key]:.4f}")),
                         x.experiment])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    files = [out / "sweep.csv"]
    files[0].write_text(buf.getvalue(), encoding="utf-8")
    caption = ("Loss-weight sensitivity of CMAPKD: test mean recall and VQA probe accuracy (%), mean ± sample "
               "std over the training seeds of each experiment (n), one weight changed at a time from the "
               "params.yaml default (marked); every other param as in params.yaml. Each value is a DVC "
               "experiment (`dvc exp show` lists it).")
    md = [f"**Sweep.** {caption}", "", "| Param | Value | n | Mean recall | VQA probe |", "|:--|--:|--:|--:|--:|"]
    tex = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{llrrr}", r"\toprule",
           r"Param & Value & n & Mean recall & VQA probe \\", r"\midrule"]
    for p, pts in points.items():
        for x in pts:
            mark = " (default)" if math.isclose(x.value, defaults[p]) else ""
            cells = [_pct(x.mean[k], x.std[k]) for k, _ in METRICS]
            md.append(f"| {p} | {x.value:g}{mark} | {len(x.seeds)} | {cells[0]} | {cells[1]} |")
            tex.append(f"{p.replace('_', chr(92) + '_')} & {x.value:g}{mark} & {len(x.seeds)} & "
                       + " & ".join(c.replace("±", r"$\pm$") for c in cells) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}", r"\caption{" + caption.replace("`", "").replace("±", r"$\pm$") + "}",
            r"\label{tab:sweep}", r"\end{table}"]
    (out / "sweep.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "sweep.tex").write_text("\n".join(tex) + "\n", encoding="utf-8")
    files += [out / "sweep.md", out / "sweep.tex"]
    files += _figure(points, defaults, out)
    return files


def _figure(points: dict[str, list[Point]], defaults: dict[str, float], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "cmapkd", "pdf.compression": 6})
    cols = len(points)
    fig, axes = plt.subplots(len(METRICS), cols, figsize=(max(4.8, 3.6 * cols), 5.6), squeeze=False, sharex="col")
    for j, (p, pts) in enumerate(points.items()):
        xs = [x.value for x in pts]
        for i, (key, label) in enumerate(METRICS):
            ax = axes[i][j]
            ys = [100 * x.mean[key] for x in pts]
            err = [0.0 if x.std[key] is None else 100 * x.std[key] for x in pts]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color="#4477AA")
            ax.axvline(defaults[p], color="#EE6677", linestyle="--", linewidth=1, label="params.yaml default")
            ref = [x.scratch[key] for x in pts if x.scratch]
            if ref:  # Scratch does not depend on the loss weights: one level, the mean over experiments
                ax.axhline(100 * sum(ref) / len(ref), color="#228833", linestyle=":", linewidth=1.2, label="Scratch (same seeds)")
            if i == len(METRICS) - 1:
                ax.set_xlabel(p)
            if j == 0:
                ax.set_ylabel(label)
            if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    n = sorted({len(x.seeds) for pts in points.values() for x in pts})
    fig.suptitle(f"CMAPKD sensitivity to the loss weights\n(mean ± std over {'/'.join(map(str, n))} seeds per value)", fontsize=10)
    fig.tight_layout()
    files = []
    for ext in ("png", "pdf"):
        path = out / f"sweep.{ext}"
        fig.savefig(path, dpi=150, metadata={"Software": None} if ext == "png" else {"CreationDate": None, "Producer": None})
        files.append(path)
    plt.close(fig)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmapkd.report.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--param", action="append", required=True, help="a swept params key (repeatable)")
    ap.add_argument("--exp-json", default=None, help="saved `dvc exp show --json` output (default: ask dvc)")
    ap.add_argument("--params", default="params.yaml", help="params file with the defaults (default: params.yaml)")
    ap.add_argument("--out", default="reports/sweep", help="output folder")
    args = ap.parse_args(argv)
    try:
        if args.exp_json:
            records = json.loads(Path(args.exp_json).read_text(encoding="utf-8"))
        else:
            records = read_experiments(args.param)
        base = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
        defaults = {p: float(_get(base, p)) for p in args.param}
        points = collect(records, args.param)
    except (SweepError, OSError, json.JSONDecodeError) as e:
        print(f"sweep report: {e}", file=sys.stderr)
        return 2
    files = write_report(points, defaults, args.out)
    print((Path(args.out) / "sweep.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
