"""Time a full default `prepare` (EmojiScenes at the params.yaml sizes) into a temporary folder.

    python benchmarks/bench_prepare.py [--params params.yaml] [--repeat 1] [-S key=value ...]

Prints the wall time, images/s and the dataset digest (the same on every run with the same seed).
Target (issue 3): under 2 minutes on 2 CPU cores for the default sizes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cmapkd.config import load_params
from cmapkd.data.build import build_dataset
from cmapkd.data.contact_sheet import make_contact_sheet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    params = load_params(["seed", "setting", "prepare"], path=args.params, overrides=args.set)
    print(f"cpu cores: {os.cpu_count()}, format: {params.prepare.format}, resolution: {params.prepare.resolution}")
    times = []
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
            t0 = time.perf_counter()
            info = build_dataset(params, Path(tmp) / "data", progress=False)
            t1 = time.perf_counter()
            make_contact_sheet(Path(tmp) / "data", Path(tmp) / "sheet.png", n=params.prepare.emojiscenes.contact_sheet)
            t2 = time.perf_counter()
        c = info["counts"]
        n_scenes = sum(c["splits"].values())
        n_all = n_scenes + sum(c.get("zeroshot", {}).values())
        times.append(t2 - t0)
        print(f"run {r + 1}: build {t1 - t0:.2f} s + contact sheet {t2 - t1:.2f} s = {t2 - t0:.2f} s; "
              f"{n_scenes} scenes + {n_all - n_scenes} zero-shot images -> {n_all / (t1 - t0):.0f} images/s; "
              f"captions {sum(c['captions'].values())}, VQA {sum(c.get('vqa_questions', {}).values())}; "
              f"digest {info['digest'][:16]}")
    print(f"best of {len(times)}: {min(times):.2f} s (target < 120 s on 2 cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
