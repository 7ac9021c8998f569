"""`cmapkd` command: lists the pipeline stages and runs one (`cmapkd <stage> [args]`).

dvc.yaml runs every stage as `cmapkd <stage> ...`, which is `python -m cmapkd.stages.<stage> ...`
started warm: a background server with torch, open_clip and transformers already imported forks
the stage process (cmapkd.warm; CMAPKD_WARM=0 turns it off). The command first restarts itself
once with glibc told to keep freed memory (runtime.keep_freed_memory_env; CMAPKD_KEEP_FREED_MEMORY=0
turns it off), which the warm server and its stage processes inherit. Called as a library,
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
              "CMAPKD_WARM=0 runs each stage cold in its own interpreter (see cmapkd.warm);",
              "CMAPKD_KEEP_FREED_MEMORY=0 keeps glibc's default of unmapping large freed blocks;",
              "CMAPKD_NPROC=N runs the training stages (distill) under torchrun on N processes, one per GPU."]
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


# stages that train, the only ones `CMAPKD_NPROC` spreads over several processes
TORCHRUN_MODULES = ("cmapkd.stages.distill",)


def torchrun_command(module_name: str, args: list[str], env=os.environ) -> list[str] | None:
    """The `torchrun` command line that runs a training stage on `CMAPKD_NPROC` processes (one per
    GPU) on this machine, or None: fewer than 2 processes asked for, a stage that does not train,
    or already a torchrun worker. An environment variable, not a param, so that the number of
    GPUs never changes what DVC hashes (the outputs are those of the same global batch)."""
    raw = env.get("CMAPKD_NPROC", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise SystemExit(f"cmapkd: CMAPKD_NPROC must be a whole number of processes, got {raw!r}") from None
    if n < 2 or module_name not in TORCHRUN_MODULES or "LOCAL_RANK" in env:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", module_name, *args]


def launch(module_name: str, args: list[str]) -> NoReturn:
    """Run the stage as `python -m <module_name> <args>` would and end the process with its status:
    under torchrun when `CMAPKD_NPROC` asks for several processes (training stages), else in a
    child of the warm-start server when one answers, otherwise in this process."""
    from cmapkd import runtime, warm

    env = runtime.keep_freed_memory_env()
    if env is not None:  # restart with glibc told to keep freed memory (runtime.keep_freed_memory_env)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    cmd = torchrun_command(module_name, args)
    if cmd is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)  # torchrun takes over this process: DVC sees its exit status
    code = warm.run(module_name, args)
    if code is None:
        module = importlib.import_module(module_name)
        runtime.run_stage(lambda: module.main(args))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
