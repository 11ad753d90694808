"""How readable the minimal failing inputs are: planted bugs, shrunk, measured.

For a spread of built-in operation pairs, each planted bug of `equivcheck.ops.mutants` that must
fail (value x10, NaN at one element, sign, rolled output, derivative x10; the torch side) runs
through the engine (its witnesses left out: they are never shrunk), and the minimal input the failure reports is measured:

  elements   array elements in the shrunk input (smaller: a smaller shape was found)
  distinct   distinct values among them (fewer: a person reads the pattern at a glance)
  simple     share of values that are "simple": integers or halves, up to 1e3 in magnitude

Prints one row per mutant family and the mean over all; compare two trees by running it in both.

    python benchmarks/shrink_quality.py                  # 12 pairs, float32
    python benchmarks/shrink_quality.py --pairs 24 --json shrink.json
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = ("value", "nonfinite", "sign", "permuted", "vjp", "jvp")


def measure(args: Any) -> dict[str, float]:
    arrays = [np.asarray(a) for a in args if isinstance(a, np.ndarray)]
    flat = np.concatenate([a.ravel().astype(np.float64) for a in arrays]) if arrays else np.zeros(0)
    finite = flat[np.isfinite(flat)]
    simple = (np.abs(finite) <= 1e3) & (finite * 2 == np.round(finite * 2))
    return {"elements": float(flat.size), "distinct": float(len(np.unique(flat))),
            "simple": float(simple.mean()) if finite.size else 1.0}


def main(argv: list[str] | None = None) -> int:
    from equivcheck.backends import jax_side, torch_side
    from equivcheck.engine.records import RunSettings
    from equivcheck.ops import runner
    from equivcheck.ops.mutants import mutants

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=12, help="how many pairs, spread over the autodiff suite")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch_side().set_precision("highest")
    jax_side().set_precision("highest")
    from suites.test_autodiff import PAIRS

    pool = [p for p in PAIRS if args.dtype in p.dtypes]
    chosen = pool[:: max(len(pool) // args.pairs, 1)][: args.pairs]
    shrunk: list[Any] = []
    fill = runner._fill_failure

    def capture(rec: Any, failure: Any, *rest: Any) -> None:
        shrunk.append(failure.args)
        fill(rec, failure, *rest)

    rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    start = time.perf_counter()
    runner._fill_failure = capture
    try:
        for pair in chosen:
            for m in mutants(pair, args.dtype, sides=("torch",), sizes=(10.0,)):
                if m.family not in FAMILIES or m.expect != "fail":
                    continue
                shrunk.clear()
                # Without witnesses: an explicit example is reported as it is, never shrunk.
                drawn = dataclasses.replace(m.pair, witnesses=())
                runner.run_pair(drawn, dtype=args.dtype, run=RunSettings(examples=args.examples, seed=args.seed))
                if shrunk:
                    rows[m.family].append(measure(shrunk[0]))
    finally:
        runner._fill_failure = fill
    print(f"shrunk inputs of {sum(map(len, rows.values()))} planted bugs over {len(chosen)} pairs, {args.dtype}, "
          f"{args.examples} examples ({time.perf_counter() - start:.0f} s)")
    print(f"{'family':10} {'n':>4} {'elements':>9} {'distinct':>9} {'simple':>7}")
    everything = [r for rs in rows.values() for r in rs]
    for name, rs in [*sorted(rows.items()), ("all", everything)]:
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("elements", "distinct", "simple")}
        print(f"{name:10} {len(rs):4d} {mean['elements']:9.1f} {mean['distinct']:9.1f} {100 * mean['simple']:6.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
