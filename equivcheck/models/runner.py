"""Run a ModelPair's checks under Hypothesis; localise failures; file CheckRecords.

Examples. `forward`, `grad` and `modes` draw the model's inputs from the pair's `Inputs`
(shapes from a palette of two, so JAX compiles twice) and a weight seed: the torch model is
built under torch.manual_seed(seed) and its weights converted. `train` draws a batch seed,
a weight seed and a number of steps n <= K: K batches of one shape come from a generator
seeded by it within the inputs' ranges, JAX runs all K steps as one compiled scan, and the
first n steps are compared.

Tolerance. forward/modes use the table's forward row, grad the vjp row (x2). A trajectory
step n is held to n times the grad row (equivcheck.optim.runner.trajectory_tolerance:
each step adds at most one step's rounding difference and a stable step does not amplify
it); the record states it, and notes the worst error over the one-step bound by step.
"""
from __future__ import annotations

import dataclasses

import time
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from equivcheck.engine import tolerance
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.search import Search
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms
from equivcheck.models.edges import model_inputs
from equivcheck.models.diagnose import diagnose, layer_table
from equivcheck.models.evaluate import SCALE_OF, Example, Result, evaluate, mapping
from equivcheck.models.fit import run_fit
from equivcheck.ops.shapes import ShapeRuleError
from equivcheck.optim.trajectory import BUCKETS

PALETTE = 2  # input shapes per check: each costs a compilation of every program


class _Failed(Exception):
    def __init__(self, result: Result, ex: Example) -> None:
        super().__init__(result.verdict.message)
        self.result, self.ex = result, ex


# ---- the Hypothesis loop ----------------------------------------------------------------

def _palette(pair: Any, seed: int, size: int) -> list[Any]:
    try:
        return pair.inputs.palette(seed, size)
    except ShapeRuleError:
        raise
    except Exception as exc:  # a rule's own palette(): its fault, reported like sample()'s
        raise ShapeRuleError(f"raised {type(exc).__name__}: {exc}") from exc


def _strategy(pair: Any, check: str, dtype: str, run: RunSettings) -> st.SearchStrategy:
    seeds = st.integers(0, 2**16 - 1)
    if check == "train":
        shapes = _palette(pair, run.shape_seed(pair.name, check, dtype, run.device), 1)
        return st.tuples(st.sampled_from(shapes), seeds, seeds, st.integers(1, pair.steps)).map(
            lambda t: Example(shapes=t[0], seed=t[1], batch_seed=t[2], steps=t[3]))
    palette = _palette(pair, run.shape_seed(pair.name, check, dtype, run.device), PALETTE)
    return st.tuples(pair.inputs.strategy(dtype, palette), seeds).map(lambda t: Example(args=t[0], seed=t[1]))


def _run_check(pair: Any, check: str, ents: list[mm.Entry], dtype: str, run: RunSettings, tol: Tolerance,
               expected: bool, accepted: list[Result]) -> tuple[list[Result], _Failed | None]:
    seen: list[Result] = []
    search = Search(run, _Failed)

    def test(ex: Example) -> None:
        res = evaluate(pair, check, ex, ents, dtype, run, tol)
        if res.verdict.ok:
            seen.append(res)
            return
        if res.accepted:
            if not search.shrinking:  # count drawn examples, not the shrinker's variants of a failure
                accepted.append(res)
            return
        raise _Failed(res, ex)

    witnesses = [dataclasses.replace(w, args=pair.inputs.cast(w.args, dtype)) for w in pair.witnesses.get(check, ())]
    failed = search(test, _strategy(pair, check, dtype, run), digest=f"model:{pair.name}:{check}:{dtype}",
                    seed=run.item_seed(pair.name, check, dtype, run.device), shrink=not expected, explicit=witnesses)
    return seen, failed


def run_model_pair(pair: Any, *, dtype: str, run: RunSettings,
                   known: Callable[[str], tuple[str, str] | None] = lambda _id: None, nodeid: str = "",
                   replay: str = "") -> list[CheckRecord]:

    records = []
    try:
        model = ms.build_torch(pair, 0, dtype, run.device)
    except Exception:  # noqa: BLE001 - the mapping below builds it again and reports why it cannot
        model = None
    if model is not None:
        pair = pair.replace(inputs=model_inputs(pair.inputs, model))
    try:
        ents = mapping(pair, dtype, run.device)
        broken = ""
    except Exception as exc:
        ents, broken = [], f"the weight mapping failed: {type(exc).__name__}: {exc}"
    for check in pair.checks:
        start = time.perf_counter()
        base = tolerance.lookup(dtype, device=run.device, precision=run.precision, check=SCALE_OF[check],
                                tags=pair.tags, override=pair.tolerance_for(dtype, check))
        hit = known(f"{pair.name}::{check}::{dtype}::{run.device}")
        growth = f"; x n at step n (linear accumulation over {pair.steps} steps)" if check in ("train", "fit") else ""
        rec = CheckRecord(pair.name, check, dtype, run.device, run.precision, "passed",
                          tolerance={"rtol": base.rtol, "atol": base.atol, "per": base.per,
                                     "reason": base.reason + growth},
                          tags=sorted(pair.tags), nodeid=nodeid, replay=replay,
                          witnessed=len(pair.witnesses.get(check, ())))
        rule = _rule_error(pair, check, dtype, run)
        if broken or rule:
            rec.outcome, rec.kind, rec.message, rec.worst_ratio = "failed", "error", broken or rule, float("inf")
            if rule and not broken:
                rec.diagnosis = ("neither side ran: the pair's shape rule (its Inputs' ShapeSpec, or a Custom's "
                                 "sampler) must give a tuple of one shape per array argument")
        elif check == "fit":
            run_fit(pair, rec, ents, dtype, run, base)
        elif check == "onnx":
            from equivcheck.onnx.check import run_onnx_check  # onnx, onnxruntime only when the check runs

            run_onnx_check(pair, rec, ents, dtype, run, base)
        else:
            accepted: list[Result] = []
            seen, failed = _run_check(pair, check, ents, dtype, run, base, hit is not None, accepted)
            rec.examples = len(seen) + len(accepted) + bool(failed)
            rec.ill_conditioned = len(accepted)
            if accepted:
                rec.notes.append(f"{len(accepted)} examples past the trajectory bound agreed in float64, and each "
                                 f"side's {dtype} run was, step by step, float64's training from where it stood: "
                                 "accepted as rounding the training amplified (equivcheck.models.sensitivity)")
            rec.worst_ratio = max((r.verdict.ratio for r in seen), default=0.0)
            worst_leaf = max((r.verdict.worst for r in seen if r.verdict.worst), key=lambda w: w.ratio, default=None)
            if worst_leaf is not None:
                w = worst_leaf
                rec.max_abs_err, rec.max_rel_err, rec.max_ulp = w.max_abs, w.max_rel, w.max_ulp
            if check == "train":
                rec.notes.append(_margins(seen))
                full = max(seen, key=lambda r: len(r.curves["torch"]), default=None) if seen else None
                if full is not None:
                    rec.extra["curves"] = full.curves
            if failed is not None:
                res, ex = failed.result, failed.ex
                v = res.verdict
                worst = v.worst if v.kind == "values" else None
                rec.kind = v.kind
                rec.message = v.message + (f"\n  worst: {worst.summary()}" if worst else "")
                rec.worst_ratio = worst.ratio if worst else float("inf")
                if worst is not None:
                    rec.max_abs_err, rec.max_rel_err, rec.max_ulp = worst.max_abs, worst.max_rel, worst.max_ulp
                rec.inputs = ex.describe()
                if res.curves:
                    rec.extra["curves"] = res.curves
                rec.side, rec.diagnosis, rows = diagnose(pair, check, ex, res, ents, dtype, run, base)
                rec.extra["layers"] = rows
                rec.outcome = "known-divergence" if hit else "failed"
            elif hit:
                rec.outcome = "xpass"
            if failed is None and seen:
                rec.extra["layers"] = layer_table(pair, check, ents, dtype, run, base)
        if hit:
            rec.known_pattern, rec.known_reason = hit
        rec.seconds = time.perf_counter() - start
        records.append(rec)
    return records


def _rule_error(pair: Any, check: str, dtype: str, run: RunSettings) -> str:
    """Why the pair's shape rule gives no shapes for this check ("" when it does): a failed
    record naming it, where an exception out of the runner would lose the test's records."""
    if check == "fit":  # a Fit's data set brings its own shapes
        return ""
    try:
        _strategy(pair, check, dtype, run)
    except ShapeRuleError as exc:
        return f"the shape rule of model pair {pair.name!r} {exc}"
    return ""


def _margins(seen: list[Result]) -> str:
    cells = []
    for lo, hi in BUCKETS:
        rs = [r for res in seen for n, r in res.ratios if lo <= n <= hi]
        if rs:
            cells.append(f"{lo}-{hi}: {max(rs):.2g}" if lo != hi else f"{lo}: {max(rs):.2g}")
    return "worst error / one-step bound by step: " + (", ".join(cells) or "-")
