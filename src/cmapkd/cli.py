"""`cmapkd` command: lists the pipeline stages and runs one (`cmapkd <stage> [args]`).

dvc.yaml runs every stage as `cmapkd <stage> ...`, which is `python -m cmapkd.stages.<stage> ...`
started warm: a background server with torch, open_clip and transformers already imported forks
the stage process (cmapkd.warm; CMAPKD_WARM=0 turns it off). Called as a library,
`main([stage, *args])` runs the stage's `main` in this process and returns its status.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from cmapkd.stages import STAGES


def _epilog() -> str:
    width = max(len(n) for n in STAGES)
    lines = ["stages (run through `dvc repro`, or one at a time as `cmapkd <stage>`):"]
    lines += [f"  {n:<{width}}  {desc}" for n, (_, desc) in STAGES.items()]
    lines += ["", "environment: CMAPKD_DEVICE=auto|cpu|cuda|cuda:N picks the device (default auto);",
              "CMAPKD_WARM=0 runs each stage cold in its own interpreter (see cmapkd.warm)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """argv None: the command line of a `cmapkd` process, which ends with the stage's status
    (`launch`); a list: run the stage's `main` here and return its status."""
    command_line = argv is None
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
    if command_line:
        launch(STAGES[ns.stage][0], ns.args)
    module = importlib.import_module(STAGES[ns.stage][0])
    return int(module.main(ns.args) or 0)


def launch(module_name: str, args: list[str]) -> NoReturn:
    """Run the stage as `python -m <module_name> <args>` would and end the process with its status:
    in a child of the warm-start server when one answers, otherwise in this process."""
    from cmapkd import warm

    code = warm.run(module_name, args)
    if code is None:
        from cmapkd import runtime

        module = importlib.import_module(module_name)
        runtime.run_stage(lambda: module.main(args))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
