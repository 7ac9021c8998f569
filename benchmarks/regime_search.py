"""Regime and learning-rate search for the embedded default: which pretrained student, what trains,
how fast, and whether any method moves it. Trains candidate regimes on the train split with the
pipeline's own training runs (`cmapkd.distill.runs.run`: the same loop, losses, cache and schedule
as `dvc repro`) and scores each on the val split, printing one Markdown table:

    student | what trains | method | lr | steps | batch | ms/step | val mean recall (mean +- std over seeds)
    | val image cos (mean pairwise cosine of the val image embeddings: > 0.5 is a partial collapse)

plus the val mean recall of the student at start (no training) for every candidate.

    python benchmarks/regime_search.py                    # the regime table (docs/regime_search.md)
    python benchmarks/regime_search.py --lr-search        # every method x the lr grid (docs/lr_search.md)
    python benchmarks/regime_search.py --from-json A.json B.json   # method x lr table of saved runs
                                                          # (a cell in B replaces the same cell in A)
    python benchmarks/regime_search.py --candidates default --methods c2kd --lrs 1e-3 --seeds 0 \
        --set baselines.c2kd.proxy_weight=0                # one question (docs/regime_search.md, "Diagnosis")
    python benchmarks/regime_search.py --candidates default --methods cmapkd --lrs 3e-4 \
        --term-sets task intra_v,task                       # CMAPKD's chain with subsets of its loss terms

Candidates are params overrides on top of params.yaml (`CANDIDATES`); a candidate whose student
differs from params.yaml's gets its own `student_init` (the same routine as the DVC stage) and,
when its resolution differs, its own teacher cache, both under --work. The teacher is
`models/teacher` (run `dvc repro cache_teacher` first). CMAPKD runs its whole progressive chain
(stages 1, 2, 3, 4a, 4b); the others their one run with as many student updates. The lr of a row
is the peak lr of every trained group of a baseline; for CMAPKD it is stage 1's lr, and the later
stages keep params.yaml's ratios to it (stage 2 2/3, stage 3 1/3, stage 4b 1/6; the ALSN's own lrs
unchanged). Runs share nothing but the data, the teacher and the cache; each is seeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> (what the student is, what trains, params overrides)
CANDIDATES: dict[str, tuple[str, str, list[str]]] = {
    "default": ("params.yaml student", "params.yaml", []),
    "heads": ("Lite0 @ 64 px + MiniLM L1-3", "heads only", ["model.student.trainable_blocks=[0,0]"]),
    "last2": ("Lite0 @ 64 px + MiniLM L1-3", "heads + last 2 blocks of both towers", ["model.student.trainable_blocks=[2,2]"]),
    "img2": ("Lite0 @ 64 px + MiniLM L1-3", "heads + last 2 image blocks", ["model.student.trainable_blocks=[2,0]"]),
    "img2txt1": ("Lite0 @ 64 px + MiniLM L1-3", "heads + last 2 image blocks + last text layer",
                 ["model.student.trainable_blocks=[2,1]"]),
    "all": ("Lite0 @ 64 px + MiniLM L1-3", "everything", ["model.student.trainable_blocks=[-1,-1]"]),
    "last2-96": ("Lite0 @ 96 px + MiniLM L1-3", "heads + last 2 blocks of both towers",
                 ["model.student.image_size=96", "model.student.trainable_blocks=[2,2]"]),
}
METHODS = ("scratch", "kd", "clipkd", "cmapkd")
ALL_METHODS = ("scratch", "kd", "fitnet", "clipkd", "promptkd", "c2kd", "llavakd", "cmapkd")
CHAIN = ("stage1", "stage2", "stage3", "stage4a", "stage4b")


def describe_trainable(blocks) -> str:
    def one(n, what):
        return f"all of {what}" if n < 0 else (f"last {n} {what} blocks" if n else "")
    parts = [x for x in (one(blocks[0], "image"), one(blocks[1], "text")) if x]
    return "heads" + "".join(f" + {x}" for x in parts)


def chain_ratios(params) -> tuple[float, float, float, float]:
    """params.yaml's CMAPKD stage 1 : 2 : 3 : 4b student rates, relative to stage 1's."""
    d = params.distill
    return tuple(x / d.stage1.lr for x in (d.stage1.lr, d.stage2.lr, d.stage3.lr, d.stage4.lr_student))


def lr_overrides(method: str, lr: float, ratios) -> list[str]:
    """The overrides that set a method's peak learning rate (module docstring); for CMAPKD, `ratios`
    are the stage 1 : 2 : 3 : 4b student (and adapter) rates relative to `lr`."""
    if method != "cmapkd":
        return [f"baselines.{method}.lr={lr}"]
    r1, r2, r3, r4 = ratios
    return [f"distill.stage1.lr={lr * r1}", f"distill.stage2.lr={lr * r2}", f"distill.stage3.lr={lr * r3}",
            f"distill.stage4.lr_student={lr * r4}", f"distill.stage4.lr_adapters={lr * r4}"]


def prepare_candidate(name: str, overrides: list[str], work: Path, data: Path, teacher: Path, device) -> tuple[Path, Path, dict]:
    """(student_init folder, cache folder, val metrics of the student at start) of a candidate."""
    from cmapkd.config import load_params, to_dict
    from cmapkd.distill.teacher import read_spec, run_teacher_stage
    from cmapkd.stages.cache_teacher import build_cache

    params = load_params(overrides=overrides)
    default = load_params()
    # student_init does not depend on what trains: key it by the student spec without those fields
    spec = {k: v for k, v in to_dict(params.model.student).items() if k not in ("trainable_blocks", "freeze_bn")}
    key = json.dumps([spec, to_dict(params.student_init)], sort_keys=True)
    init = ROOT / "models" / "student_init"
    saved = read_spec(init) if init.is_dir() else None
    same = saved is not None and {k: v for k, v in saved["encoder_spec"].items()
                                  if k not in ("trainable_blocks", "freeze_bn")} == spec \
        and to_dict(params.student_init) == to_dict(default.student_init)
    if not same:
        init = work / f"init-{abs(hash(key)) % 10**8}"
        if not (init / "spec.json").is_file():
            run_teacher_stage(params, data, init, progress=False, device=device, role="student")
    metrics = (read_spec(init) or {}).get("metrics", {}).get("val", {})
    cache = ROOT / "data" / "cache" / "teacher"
    if params.model.student.image_size != default.model.student.image_size:
        cache = work / f"cache-{params.model.student.image_size}"
        if not (cache / "identity.json").is_file():
            build_cache(params, data, teacher, cache, device, progress=False)
    return init, cache, metrics


def train_one(params, method: str, seed: int, init: Path, cache: Path, data: Path, teacher: Path, work: Path,
              device) -> dict:
    """One method run (CMAPKD: its chain); returns val metrics, steps and seconds of training."""
    from cmapkd.distill.runs import run

    out = work / "runs" / f"{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0, steps, prev, stage_vals = time.perf_counter(), 0, None, []
    for name in (CHAIN if method == "cmapkd" else (method,)):
        stage_out = out / name
        s = run(params, name, data, teacher, cache, prev, stage_out, work / "scratch", None, device,
                progress=False, seed=seed, model_id=f"search-{method}-s{seed}", student_init=init)
        steps += s["steps"] if name != "stage4a" else 0  # 4a trains only the ALSN (no student update)
        stage_vals.append(s["val"]["retrieval_mean"])
        prev = stage_out
    seconds = time.perf_counter() - t0
    img_cos = val_image_cosine(params, prev, data, teacher, device)
    shutil.rmtree(out, ignore_errors=True)
    return {"val": s["val"]["retrieval_mean"], "steps": steps, "seconds": seconds, "img_cos": img_cos,
            "stage_vals": stage_vals}


def latest_runs(records: list[dict]) -> list[dict]:
    """One record per (candidate, method, terms, overrides, lr, seed): a later run of the same cell
    (a later --json file on the command line) replaces an earlier one, so a method searched again
    after a code change shows its new numbers only."""
    def key(r):
        return (r.get("candidate"), r["method"], r.get("terms"), tuple(r.get("overrides") or ()), float(r["lr"]), r["seed"])
    return list({key(r): r for r in records}.values())


def lr_table(records: list[dict]) -> str:
    """Markdown table, one row per method (and term set) and one column per learning rate: val mean
    recall mean +- std over the seeds (n when not 2), the best rate of each row in bold, and the val
    image cosine at that rate. `records` are the `--json` records of one or more runs of this script."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        label = f"{r['method']} ({r['terms'].replace(',', ' + ')})" if r.get("terms") else r["method"]
        if r.get("overrides"):
            label += " [" + ", ".join(r["overrides"]) + "]"
        cells.setdefault((label, float(r["lr"])), []).append(r)
    lrs = sorted({lr for _, lr in cells})
    labels = list(dict.fromkeys(label for label, _ in cells))
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | val image cos at best |",
             "|---|" + "--:|" * (len(lrs) + 2)]
    for label in labels:
        means = {lr: 100 * np.mean([g["val"] for g in cells[label, lr]]) for lr in lrs if (label, lr) in cells}
        best = max(means, key=means.get)
        row = []
        for lr in lrs:
            if lr not in means:
                row.append("")
                continue
            vals = 100 * np.array([g["val"] for g in cells[label, lr]])
            txt = f"{vals.mean():.1f}" + (f" ± {vals.std(ddof=1):.1f}" if len(vals) > 1 else "")
            txt += f" (n={len(vals)})" if len(vals) != 2 else ""
            row.append(f"**{txt}**" if lr == best else txt)
        cos = np.mean([g["img_cos"] for g in cells[label, best]])
        lines.append(f"| {label} | " + " | ".join(row) + f" | {best:g} | {cos:.2f} |")
    return "\n".join(lines)


def val_image_cosine(params, model_dir: Path, data: Path, teacher: Path, device) -> float:
    """Mean pairwise cosine of the trained student's val image embeddings (the collapse check that
    `evaluate` runs on test, `img_emb_mean_cos`)."""
    from cmapkd.data import ImageTextDataset
    from cmapkd.eval.run import embed_images, load_model, mean_pairwise_cosine

    model = load_model(params, model_dir, teacher, device).encoder
    val = ImageTextDataset(data, "val")
    return mean_pairwise_cosine(embed_images(model, val.images, params.evaluate.batch_size, device))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", nargs="+", default=None, choices=list(CANDIDATES),
                    help="default: heads last2 (regime search); default (lr search)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="default: 1e-3 (regime); 3e-4 1e-3 3e-3 (lr search)")
    ap.add_argument("--lr-search", action="store_true",
                    help="every method x the lrs (candidates default: params.yaml's student)")
    ap.add_argument("--chain-ratios", nargs=4, type=float, default=None, metavar="R",
                    help="CMAPKD: stage 1, 2, 3 and 4b rates as multiples of the row's lr (default: params.yaml's)")
    ap.add_argument("--term-sets", nargs="+", default=None, metavar="TERMS",
                    help="CMAPKD: one row per comma-separated subset of loss.terms (e.g. task intra_v,task)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params override for all runs")
    ap.add_argument("--data", type=Path, default=ROOT / "data/processed/emojiscenes")
    ap.add_argument("--teacher", type=Path, default=ROOT / "models/teacher")
    ap.add_argument("--work", type=Path, default=ROOT / "scratch/regime_search")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    ap.add_argument("--from-json", nargs="+", type=Path, default=None, metavar="JSON",
                    help="train nothing: print the method x lr table of the runs saved by --json")
    args = ap.parse_args()
    if args.from_json:
        records = latest_runs([r for f in args.from_json for r in json.loads(f.read_text())])
        seeds = sorted({r["seed"] for r in records})
        print(f"val mean recall (%), mean ± std over seeds {' '.join(map(str, seeds))}; "
              f"from {', '.join(f.name for f in args.from_json)}\n")
        print(lr_table(records))
        return 0

    from cmapkd import runtime
    from cmapkd.config import load_params

    runtime.setup_logging()
    runtime.configure_hub("embedded")
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device("cpu")
    default_ratios = chain_ratios(load_params())
    if args.chain_ratios is None:
        args.chain_ratios = list(default_ratios)
    if args.lr_search:
        args.methods = list(ALL_METHODS)
    if args.lrs is None:
        args.lrs = [3e-4, 1e-3, 3e-3] if args.lr_search else [1e-3]
    if args.candidates is None:
        args.candidates = ["default"] if args.lr_search else ["heads", "last2"]
    args.work.mkdir(parents=True, exist_ok=True)
    rows, records, chains = [], [], []
    for cand in args.candidates:
        student, trains, overrides = CANDIDATES[cand]
        overrides = overrides + args.set
        init, cache, start = prepare_candidate(cand, overrides, args.work, args.data, args.teacher, device)
        if cand == "default":
            p = load_params(overrides=overrides)
            trains = describe_trainable(p.model.student.trainable_blocks)
            student = f"params.yaml student ({p.model.student.image_model} @ {p.model.student.image_size} px)"
        start_cos = val_image_cosine(load_params(overrides=overrides), init, args.data, args.teacher, device)
        rows.append((student, trains, "start (no training)", "", 0, "", "",
                     f"{100 * start.get('retrieval_mean', float('nan')):.1f}", f"{start_cos:.2f}"))
        for method in args.methods:
            term_sets = args.term_sets if method == "cmapkd" and args.term_sets else [None]
            for lr in args.lrs:
                for terms in term_sets:
                    extra = [f"loss.terms=[{terms}]"] if terms else []
                    params = load_params(overrides=overrides + extra + lr_overrides(method, lr, args.chain_ratios))
                    label = f"{method} ({terms.replace(',', ' + ')})" if terms else method
                    got = []
                    for seed in args.seeds:
                        r = train_one(params, method, seed, init, cache, args.data, args.teacher, args.work, device)
                        got.append(r)
                        records.append({"candidate": cand, "method": method, "terms": terms, "overrides": args.set,
                                        "lr": lr, "seed": seed, **r})
                        print(f"# {cand} {label} lr={lr:g} seed={seed}: val mean recall {100 * r['val']:.2f} "
                              f"({r['steps']} steps, {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
                    vals = np.array([g["val"] for g in got]) * 100
                    std = f" ± {vals.std(ddof=1):.1f}" if len(vals) > 1 else ""
                    ms = 1000 * sum(g["seconds"] for g in got) / max(1, sum(g["steps"] for g in got))
                    cos = np.mean([g["img_cos"] for g in got])
                    rows.append((student, trains, label, f"{lr:g}", got[0]["steps"], params.distill.batch_size,
                                 f"{ms:.0f}", f"{vals.mean():.1f}{std}", f"{cos:.2f}"))
                    if method == "cmapkd":
                        per_stage = np.array([g["stage_vals"] for g in got]) * 100
                        chains.append((label, f"{lr:g}", " / ".join(f"{v:.1f}" for v in per_stage.mean(0))))
    settings = " ".join(f"`{o}`" for o in args.set) or "none"
    if "cmapkd" in args.methods and not np.allclose(args.chain_ratios, default_ratios):
        settings += "; CMAPKD stage lr ratios " + " : ".join(f"{r:g}" for r in args.chain_ratios)
    print(f"seeds {' '.join(map(str, args.seeds))}; val split; overrides of params.yaml: {settings}; "
          f"ms/step includes the val evaluation and start-up of each run\n")
    print("| student | what trains | method | lr | steps | batch | ms/step | val mean recall (%) | val image cos |")
    print("|---|---|---|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    if chains:
        print("\nCMAPKD's val mean recall after each stage of its chain (mean over the seeds):\n")
        print("| method | lr (stage 1) | val after stages 1 / 2 / 3 / 4a / 4b (%) |")
        print("|---|--:|---|")
        for c in chains:
            print("| " + " | ".join(c) + " |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
