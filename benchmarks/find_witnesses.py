"""Find a witness for known divergences: the smallest input where each one shows.

For every entry of the built-in known-divergence files (or those given), this runs the
matching checks of the built-in suites with many examples and no known-divergence file,
and prints the minimal failing input Hypothesis shrank to, as a Python literal to paste
into the pair's `witnesses=`. An entry whose checks all pass is printed as NOT FOUND: raise
--examples, or the divergence is gone.

    python benchmarks/find_witnesses.py                         # every entry, 200 examples
    python benchmarks/find_witnesses.py --match 'norm2_*' --examples 500
    python benchmarks/find_witnesses.py --verify --examples 1   # each entry's witness still shows it

Every kind is searched; the literal printed for an optimizer or model check is its `Example`.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def literal(x: Any) -> str:
    """A Python literal of one argument or example (arrays as nested lists)."""
    if isinstance(x, np.ndarray):
        return repr(x.tolist())
    if isinstance(x, tuple):
        return "(" + ", ".join(literal(v) for v in x) + ("," if len(x) == 1 else "") + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {literal(v)}" for k, v in x.items()) + "}"
    if isinstance(x, list):
        return "[" + ", ".join(literal(v) for v in x) + "]"
    return repr(x)


def main(argv: list[str] | None = None) -> int:
    from equivcheck.engine import KnownDivergences, RunSettings, search, settle, versioned

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--known", action="append", default=None, help="known-divergence file (default: the suites')")
    ap.add_argument("--match", default="*", help="only entries whose pattern matches one of these globs (comma-separated)")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true",
                    help="run the pairs' own witnesses first and report each entry: known-divergence (the witness "
                         "shows it) or fixed (it agrees)")
    args = ap.parse_args(argv)
    files = args.known or [str(ROOT / "suites/known_divergences.txt"),
                           versioned(str(ROOT / "suites/known_divergences-torch{torch}.txt"))]
    known = KnownDivergences.load([f for f in files if Path(f).exists()])

    found: dict[str, Any] = {}
    real_call = search.Search.__call__

    def capture(self: Any, body: Any, strategy: Any, **kw: Any) -> Any:
        failed = real_call(self, body, strategy, **kw)
        if failed is not None:
            found[kw["digest"]] = (failed.args if hasattr(failed, "ev")
                                   else getattr(failed, "example", getattr(failed, "ex", None)))
        return failed

    search.Search.__call__ = capture  # type: ignore[method-assign]
    from suites import built_in_kinds

    kinds = {k.name: k for k in built_in_kinds()}
    run = RunSettings(examples=args.examples, seed=args.seed, shrink_seconds=20.0)
    missing = 0
    for entry in known.entries:
        if entry.is_node or not any(fnmatch.fnmatch(entry.pattern, g) for g in args.match.split(",")):
            continue
        pair_glob, check, dtype = (entry.pattern.split("::") + ["*", "*"])[:3]
        matched = [k for name, k in kinds.items() if fnmatch.fnmatchcase(name, pair_glob)]
        if not matched:
            print(f"{entry.pattern}: not an operation or data check (optimizer or model entry): skipped")
            continue
        for kind in matched:
            # A pattern without a dtype means the suites' default dtypes.
            dtypes = [d for d in kind.dtypes if fnmatch.fnmatchcase(d, dtype)
                      and (dtype != "*" or d in ("float32", "float64"))]
            checks = tuple(c for c in kind.checks if fnmatch.fnmatchcase(c, check))
            for d in dtypes:
                found.clear()
                try:
                    if args.verify:
                        records = kind.replace(checks=checks).run_checks(dtype=d, run=run, known=known.match_check)
                        settle(records)
                        for r in records:
                            missing += r.outcome != "known-divergence"
                            print(f"{entry.pattern} [{r.id}]: {r.outcome} (witnessed {r.witnessed})"
                                  + (f": {r.message[:160]}" if r.outcome != "known-divergence" else ""))
                        continue
                    records = kind.replace(checks=checks, witnesses=()).run_checks(dtype=d, run=run,
                                                                                   known=lambda _id: None)
                except Exception as exc:  # one broken check must not end the search for the others
                    missing += 1
                    print(f"{entry.pattern} [{kind.name} {d}]: the run raised {type(exc).__name__}: {exc}")
                    continue
                bad = [r for r in records if r.outcome == "failed" and entry.regex.match(r.id)]
                if not bad or not found:
                    missing += 1
                    print(f"{entry.pattern} [{kind.name} {d}]: NOT FOUND in {args.examples} examples")
                    continue
                example = next(iter(found.values()))
                print(f"{entry.pattern} [{kind.name} {d}] {bad[0].check}: {bad[0].message[:100]}")
                print(f"    witnesses=({literal(example)},),")
    return 1 if missing else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # the daemon compile thread can abort a normal interpreter exit
