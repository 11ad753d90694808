"""How fast the autodiff suite checks examples, and how much of that is JAX compiling.

    python benchmarks/autodiff_speed.py                      # the default --equiv profile
    python benchmarks/autodiff_speed.py --shapes 0           # a fresh shape every example
    python benchmarks/autodiff_speed.py --examples 100 -k exp

Prints, per dtype and in total: examples checked per second (one example runs every check
of a pair on both sides), the share of wall time spent tracing, lowering and compiling JAX
programs, and the number of distinct XLA compilations; then where an example's time goes:

  hypothesis  drawing inputs, targeting, shrinking bookkeeping (wall time outside the test body)
  torch       torch's forward and derivatives
  jax         JAX's, less compiling on the checking thread
  compile     tracing, lowering and compiling JAX programs on the checking thread
  judge       comparing and judging, float64 re-runs for acceptance included

Figures, not assertions: these machines are shared and noisy.

    python benchmarks/autodiff_speed.py --target on           # with Hypothesis's target phase
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suites package


class Clock:
    """Seconds spent in named functions, by wrapping them where the runner looks them up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def watching(self, where: list[tuple[object, str, str]]) -> Iterator[None]:
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in where]
        for (obj, attr, label), (_, _, fn) in zip(where, saved):
            setattr(obj, attr, self._timed(fn, label))
        try:
            yield
        finally:
            for obj, attr, fn in saved:
                setattr(obj, attr, fn)

    def _timed(self, fn: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)  # compiling ahead, overlapped: not the loop's time
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        return timed


TARGET = {None: None, "on": True, "off": False}


def main(argv: list[str] | None = None) -> int:
    from equivcheck.backends import jax_side, torch_side
    from equivcheck.engine.records import RunSettings
    from equivcheck.engine.search import PROFILES
    from equivcheck.ops import runner
    from equivcheck.ops.runner import prepare, run_pair

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=PROFILES["dev"])
    ap.add_argument("--shapes", type=int, default=4, help="shapes per check (0: fresh every example)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-k", default="", help="only pairs whose name contains this")
    ap.add_argument("--target", choices=("on", "off"), default=None,
                    help="Hypothesis's target phase (default: the profile's choice, off but for nightly)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--jax-cache", help="JAX persistent compilation cache directory (as the plugin keeps one): "
                                        "run twice to see a warm cache")
    args = ap.parse_args(argv)

    jb = jax_side()
    if args.jax_cache:
        jb.enable_persistent_cache(args.jax_cache)
    torch_side().set_precision("highest")
    jb.set_precision("highest")
    from suites.test_autodiff import PAIRS

    pairs = [p for p in PAIRS if args.k in p.name]
    run = RunSettings(examples=args.examples, seed=args.seed, palette=args.shapes, target=TARGET[args.target])
    rows, failures = [], []
    clock = Clock()
    watched = [(torch_side(), "run", "torch"), (jb, "run", "jax"), (runner, "judge", "judge"),
               (runner, "_accepted", "judge"), (runner, "_one_pass", "loop")]
    for dtype in args.dtypes.split(","):
        start, (c0, s0) = time.perf_counter(), jb.COMPILES.snapshot()
        examples = 0
        todo = [p for p in pairs if dtype in p.dtypes]
        for i, pair in enumerate(todo):
            if i + 1 < len(todo):
                prepare(todo[i + 1], dtype, run)  # as the plugin does for the next test
            with clock.watching(watched):
                records = run_pair(pair, dtype=dtype, run=run)
            examples += max(r.examples for r in records)
            failures += [r.id for r in records if r.outcome == "failed"]
        wall = time.perf_counter() - start
        c1, s1 = jb.COMPILES.snapshot()
        rows.append({"dtype": dtype, "pairs": len(pairs), "wall_s": wall, "examples": examples,
                     "examples_per_s": examples / wall, "compilations": c1 - c0, "compile_s": s1 - s0,
                     "compile_share": (s1 - s0) / wall})
    total = {k: sum(r[k] for r in rows) for k in ("wall_s", "examples", "compilations", "compile_s")}
    total |= {"dtype": "all", "pairs": len(pairs), "examples_per_s": total["examples"] / total["wall_s"],
              "compile_share": total["compile_s"] / total["wall_s"]}
    print(f"autodiff suite: {args.examples} examples per check, {args.shapes or 'fresh'} shapes per check")
    print("compile s: tracing, lowering and compiling on the checking thread (what the wall clock waits for);")
    print(f"{jb.COMPILES.overlapped():.1f} s more ran on the background thread, overlapped with checking")
    print(f"{'dtype':8} {'pairs':>5} {'wall s':>8} {'examples':>9} {'ex/s':>7} {'compiles':>9} {'compile s':>10} {'share':>6}")
    for r in rows + [total]:
        print(f"{r['dtype']:8} {r['pairs']:5d} {r['wall_s']:8.1f} {r['examples']:9d} {r['examples_per_s']:7.1f} "
              f"{r['compilations']:9d} {r['compile_s']:10.1f} {100 * r['compile_share']:5.1f}%")
    print_breakdown(clock.seconds, total, args.examples)
    if failures:
        print(f"{len(failures)} checks failed (their shrinking is part of the time): {', '.join(failures)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows + [total],
                                               "seconds": clock.seconds}, indent=1))
    return 0


def print_breakdown(seconds: dict[str, float], total: dict, examples: int) -> None:
    """ms per example by where it went; the test body is torch + jax + judge (+ compile)."""
    n = max(total["examples"], 1)
    body = seconds.get("torch", 0.0) + seconds.get("jax", 0.0) + seconds.get("judge", 0.0)
    parts = {"hypothesis": seconds.get("loop", 0.0) - body, "torch": seconds.get("torch", 0.0),
             "jax": seconds.get("jax", 0.0) - total["compile_s"], "compile": total["compile_s"],
             "judge": seconds.get("judge", 0.0)}
    print(f"where an example's time goes (ms per example, {n} examples):")
    print("  " + "  ".join(f"{k} {1000 * v / n:.2f}" for k, v in parts.items())
          + f"  | checking loop {1000 * seconds.get('loop', 0.0) / n:.2f}, wall {1000 * total['wall_s'] / n:.2f}")


if __name__ == "__main__":
    sys.exit(main())
