"""`cmapkd` command: lists the pipeline stages and runs one (`cmapkd <stage> [args]`).

DVC runs the same entry points as `python -m cmapkd.stages.<name>`; this command is the
human-facing way in.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cmapkd.stages import PLANNED, STAGES


def _epilog() -> str:
    width = max(len(n) for n in [*STAGES, *PLANNED])
    lines = ["stages (run through `dvc repro`, or one at a time as `cmapkd <stage>`):"]
    lines += [f"  {n:<{width}}  {desc}" for n, (_, desc) in STAGES.items()]
    if PLANNED:
        lines += ["", "planned (not implemented yet in this checkout):"]
        lines += [f"  {n:<{width}}  {desc}" for n, desc in PLANNED.items()]
    lines += ["", "environment: CMAPKD_DEVICE=auto|cpu|cuda|cuda:N picks the device (default auto)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="cmapkd",
        description="CMAPKD: adaptive pyramid-based cross-modal knowledge distillation, as a DVC pipeline.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("stage", nargs="?", choices=list(STAGES), metavar="STAGE", help="stage to run (see below)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the stage")
    ns = ap.parse_args(argv)
    if ns.stage is None:
        ap.print_help()
        return 0
    module = importlib.import_module(STAGES[ns.stage][0])
    return int(module.main(ns.args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
