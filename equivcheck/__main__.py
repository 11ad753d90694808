"""Command line: `python -m equivcheck compare OLD.json NEW.json` (what changed between two
runs; exit 1 if a check regressed), for nightly CI outside pytest."""
from __future__ import annotations

import argparse
import json
import sys


def _compare(args: argparse.Namespace) -> int:
    from equivcheck.report import compare_runs

    try:
        old, new = (json.loads(open(path, encoding="utf-8").read()) for path in (args.old, args.new))
        lines, regressed = compare_runs(old, new, growth=args.growth)
    except (OSError, ValueError, KeyError) as exc:
        print(f"equivcheck compare: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines) if lines else "no change in outcomes or margins")
    return 1 if regressed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="equivcheck", description="PyTorch/JAX equivalence reports")
    sub = ap.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="what changed between two report JSON files")
    cmp.add_argument("old")
    cmp.add_argument("new")
    cmp.add_argument("--growth", type=float, default=2.0,
                     help="report a check whose worst error/allowed grew by this factor (default 2)")
    cmp.set_defaults(run=_compare)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
