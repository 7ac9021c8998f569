"""`cmapkd params`: validate params.yaml and print the resolved, typed values (with -S overrides);
with `--overlay FILE` (repeatable) merge params files over it first, e.g. configs/paper.yaml, and
with `--out FILE` write the merged, checked file instead (comments are not kept)."""

from __future__ import annotations

import argparse
import sys

import yaml

from cmapkd.config import PARAMS_FILE, ParamsError, load_params, to_dict, write_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd params", description=__doc__)
    ap.add_argument("--file", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("--overlay", action="append", default=[], metavar="FILE",
                    help="params file merged over it key by key (repeatable, applied in order)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an existing key, as `dvc exp run -S` does (repeatable, applied last)")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="write the merged params here (may be --file itself) instead of printing them")
    args = ap.parse_args(argv)
    try:
        if args.out:
            write_params(args.out, args.file, args.overlay, args.set)
            print(f"wrote {args.out}")
            return 0
        if len(args.overlay) > 1:
            raise ParamsError("more than one --overlay: write them with --out, then check that file")
        params = load_params(path=args.file, overrides=args.set, overlay=args.overlay[0] if args.overlay else None)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    yaml.safe_dump(to_dict(params), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
