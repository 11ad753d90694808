"""The engine's own mutation test: how often it catches a planted bug, and blames the right side.

For each built-in operation pair, `equivcheck.ops.mutants` makes one side wrong in a known way,
sized in multiples of the bound the engine applies (value offsets x0.5 x2 x10 x1000, NaN and
+-inf at one element, sign flip, rolled output, one ulp, derivative-only offsets); each mutant
runs through the engine (`run_pair`) and the table prints, per mutant class:

  detection   mutants that must fail and did (at least one of their checks failed)
  blame       of those detected, the ones whose every failed record names the mutated side
  passed      mutants inside the bound (x0.5, one ulp) that passed: the engine is not stricter
              than its own table

and the false-alarm rate of the unmutated pairs (failed checks that are not known divergences).
Pairs with a known divergence at the dtype are left out of the mutant runs (their checks fail
unmutated) and listed; a pair with a one-element output gets no "rolled" mutant (rolling changes nothing),
and a mutant that changes none of its side's results on 20 drawn inputs is left out and listed (a
derivative offset where JAX knows the derivative is zero, as for floor, never reaches the custom VJP).

    python benchmarks/oracle_mutants.py                      # 12 pairs spread over the suite
    python benchmarks/oracle_mutants.py --pairs all --clean-examples 100
    python benchmarks/oracle_mutants.py --pairs tanh,matmul --json mutants.json
    python benchmarks/oracle_mutants.py --pairs all --resume mutants.json   # after a crash: the rest
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = "targets: detection 100% at >= x10 and for nonfinite; blame >= 95%; inside-bound mutants pass; 0 false alarms"


TARGET = {None: None, "on": True, "off": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="12", help="'all', a count spread over the suite, or comma-separated names")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--examples", type=int, default=10, help="examples per mutant run")
    ap.add_argument("--clean-examples", type=int, default=100, help="examples per unmutated pair (false alarms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=("on", "off"), default=None,
                    help="Hypothesis's target phase (default: the profile's choice, off but for nightly)")
    ap.add_argument("--json", default=None, help="also write every mutant's result here")
    ap.add_argument("--resume", default=None, metavar="JSON",
                    help="a results file of an earlier run with these settings: its pairs are kept, the rest run, "
                         "and the table covers both (written back to it unless --json is given)")
    args = ap.parse_args(argv)

    from equivcheck.backends import maps
    from equivcheck.engine import KnownDivergences, RunSettings
    from equivcheck.ops.mutants import mutants
    from equivcheck.ops.runner import run_pair
    from suites.test_autodiff import PAIRS

    root = Path(__file__).resolve().parents[1]
    known = KnownDivergences.load([str(root / "suites" / "known_divergences.txt")])
    pairs = [p for p in PAIRS if args.dtype in p.dtypes]
    if args.pairs == "all":
        chosen = pairs
    elif args.pairs.isdigit():
        n = int(args.pairs)
        chosen = [pairs[round(i * (len(pairs) - 1) / max(n - 1, 1))] for i in range(n)]
    else:
        names = args.pairs.split(",")
        chosen = [PAIRS[name] for name in names]
    known_hit = [p.name for p in chosen
                 if any(known.match_check(f"{p.name}::{c}::{args.dtype}::cpu") for c in p.checks)]
    chosen = [p for p in chosen if p.name not in known_hit]

    results: list[dict[str, Any]] = []
    if args.resume:
        # A run the process did not survive (before equivcheck.backends.maps, XLA's LLVM ran out of
        # memory maps after 68 pairs and 53 minutes, then a segfault): its pairs are kept, the others run.
        results = json.loads(Path(args.resume).read_text())
    done = {r["pair"] for r in results}
    out = args.json or args.resume
    start = time.perf_counter()
    for i, pair in enumerate(chosen):
        if pair.name in done:
            continue
        run = RunSettings(examples=args.clean_examples, seed=args.seed, target=TARGET[args.target])
        maps.relieve()  # every mutant compiles its own programs: ~75 memory maps a second
        recs = run_pair(pair, dtype=args.dtype, run=run, known=known.match_check)
        false = [r.id for r in recs if r.outcome == "failed"]
        results.append({"pair": pair.name, "mutant": None, "clean_checks": len(recs), "false_alarms": false})
        run = RunSettings(examples=args.examples, seed=args.seed, target=TARGET[args.target])
        for m in mutants(pair, args.dtype):
            if m.family == "permuted" and _scalar_output(pair, args.dtype):
                continue  # rolling one element changes nothing: no mutant at all
            if m.expect == "fail" and not _has_effect(pair, m, args.dtype):
                results.append({"pair": pair.name, "mutant": m.name, "side": m.side, "no_effect": True})
                continue
            try:
                maps.relieve()
                recs = run_pair(m.pair, dtype=args.dtype, run=run)
            except Exception as exc:  # an engine crash is a finding of this benchmark, not the end of it
                results.append({"pair": pair.name, "mutant": m.name, "side": m.side, "expect": m.expect,
                                "crash": repr(exc)})
                continue
            failed = [r for r in recs if r.outcome == "failed"]
            results.append({"pair": pair.name, "mutant": m.name, "side": m.side, "expect": m.expect,
                            "outcomes": {r.check: r.outcome for r in recs},
                            "blamed": sorted({str(r.side) for r in failed}),
                            "diagnosis": [r.diagnosis for r in failed][:1],
                            # a blame off the mutated side, in full (inputs, values): what a fix starts from
                            "misblamed": {r.check: r.failure_text() for r in failed if r.side != m.side}})
        mine = [r for r in results if r["pair"] == pair.name and "outcomes" in r]
        missed = sum(r["expect"] == "fail" and "failed" not in r["outcomes"].values() for r in mine)
        wrong = sum(r["expect"] == "fail" and r["blamed"] not in ([], [r["side"]]) for r in mine)  # or undecided
        strict = sum(r["expect"] == "pass" and "failed" in r["outcomes"].values() for r in mine)
        print(f"[{i + 1}/{len(chosen)}] {pair.name} ({time.perf_counter() - start:.0f} s): missed {missed}, "
              f"blame not on the mutated side {wrong}, inside-bound failed {strict}, false alarms {len(false)}, "
              f"crashed {sum('crash' in r for r in results if r['pair'] == pair.name)}", file=sys.stderr)
        if out:  # after every pair: a run cut short (killed, out of memory) keeps what it found
            Path(out).write_text(json.dumps(results, indent=1, default=str))

    print(f"equivcheck oracle mutants: {len(chosen)} pairs at {args.dtype}, {args.examples} examples per mutant, "
          f"seed {args.seed}, target phase {args.target or 'as the profile'}; "
          f"left out (known divergence at {args.dtype}): {', '.join(known_hit) or 'none'}")
    print("\n".join(table(results, {p.name: len(p.checks) for p in chosen}, args.clean_examples)))
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


def table(results: list[dict[str, Any]], checks: dict[str, int], clean_examples: int) -> list[str]:
    """The printed table of `results` (this run's and a resumed one's): per mutant class detection,
    right-side blame and crashes; mutants left out for no effect; the unmutated pairs' false alarms.
    `checks`: each pair's number of checks, for results of a run that did not record its clean checks."""
    rows: dict[tuple[str, str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    no_effect, false_alarms, clean = [], 0, collections.Counter()
    for r in results:
        if r["mutant"] is None:  # the unmutated pair; older files kept one line per false alarm
            alarms = r.get("false_alarms", [r["false_alarm"]] if "false_alarm" in r else [])
            false_alarms += len(alarms)
            if r["pair"] not in clean:
                clean[r["pair"]] = r.get("clean_checks", checks.get(r["pair"], 0))
            continue
        if r.get("no_effect"):
            no_effect.append(f"{r['pair']} {r['side']} {r['mutant']}")
            continue
        family, name = r["mutant"].split(":", 1)
        row = rows[(family, name.replace(" one", " (one)").replace(" all", ""), r.get("expect", "fail"))]
        row["n"] += 1
        if "crash" in r:
            row["crashed"] += 1
            continue
        failed = "failed" in r["outcomes"].values()
        row["ok"] += failed if r["expect"] == "fail" else not failed
        row["blamed"] += r["expect"] == "fail" and failed and r["blamed"] == [r["side"]]
    for pair in {r["pair"] for r in results} - set(clean):  # a file written before clean runs were recorded
        clean[pair] = checks.get(pair, 0)
    lines = [f"{'family':<10} {'mutant':<14} {'expect':<6} {'n':>5} {'detected/passed':>16} {'right side':>11} crashed"]
    for (family, name, expect), row in sorted(rows.items(), key=lambda kv: (kv[0][0], _size(kv[0][1]), kv[0][1])):
        rate = f"{row['ok']}/{row['n']} {100 * row['ok'] / row['n']:5.1f}%"
        blame = f"{100 * row['blamed'] / row['ok']:5.1f}%" if expect == "fail" and row["ok"] else "-"
        lines.append(f"{family:<10} {name:<14} {expect:<6} {row['n']:>5} {rate:>16} {blame:>11} {row['crashed']:>7}")
    if no_effect:
        lines.append(f"left out, no effect on the mutated side's results ({len(no_effect)}): {', '.join(no_effect)}")
    lines.append(f"unmutated: {false_alarms} false alarms in {sum(clean.values())} checks of {len(clean)} pairs "
                 f"({clean_examples} examples each)")
    return [*lines, TARGETS]


def _scalar_output(pair: object, dtype: str) -> bool:
    """True when the pair's torch side returns one element on its largest palette shape."""
    import torch

    shapes = pair.inputs.palette(0, 4)[-1]
    args = [torch.as_tensor(a) if hasattr(a, "dtype") else a for a in pair.inputs.placeholders(dtype, shapes)[0]]
    try:
        out = pair.torch_fn(*args)
    except Exception:
        return False
    leaves = out if isinstance(out, (list, tuple)) else [out]
    return all(getattr(x, "numel", lambda: 2)() <= 1 for x in leaves)


def _has_effect(pair: Any, m: Any, dtype: str) -> bool:
    """Whether the mutant changes its side's results on some drawn input: a derivative offset on
    an op whose derivative JAX knows to be zero (floor: a symbolic zero skips the custom VJP)
    changes nothing, and is no mutant to catch."""
    from hypothesis import HealthCheck, Phase, given, settings

    from equivcheck.engine.compare import compare
    from equivcheck.engine.tolerance import Tolerance
    from equivcheck.ops.autodiff import evaluate

    exact = Tolerance(0.0, 0.0, "a mutant must change something")

    class Changed(Exception):
        pass

    # No shrinking (hypothesis.find would shrink, recompiling JAX for every shape it tries).
    @settings(max_examples=20, phases=[Phase.generate], database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.tuples(pair.inputs.strategy(dtype, pair.inputs.palette(0, 4)), st.integers(0, 2**31 - 1)))
    def probe(example: Any) -> None:
        args, seed = example
        old, new = (evaluate(p, args, seed, dtype=dtype, device="cpu", checks=m.checks) for p in (pair, m.pair))
        a, b = (getattr(ev, m.side).values for ev in (old, new))
        if any(c in a and c in b and not compare(a[c], b[c], exact).ok for c in m.checks):
            raise Changed

    try:
        probe()
    except Changed:
        return True
    return False


def _size(name: str) -> float:
    try:
        return float(name.split()[0].lstrip("x"))
    except ValueError:
        return 0.0


if __name__ == "__main__":
    raise SystemExit(main())
