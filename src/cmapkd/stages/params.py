"""`cmapkd params`: validate params.yaml and print the resolved, typed values (with -S overrides)."""

from __future__ import annotations

import argparse
import sys

import yaml

from cmapkd.config import PARAMS_FILE, ParamsError, load_params, to_dict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmapkd params", description=__doc__)
    ap.add_argument("--file", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an existing key, as `dvc exp run -S` does (repeatable)")
    args = ap.parse_args(argv)
    try:
        params = load_params(path=args.file, overrides=args.set)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    yaml.safe_dump(to_dict(params), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
