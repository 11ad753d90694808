"""Seed sweep: the built-in suites over K random seeds, every failure and xpass with its replay line.

A nightly run draws a fresh seed each night; a suite that fails on one seed in fifty turns it red
for nothing. This runs `pytest --equiv` once per seed (a reduced example count, so K = 10 fits in
about 20 minutes on 2 cores at the default), reads each run's JSON report and prints one table
row per check that failed or passed against a known divergence (xpass), then a line per seed.

    python benchmarks/seed_sweep.py                          # 10 random seeds, 5 examples per check
    python benchmarks/seed_sweep.py --seeds 20 --examples 10 --suites autodiff,layers
    python benchmarks/seed_sweep.py --seed-list 1738067960   # replay one seed

Exit status 1 when any seed had a failure or an xpass, or pytest itself exited non-zero (a test that
errors, or a worker that dies, leaves no failed record: its checks are only missing).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("autodiff", "layers", "losses", "optimizers", "data", "checkpoints", "models", "distributed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="how many random seeds")
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds instead of random ones")
    ap.add_argument("--examples", type=int, default=5, help="examples per check")
    ap.add_argument("--suites", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    ap.add_argument("--workers", default="2", help="pytest-xdist workers ('0': none)")
    ap.add_argument("--dtypes", default="float32,float64")
    # Where `tox -e equiv` keeps its programs: with shapes from a ring of palettes (seed % 8), a
    # seed on an entry that ran before compiles nothing new, and Fixed shapes are shared by all.
    # A cold cache costs its writes (autodiff, one seed: 163 s against 123 s without one).
    ap.add_argument("--jax-cache", default=str(ROOT / ".pytest_cache" / "d" / "equivcheck-jax"),
                    help="JAX's persistent compilation cache, shared by the seeds ('none': off)")
    args = ap.parse_args(argv)

    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list
             else [random.SystemRandom().randrange(2**31) for _ in range(args.seeds)])
    suites = [f"suites/test_{s}.py" for s in args.suites.split(",")]
    if args.jax_cache != "none":
        Path(args.jax_cache).mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "pytest", "--equiv", *suites, "--equiv-seed", str(seed), "--equiv-examples",
                   str(args.examples), "--equiv-dtypes", args.dtypes, "--equiv-report", out, "--equiv-jax-cache",
                   args.jax_cache, "-q", "-p",
                   "no:cacheprovider", *(["-n", args.workers] if args.workers != "0" else [])]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            report = Path(out) / "latest.json"
            if not report.exists():
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
                summary.append(f"seed {seed}: no report (exit {proc.returncode}): " + " | ".join(tail))
                rows.append(("-", seed, "(the run itself)", f"exit {proc.returncode}", " ".join(cmd[2:])))
                continue
            records = json.loads(report.read_text())["records"]
        bad = [r for r in records if r["outcome"] in ("failed", "xpass")]
        for r in bad:
            suite = Path(r["nodeid"].split("::")[0]).stem.removeprefix("test_") if r.get("nodeid") else "-"
            rows.append((suite, seed, r["id"], r["outcome"], r.get("replay") or ""))
            # Printed as found, so a long sweep stopped early still says what it saw.
            why = (r.get("message") or "").strip().splitlines()[:1]
            print(f"  {r['outcome']}: {r['id']} ({r.get('kind') or '-'}: {why[0][:160] if why else '-'})  "
                  f"replay: {r.get('replay') or '-'}", file=sys.stderr, flush=True)
        counts = {k: sum(r["outcome"] == k for r in records) for k in ("passed", "failed", "xpass", "known-divergence",
                                                                        "skipped")}
        line = f"seed {seed}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" ({seconds:.0f} s)"
        if proc.returncode != 0:
            # a test that errored (or a worker that died) leaves no failed record: its checks are
            # simply missing, so pytest's own verdict decides too
            tail = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.startswith(("ERROR", "FAILED"))]
            last = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
            line += f"; pytest exit {proc.returncode}: " + " | ".join(tail[:5] + last)
            if not bad:
                rows.append(("-", seed, "(pytest)", f"exit {proc.returncode}", " ".join(cmd[2:])))
        summary.append(line)
        print(summary[-1], file=sys.stderr, flush=True)

    print(f"seed sweep: {len(seeds)} seeds x {', '.join(args.suites.split(','))}, {args.examples} examples per check")
    print(f"{'suite':<12} {'seed':>10}  {'check':<58} outcome")
    for suite, seed, check, outcome, _ in rows:
        print(f"{suite:<12} {seed:>10}  {check:<58} {outcome}")
    for *_, replay in rows:
        if replay:
            print(f"replay: {replay}")
    print("\n".join(summary))
    clean = sum(1 for s in summary if " 0 failed, 0 xpass" in s and "pytest exit" not in s)
    print(f"{clean} of {len(seeds)} seeds clean (0 failed, 0 xpass, pytest exit 0)")
    return 0 if clean == len(seeds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
