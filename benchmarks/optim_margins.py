"""How far optimizer trajectories stay within tolerance, by step count and dtype.

    python benchmarks/optim_margins.py [--examples 30] [--seed 0] [--only NAME,...] [--naive]

For every pair of suites/test_optimizers.py (or the naive ports with --naive) and dtype,
runs each trajectory check under Hypothesis and prints the worst error over the one-step
tolerance at steps 1, 2-10, 11-30 and 31-100, the worst error over the linear bound the
checks use (n x one-step after n steps; 1 = at tolerance), the slope of log(error) against
log(step) over the buckets (1 = linear growth, 0.5 = random walk), and the examples
accepted as ill-conditioned. --naive prints each naive port's worst error instead.
Figures, not assertions: the machine is shared, so note its load with them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from equivcheck.engine import tolerance
from equivcheck.engine.records import RunSettings
from equivcheck.optim.runner import _run_check, run_optimizer_pair, witnesses
from equivcheck.optim.trajectory import BUCKETS


def margins(pair, dtype, run):
    rows = []
    for check in pair.checks:
        if check == "step":
            continue
        base = tolerance.lookup(dtype, check=check, override=pair.tolerance_for(dtype, check))
        ill: list[int] = []
        t0 = time.perf_counter()
        seen, failed = _run_check(pair, check, dtype, run, base, False, ill, witnesses(pair, check, dtype))
        cells, points = [], []
        for lo, hi in BUCKETS:
            rs = [(n, r) for o in seen for n, r in o.ratios if lo <= n <= hi]
            worst = max((r for _, r in rs), default=float("nan"))
            cells.append(worst)
            if rs and worst > 0:
                points.append((math.log(np.mean([n for n, _ in rs])), math.log(worst)))
        slope = np.polyfit(*zip(*points), 1)[0] if len(points) >= 2 else float("nan")
        model = max((o.model_ratio for o in seen), default=0.0)
        rows.append((check, cells, model, slope, len(ill), "FAIL" if failed else "", time.perf_counter() - t0))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="")
    ap.add_argument("--naive", action="store_true")
    args = ap.parse_args()
    from suites.test_optimizers import GRADIENTS, NAIVE, OPTIMIZERS, SCHEDULES

    run = RunSettings(examples=args.examples, seed=args.seed)
    only = set(filter(None, args.only.split(",")))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.examples} examples, seed {args.seed}")
    if args.naive:
        for pair in NAIVE:
            for dtype in pair.dtypes:
                for rec in run_optimizer_pair(pair, dtype=dtype, run=run):
                    print(f"{pair.name:24} {dtype:8} {rec.check:10} {rec.outcome:8} max abs err {rec.max_abs_err:.3g} "
                          f"(max rel {rec.max_rel_err:.3g}) {rec.message.splitlines()[0][:110]}\n"
                          f"{'':24} diagnosis: {rec.diagnosis}")
        return 0
    header = f"{'pair':28} {'dtype':8} {'check':10} " + " ".join(f"{f'{lo}-{hi}':>8}" for lo, hi in BUCKETS)
    print(header + f" {'vs n*tol':>9} {'slope':>6} {'ill':>4}  seconds")
    for pair in OPTIMIZERS + SCHEDULES + GRADIENTS:
        if pair.unavailable or (only and pair.name not in only):
            continue
        for dtype in pair.dtypes:
            for check, cells, model, slope, ill, failed, secs in margins(pair, dtype, run):
                print(f"{pair.name:28} {dtype:8} {check:10} " + " ".join(f"{c:8.2g}" for c in cells)
                      + f" {model:9.2g} {slope:6.2f} {ill:4d}  {secs:5.1f} {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
