"""What a new seed costs in XLA compilations, with one persistent compilation cache across runs.

Runs `pytest --equiv` three times on the same suites with one fresh JAX compilation cache:
seed S (cold cache), seed S + ring (another seed drawing the same ring entry of shape palettes:
its programs are in the cache) and seed S + 1 (another ring entry: new shapes, new compilations).
Prints each run's wall time, the programs JAX compiled or loaded (`jax_compilations.count`: a
persistent-cache hit counts too) and the seconds that took (a hit costs its loading only), from
the run's report. Figures, not assertions: the machine is shared. Measured here (2 cores, the
default -k subset below, 5 examples): 101 programs each run; 10.9 s compiling cold, 1.5 s on the
same ring entry, 7.6 s on another (it shares the Fixed shapes); wall 28.1 / 18.4 / 20.3 s.

    python benchmarks/shape_ring.py                                   # autodiff, float32, 5 examples
    python benchmarks/shape_ring.py --suites autodiff,layers --examples 10 --seed 3
    python benchmarks/shape_ring.py -k "tanh or softmax or matmul or sum or exp or log1p or sigmoid or cumsum or norm"
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from equivcheck import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int, cache: str, args: argparse.Namespace) -> tuple[float, dict, str]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pytest", "--equiv", *[f"suites/test_{s}.py" for s in args.suites.split(",")],
               "--equiv-seed", str(seed), "--equiv-examples", str(args.examples), "--equiv-dtypes", args.dtypes,
               "--equiv-jax-cache", cache, "--equiv-report", out, "-q", "-p", "no:cacheprovider",
               *(["-k", args.k] if args.k else [])]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        report = Path(out) / "latest.json"
        if not report.exists():
            return seconds, {}, f"no report (exit {proc.returncode})"
        data = json.loads(report.read_text())
    counts: dict[str, int] = {}
    for r in data["records"]:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return seconds, data["run"].get("jax_compilations") or {}, ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="autodiff")
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("-k", default="", help="pytest's -k: a subset of the suites' pairs")
    args = ap.parse_args(argv)
    ring = RunSettings.shape_ring
    print(f"shape ring {ring}; suites {args.suites}{' -k ' + repr(args.k) if args.k else ''}, {args.examples} examples, "
          f"{args.dtypes}; one process")
    print(f"{'run':<34} {'seed':>10} {'wall s':>8} {'programs':>13} {'compile s':>10}  checks")
    with tempfile.TemporaryDirectory() as cache:
        for label, seed in (("cold cache", args.seed), (f"same ring entry (seed + {ring})", args.seed + ring),
                            ("another ring entry (seed + 1)", args.seed + 1)):
            seconds, comp, checks = run(seed, cache, args)
            print(f"{label:<34} {seed:>10} {seconds:>8.1f} {comp.get('count', '-')!s:>13} "
                  f"{comp.get('seconds', float('nan')):>10.1f}  {checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
