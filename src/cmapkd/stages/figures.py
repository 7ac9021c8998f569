"""`figures` stage: Figures 3-6 of the paper (ALSN level weights by difficulty; radar charts per
scene type; t-SNE of teacher vs student P2..P5 features; the P2..P5 x L1..L4 cross-modal similarity)
from reports/figdata/<report.figure_model>.npz and the test images, as PNG and PDF:
reports/figures/fig{3..6}_*.{png,pdf} (docs/reports.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cmapkd import runtime
from cmapkd.config import PARAMS_FILE, ParamsError, load_params

log = logging.getLogger("cmapkd.figures")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd figures", description=__doc__)
    ap.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    ap.add_argument("--figdata", default="reports/figdata", help="folder of <model_id>.npz arrays (evaluate's output)")
    ap.add_argument("--data", default="data/processed/emojiscenes", help="processed dataset (the test images of Figure 4)")
    ap.add_argument("--out", default="reports/figures", help="output folder (fig3..fig6 .png/.pdf)")
    args = ap.parse_args(argv)
    runtime.setup_logging()
    from cmapkd.data import DataError
    from cmapkd.report.figures import load_figdata, load_test_images, representatives, write_figures
    from cmapkd.report.tables import ReportError

    try:
        params = load_params(["report"], path=args.params, overrides=args.set)
        rp = params.report
        path = Path(args.figdata) / f"{rp.figure_model}.npz"
        if not path.is_file():
            have = sorted(p.stem for p in Path(args.figdata).glob("*.npz")) if Path(args.figdata).is_dir() else []
            raise ReportError(
                f"{path}: figdata of report.figure_model '{rp.figure_model}' not found"
                + (f" (found: {', '.join(have)})" if have else " (run the evaluate stage first)")
            )
        fd = load_figdata(path)
        reps = [int(fd.sample_index[r]) for r in representatives(fd).values() if r is not None]
        images = load_test_images(args.data, reps)
        files = write_figures(
            fd, args.out, images=images, fig3_samples=rp.fig3_samples, tsne_samples=rp.tsne_samples,
            tsne_pca_dim=rp.tsne_pca_dim, tsne_perplexity=rp.tsne_perplexity, tsne_seed=rp.tsne_seed,
        )
    except (ParamsError, ReportError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %d files to %s from %s (%d test samples)", len(files), Path(args.out), path, fd.n)
    return 0


if __name__ == "__main__":
    runtime.run_stage(main)
