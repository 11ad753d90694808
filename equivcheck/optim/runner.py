"""Run an OptimizerPair's checks under Hypothesis; compare every step; file CheckRecords.

A trajectory step n is held to n times the one-step bound (equivcheck.optim.trajectory says
why the growth is linear). Where a trajectory does amplify rounding (NAdam oscillating about the optimum: n**1.8, up to the bound), an example
past the bound is accepted only if float64 runs that round like the tested dtype spread as
far (equivcheck.optim.diagnose.explained_by_rounding); the record counts those. Each record
notes the worst error over the *one-step* bound by step bucket: how much of the linear
allowance a trajectory actually uses.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from hypothesis import strategies as st

from equivcheck.engine import tolerance
from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.search import Search
from equivcheck.engine.tolerance import Tolerance
from equivcheck.optim.diagnose import diagnose, explained_by_rounding
from equivcheck.optim.problems import Problem
from equivcheck.optim.sides import MAX_STEPS, compiled, scan_length
from equivcheck.optim.trajectory import (
    BUCKETS,
    GROWTH,
    PROBLEM_OF,
    Example,
    Outcome,
    evaluate,
    movable,
)


class _Failed(Exception):
    def __init__(self, outcome: Outcome, example: Example) -> None:
        super().__init__(outcome.verdict.message if outcome.verdict else "failed")
        self.outcome, self.example = outcome, example


def _palette(pair: Any, check: str, problem: Problem, dtype: str, run: RunSettings) -> list[Any]:
    size = 2 if check == "step" else 1  # trajectories compile a 100-step scan: one shape set each
    return problem.palette(run.shape_seed(pair.name, problem.name, dtype, run.device), size)


def _strategy(pair: Any, check: str, dtype: str, run: RunSettings) -> st.SearchStrategy:
    steps = st.integers(1, MAX_STEPS)
    if check == "schedule":
        return steps.map(lambda n: Example("schedule", steps=n))
    problem = PROBLEM_OF[check]
    # Built once per palette entry (a strategy built per example is validated anew, which
    # cost more than drawing the values); drawn by index, as sampled_from(palette) did.
    built = [problem.draw(s, dtype, pair.accumulate) for s in _palette(pair, check, problem, dtype, run)]
    drawn = st.sampled_from(range(len(built))).flatmap(built.__getitem__)
    if check == "step":
        return drawn.map(lambda pd: Example("step", pd[0], pd[1], 1))
    if check == "mlp":  # and a step after which the state moves (none for a 1-step trajectory)
        return st.tuples(drawn, steps, st.integers(1, MAX_STEPS - 1)).map(
            lambda x: Example("mlp", x[0][0], x[0][1], x[1], min(x[2], x[1] - 1)))
    return st.tuples(drawn, steps).map(lambda x: Example(check, x[0][0], x[0][1], x[1]))


def witnesses(pair: Any, check: str, dtype: str) -> list[Example]:
    """The pair's witnesses for `check`, their floating leaves cast to `dtype`."""
    def cast(tree: Any) -> Any:
        # Nested lists are leaves (array values), not pytree nodes: trees are nested dicts.
        return jax.tree_util.tree_map(
            lambda a: np.asarray(a, np_dtype(dtype)) if np.asarray(a).dtype.kind == "f" else np.asarray(a), tree,
            is_leaf=lambda x: isinstance(x, list))

    return [dataclasses.replace(w, params=cast(w.params), data=cast(w.data)) for w in pair.witnesses
            if w.check == check]


def prepare(pair: Any, dtype: str, run: RunSettings) -> None:
    """Compile every program this pair's checks will call, on the background thread."""
    if pair.unavailable or dtype not in pair.dtypes:
        return
    for check in pair.checks:
        problem = PROBLEM_OF.get(check)
        if problem is None:
            continue
        for shapes in _palette(pair, check, problem, dtype, run):
            params, data = problem.zeros(shapes, dtype, pair.accumulate)
            compiled(pair, problem, scan_length(check), params, data, dtype, background=True)


def _run_check(pair: Any, check: str, dtype: str, run: RunSettings, base: Tolerance, expected: bool,
               ill: list[int], explicit: list[Example]) -> tuple[list[Outcome], _Failed | None]:

    seen: list[Outcome] = []
    search = Search(run, _Failed, smaller=lambda new, best: new.example.steps < best.example.steps)

    def test(ex: Example) -> None:
        out = evaluate(pair, ex, dtype, run, base)
        if out.ok:
            seen.append(out)
            return
        # One perturbation seed for every run: a verdict on an example (a witness above all) must
        # not depend on the run's seed, as it did when the jitter's draw came from it.
        if explained_by_rounding(pair, ex, out, dtype, run, base, 0):
            if not search.shrinking:  # count drawn examples, not the shrinker's variants of a failure
                ill.append(ex.steps)
            return
        raise _Failed(out, ex)

    failed = search(test, _strategy(pair, check, dtype, run), digest=f"optim:{pair.name}:{check}:{dtype}",
                    seed=run.item_seed(pair.name, check, dtype, run.device), shrink=not expected,
                    explicit=explicit)
    return seen, failed


def run_optimizer_pair(pair: Any, *, dtype: str, run: RunSettings,
                       known: Callable[[str], tuple[str, str] | None] = lambda _id: None, nodeid: str = "",
                       replay: str = "") -> list[CheckRecord]:

    records = []
    if pair.unavailable:
        return [CheckRecord(pair.name, c, dtype, run.device, run.precision, "skipped", message=pair.unavailable,
                            nodeid=nodeid) for c in pair.checks]
    prepare(pair, dtype, run)
    for check in pair.checks:
        start = time.perf_counter()
        base = tolerance.lookup(dtype, device=run.device, precision=run.precision, check=check,
                                override=pair.tolerance_for(dtype, check))
        cid = f"{pair.name}::{check}::{dtype}::{run.device}"
        hit = known(cid)
        ill: list[int] = []
        given = witnesses(pair, check, dtype)
        seen, failed = _run_check(pair, check, dtype, run, base, hit is not None, ill, given)
        growth = "" if check == "step" else f"; x n after n steps ({GROWTH} accumulation, equivcheck.optim.runner)"
        rec = CheckRecord(pair.name, check, dtype, run.device, run.precision, "passed",
                          examples=len(seen) + len(ill) + bool(failed), ill_conditioned=len(ill),
                          tolerance={"rtol": base.rtol, "atol": base.atol, "reason": base.reason + growth},
                          tags=sorted(pair.tags), nodeid=nodeid, replay=replay,
                          witnessed=len(given))
        rec.worst_ratio = max((o.model_ratio for o in seen), default=0.0)
        rec.notes = _margins(seen) if check != "step" else []
        if check == "mlp" and not movable(pair):
            rec.notes.append("the optimizer state was not moved between frameworks mid-run: the pair has no StateMap "
                             "(equivcheck.optim.state) saying how torch's state reads in optax's")
        if ill:
            rec.notes.append(f"{len(ill)} examples beyond the bound were within the float64 trajectory's sensitivity "
                             "to input rounding (ill-conditioned): accepted")
        if pair.parts:
            rec.notes.append("optax side: " + " -> ".join(pair.parts))
        if failed is not None:
            out, ex = failed.outcome, failed.example
            v = out.verdict
            worst = v.worst if v.kind == "values" else None
            rec.kind, rec.message = v.kind, v.message + (f"\n  worst: {worst.summary()}" if worst else "")
            rec.worst_ratio = (worst.ratio if worst else float("inf"))
            if worst is not None:
                rec.max_abs_err, rec.max_rel_err, rec.max_ulp = worst.max_abs, worst.max_rel, worst.max_ulp
            rec.inputs = ex.describe()
            if hit is None:
                rec.side, rec.diagnosis = diagnose(pair, ex, out, dtype, run, base)
            else:
                rec.side = out.side_error if out.side_error in ("torch", "jax") else None
            rec.outcome = "known-divergence" if hit else "failed"
        elif hit:
            rec.outcome = "xpass"
        if hit:
            rec.known_pattern, rec.known_reason = hit
        rec.seconds = time.perf_counter() - start
        records.append(rec)
    return records


def _margins(seen: list[Outcome]) -> list[str]:
    if not seen:
        return []
    cells = []
    for lo, hi in BUCKETS:
        rs = [r for o in seen for n, r in o.ratios if lo <= n <= hi]
        if rs:
            cells.append(f"{lo}-{hi}: {max(rs):.2g}" if lo != hi else f"{lo}: {max(rs):.2g}")
    longest = max((n for o in seen for n, _ in o.ratios), default=0)
    return [f"worst error / one-step bound by step ({longest} steps at most): " + ", ".join(cells)]


__all__ = ["prepare", "run_optimizer_pair"]
