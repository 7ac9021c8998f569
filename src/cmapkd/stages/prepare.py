"""`prepare` stage: build the processed dataset (EmojiScenes by default, or COCO/Flickr30K +
ImageNet + VQAv2 from local paths) as shards under data/processed/<dataset>/, and draw
reports/contact_sheet.png."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cmapkd import runtime
from cmapkd.config import PARAMS_FILE, ParamsError, load_params

log = logging.getLogger("cmapkd.prepare")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd prepare", description=__doc__)
    ap.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    ap.add_argument("--out", default=None, help="output folder (default: data/processed/<dataset>)")
    ap.add_argument("--contact-sheet", default="reports/contact_sheet.png", help="PNG to draw ('' = none)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    from cmapkd.data import DataError
    from cmapkd.data.build import build_dataset, dataset_name

    try:
        params = load_params(["seed", "setting", "prepare"], path=args.params, overrides=args.set)
        runtime.configure_hub(params.setting)
        runtime.seed_everything(params.seed)
        out = Path(args.out or f"data/processed/{dataset_name(params.prepare)}")
        t0 = time.perf_counter()
        info = build_dataset(params, out, progress=not args.no_progress, params_file=args.params)
    except (ParamsError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    c = info["counts"]
    n_img = sum(c["splits"].values()) + sum(c.get("zeroshot", {}).values())
    log.info("wrote %s in %.1f s: splits %s, captions %s, VQA %s, zero-shot %s, skipped %d, digest %s",
             out, dt, c["splits"], c["captions"], c.get("vqa_questions"), c.get("zeroshot"),
             info["skipped"]["count"], info["digest"][:12])
    log.info("%.0f images/s", n_img / max(dt, 1e-9))
    if args.contact_sheet:
        from cmapkd.data.contact_sheet import make_contact_sheet

        n = params.prepare.emojiscenes.contact_sheet if params.prepare.format == "emojiscenes" else 12
        title = ("EmojiScenes test split: scene type and first caption (captions are generated from the annotation)"
                 if params.prepare.format == "emojiscenes" else None)
        make_contact_sheet(out, args.contact_sheet, n=n, title=title)
        log.info("contact sheet: %s", args.contact_sheet)
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
