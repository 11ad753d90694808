"""Run one pair at one dtype and device under Hypothesis, and turn the outcome into records.

Every example runs all remaining checks on both sides. The first check to fail stops the
pass: Hypothesis shrinks to a minimal example for it, the float64 diagnosis runs once on
that example, and a new pass continues with the checks still standing, so every check gets
its full example budget and its own counterexample.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import strategies as st
from hypothesis import target

from equivcheck.backends import jax_side
from equivcheck.engine import tolerance
from equivcheck.engine.compare import LeafDiff, Verdict, format_args, n_elements
from equivcheck.engine.records import CheckRecord, RunSettings, check_id
from equivcheck.engine.search import FLAKY_NOTE, Search
from equivcheck.ops.autodiff import CHECKS, Evaluation, evaluate, judge, wide
from equivcheck.ops.conditioning import LOWP_CAP, LOWP_FLOOR, LOWP_SAFETY, explained_by_precision, explained_by_rounding
from equivcheck.ops.diagnose import diagnose
from equivcheck.ops.nudge import nudged
from equivcheck.ops.shapes import ShapeRuleError

if TYPE_CHECKING:
    from equivcheck.ops.pairs import Pair

# Earlier failing examples diagnosed when the minimal one cannot name a side: each costs a
# float64 re-run and finite differences, so a few (the drawn one is first).
MAX_ELSEWHERE = 3


class CheckFailed(Exception):
    """Raised inside the Hypothesis test so that it shrinks; carries the evidence out."""

    def __init__(self, check: str, verdict: Verdict, args: Sequence[Any], ev: Evaluation) -> None:
        super().__init__(f"{check}: {verdict.kind}: {verdict.message}")
        self.check, self.verdict, self.args, self.ev = check, verdict, args, ev
        self.others: list[CheckFailed] = []  # other failing examples of the same check, first found first


@dataclasses.dataclass
class _Stats:
    examples: int = 0
    ratio: float = 0.0
    leaf: LeafDiff | None = None
    notes: set[str] = dataclasses.field(default_factory=set)
    accepted: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    not_applicable: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # why -> n


def run_pair(
    pair: Pair,
    *,
    dtype: str,
    run: RunSettings,
    known: Callable[[str], tuple[str, str] | None] = lambda _id: None,
    nodeid: str = "",
    replay: str = "",
) -> list[CheckRecord]:
    """All checks of `pair` at `dtype` on `run.device`; one record per check.

    `known(check_id)` returns (pattern, reason) for an expected divergence.
    """
    start = time.perf_counter()
    checks = [c for c in CHECKS if c in pair.checks]
    tols = {c: tolerance.lookup(dtype, device=run.device, precision=run.precision, check=c, tags=pair.tags,
                                override=pair.tolerance_for(dtype, c)) for c in checks}
    item_seed = run.item_seed(pair.name, dtype, run.device)
    stats = {c: _Stats() for c in checks}
    failures: dict[str, CheckFailed] = {}
    active = list(checks)
    try:
        palette = _palette(pair, dtype, run)
        prepare(pair, dtype, run)
        examples = st.tuples(pair.inputs.strategy(dtype, palette), st.integers(0, 2**31 - 1))
    except ShapeRuleError as exc:
        return _broken_rule(pair, checks, exc, dtype, run, tols, nodeid, replay, time.perf_counter() - start)
    # A known divergence needs no minimal example and no pass of its own: its first failing
    # example (a witness, run first) is kept and the pass goes on for the other checks.
    expected = {c for c in checks if known(check_id(pair.name, c, dtype, run.device))}
    drawn: set[Any] = set()
    top_ups: list[Any] | None = None  # palette shapes the search never drew, each searched on its own
    share: int | None = None
    while active:
        found_known: dict[str, CheckFailed] = {}
        try:
            failure = _one_pass(pair, examples, active, tols, stats, dtype, run, item_seed, expected, found_known,
                                drawn, share, witnesses=top_ups is None)
        except ShapeRuleError as exc:  # drawn afresh each example (no palette): found mid-search
            return _broken_rule(pair, checks, exc, dtype, run, tols, nodeid, replay, time.perf_counter() - start)
        for check, found in found_known.items():  # an expected check is kept, never raised as `failure`
            if check in active:
                failures[check] = found
                active.remove(check)
        if failure is None:
            if top_ups is None:
                top_ups = [ss for ss in palette or () if tuple(map(tuple, ss)) not in drawn]
                # Hypothesis's first example is the simplest (zeros): a search of one finds nothing
                share = max(2, run.examples // len(palette or [1]))
            if not top_ups:
                break
            examples = st.tuples(pair.inputs.strategy(dtype, [top_ups.pop(0)]), st.integers(0, 2**31 - 1))
            continue
        failures[failure.check] = failure
        active.remove(failure.check)
        # The minimal example often breaks other checks too (a side that raises breaks all):
        # those are failures as they stand, and need no pass of their own.
        for check in list(active):
            cascaded = _failure_of(pair, check, failure.args, failure.ev, tols[check], dtype)
            if cascaded is not None:
                cascaded.verdict.notes.append(f"found on the minimal example of the {failure.check} failure")
                cascaded.others = [f for o in failure.others
                                   if (f := _failure_of(pair, check, o.args, o.ev, tols[check], dtype))]
                failures[check] = cascaded
                active.remove(check)
    seconds = time.perf_counter() - start
    records = []
    for check in checks:
        tol = tols[check]
        rec = CheckRecord(
            pair=pair.name, check=check, dtype=dtype, device=run.device, precision=run.precision, outcome="passed",
            examples=stats[check].examples, worst_ratio=stats[check].ratio,
            tolerance={"rtol": tol.rtol, "atol": tol.atol, "per": tol.per, "reason": tol.reason},
            seconds=seconds / max(len(checks), 1), notes=sorted(stats[check].notes), tags=sorted(pair.tags),
            nodeid=nodeid, replay=replay, ill_conditioned=stats[check].accepted["ill-conditioned"],
            low_precision=stats[check].accepted["low-precision"], witnessed=len(pair.witnesses),
        )
        if rec.ill_conditioned:
            rec.notes.append(f"{rec.ill_conditioned} examples beyond the table bound were within the float64 "
                             "result's sensitivity to input rounding (ill-conditioned): accepted")
        if rec.low_precision:
            rec.notes.append(f"{rec.low_precision} examples beyond the table bound agreed in float32 on the same "
                             f"inputs, each side within {LOWP_SAFETY:g}x what rounding every primitive to {dtype} "
                             f"moves the answer plus {LOWP_FLOOR:g} ulps (at most {LOWP_CAP:g}): accepted as the "
                             "frameworks' low-precision "
                             "arithmetic (torch computes in float32 inside kernels, XLA rounds every primitive)")
        _fill_errors(rec, stats[check].leaf)
        hit = known(rec.id)
        na = stats[check].not_applicable
        if check in failures:
            # off the minimal example's kink first, then a fresh search (_decide_elsewhere)
            sources = (functools.partial(nudged, pair, failures[check], tol, dtype, run.device, _failure_of),
                       functools.partial(_more_failures, pair, examples, check, tol, dtype, run, item_seed + 1))
            _fill_failure(rec, failures[check], pair, dtype, tol, sources)
            rec.outcome = "known-divergence" if hit else "failed"
        elif na and sum(na.values()) == rec.examples:
            # Nothing to differentiate in any example: say so, never "ok" over zeros.
            rec.outcome, rec.kind = "skipped", "not-applicable"
            rec.message = f"{check}: " + "; ".join(sorted(na))
        elif hit:
            rec.outcome = "xpass"
        if na and rec.outcome != "skipped":
            rec.notes += [f"{n} examples not applicable: {why}" for why, n in sorted(na.items())]
        if hit:
            rec.known_pattern, rec.known_reason = hit
        records.append(rec)
    if "onnx" in pair.checks or (run.onnx and pair.family == "layers"):
        from equivcheck.onnx.layers import run_layer_onnx, vote  # onnx, onnxruntime only when the check runs

        tol = tolerance.lookup(dtype, device=run.device, precision=run.precision, check="forward", tags=pair.tags,
                               override=pair.tolerance_for(dtype, "forward"))
        rec = run_layer_onnx(pair, dtype, run, tol, palette)
        hint = vote(rec)
        # the forward check may leave the side undecided; ONNX Runtime is a third witness, so say how it voted
        for fwd in records:
            if fwd.check == "forward" and fwd.outcome in ("failed", "known-divergence") and hint:
                fwd.diagnosis = f"{fwd.diagnosis}; onnx check: {hint}" if fwd.diagnosis else f"onnx check: {hint}"
        rec.nodeid, rec.replay, rec.family = nodeid, replay, pair.family
        hit = known(rec.id)
        if hit:
            rec.outcome = {"failed": "known-divergence", "passed": "xpass"}.get(rec.outcome, rec.outcome)
            rec.known_pattern, rec.known_reason = hit
        records.append(rec)
    return records


def _palette(pair: Pair, dtype: str, run: RunSettings) -> list[Any] | None:
    if not run.palette:
        return None
    try:
        return pair.inputs.palette(run.shape_seed(pair.name, dtype, run.device), run.palette)
    except ShapeRuleError:
        raise
    except Exception as exc:  # a rule's own palette(): its fault, reported like sample()'s
        raise ShapeRuleError(f"raised {type(exc).__name__}: {exc}") from exc


def _broken_rule(pair: Pair, checks: list[str], exc: ShapeRuleError, dtype: str, run: RunSettings,
                 tols: dict[str, Any], nodeid: str, replay: str, seconds: float) -> list[CheckRecord]:
    """Every check failed, no side named: without shapes there is no example to run. A record,
    not an exception, so the other tests and the report go on."""
    message = f"the shape rule of pair {pair.name!r} {exc}"
    return [CheckRecord(pair=pair.name, check=c, dtype=dtype, device=run.device, precision=run.precision,
                        outcome="failed", kind="error", message=message, worst_ratio=math.inf,
                        tolerance={"rtol": tols[c].rtol, "atol": tols[c].atol, "per": tols[c].per,
                                   "reason": tols[c].reason},
                        seconds=seconds / len(checks), tags=sorted(pair.tags), nodeid=nodeid, replay=replay,
                        diagnosis="neither side ran: the pair's shape rule (its Inputs' ShapeSpec, or a Custom's "
                                  "sampler) must give a tuple of one shape per array argument")
            for c in checks]


def prepare(pair: Pair, dtype: str, run: RunSettings) -> None:
    """Start compiling the JAX programs `run_pair` will need, on a background thread.

    The palette is a function of the seed, so this can run ahead: the plugin prepares the
    next test while the current one checks.
    """
    palette = _palette(pair, dtype, run)
    if palette:
        checks = [c for c in CHECKS if c in pair.checks]
        placeholders = [a for shapes in palette for a in pair.inputs.placeholders(dtype, shapes)]
        jax_side().precompile(pair.jax_fn, placeholders, pair.diff_args, checks, run.device, wide(pair, dtype))


def _one_pass(pair: Pair, examples: st.SearchStrategy, active: list[str], tols: dict[str, Any],
              stats: dict[str, _Stats], dtype: str, run: RunSettings, item_seed: int,
              expected: set[str] = frozenset(), found_known: dict[str, CheckFailed] | None = None,
              shapes: set[Any] | None = None, max_examples: int | None = None, witnesses: bool = True
              ) -> CheckFailed | None:
    """One search over the `active` checks: the failure to shrink and report, or None. A check
    in `expected` (a known divergence) that fails goes into `found_known` at its first failing
    example, unshrunk, and is judged no further in this pass. The array shapes of every example
    run go into `shapes`."""
    search = Search(run, CheckFailed, smaller=lambda new, best: n_elements(new.args) < n_elements(best.args))
    found_known = {} if found_known is None else found_known

    def test(example: tuple[tuple[Any, ...], int]) -> None:
        args, vec_seed = example
        if shapes is not None:
            shapes.add(pair.inputs.shapes_of(args))
        ev = evaluate(pair, args, vec_seed, dtype=dtype, device=run.device, checks=active)
        for check in active:
            if check in found_known:
                continue
            verdict = judge(pair, ev, check, tols[check], args)
            s = stats[check]
            s.examples += 1
            s.notes.update(verdict.notes)
            if verdict.kind == "not-applicable":
                s.not_applicable[verdict.message] += 1
                continue
            if not verdict.ok:
                # One perturbation seed for acceptance and diagnosis: both apply one rounding rule
                # and must reach one conclusion on one example.
                why = _accepted(pair, check, args, ev, verdict, dtype, tols[check], 0)
                if why:
                    s.accepted[why] += 1
                    continue
                if check in expected:
                    found_known[check] = CheckFailed(check, verdict, args, ev)
                    continue
                raise CheckFailed(check, verdict, args, ev)
            if verdict.ratio >= s.ratio:
                s.ratio, s.leaf = verdict.ratio, verdict.worst
            # Steer generation towards the inputs where the two sides drift furthest apart.
            target(min(verdict.ratio, 1e6), label=check)

    witnesses = [(pair.inputs.cast(w, dtype), 0) for w in pair.witnesses] if witnesses else []
    failed = search(test, examples, digest=f"{pair.name}:{dtype}:{run.device}", seed=item_seed, explicit=witnesses,
                    max_examples=max_examples)
    if failed is not None:
        failed.others = [f for f in search.seen if f is not failed and f.check == failed.check]
    if failed is not None and search.flaky:
        failed.verdict.notes.append(FLAKY_NOTE)
    elif failed is not None and search.out_of_time:
        failed.verdict.notes.append(f"shrinking stopped after {run.shrink_seconds:g} s: the smallest failing "
                                    "example found is shown")
    return failed


def _accepted(pair: Pair, check: str, args: Any, ev: Evaluation, verdict: Verdict, dtype: str,
              tol: Any, seed: int) -> str | None:
    """Why a disagreement beyond the table is no difference, or None."""
    try:
        if explained_by_rounding(pair, check, args, ev, verdict, dtype, tol, seed):
            return "ill-conditioned"
        if explained_by_precision(pair, check, args, ev, verdict, dtype):
            return "low-precision"
    except Exception:  # a failing re-run leaves the failure standing
        return None
    return None


def _failure_of(pair: Pair, check: str, args: Any, ev: Evaluation, tol: Any, dtype: str) -> CheckFailed | None:
    """`check` judged on an evaluated example: its failure, or None when it passes or the
    disagreement is accepted (ill-conditioned, low precision)."""
    verdict = judge(pair, ev, check, tol, args)
    if verdict.ok or _accepted(pair, check, args, ev, verdict, dtype, tol, 0):
        return None
    return CheckFailed(check, verdict, args, ev)


def _more_failures(pair: Pair, examples: st.SearchStrategy, check: str, tol: Any, dtype: str, run: RunSettings,
                   seed: int) -> list[CheckFailed]:
    """Up to MAX_ELSEWHERE failing examples of `check` from a fresh search (another seed, no
    shrinking): when the search stopped at its first, simplest example, the only ones there are."""
    found: list[CheckFailed] = []

    def body(example: tuple[tuple[Any, ...], int]) -> None:
        args, vec_seed = example
        ev = evaluate(pair, args, vec_seed, dtype=dtype, device=run.device, checks=[check])
        failed = _failure_of(pair, check, args, ev, tol, dtype)
        if failed is not None:
            found.append(failed)
            if len(found) >= 2 * MAX_ELSEWHERE:
                raise found[-1]

    Search(run, CheckFailed)(body, examples, digest=f"{pair.name}:{dtype}:{run.device}:elsewhere", seed=seed,
                             shrink=False)
    return found


def _decide_elsewhere(failure: CheckFailed, pair: Pair, dtype: str, tol: Any,
                      sources: Sequence[Callable[[], list[CheckFailed]]]) -> None:
    """The minimal example lies where no side can be named (a kink, unstable differences):
    shrinking heads for zeros and ties, which is where max, sort or relu have kinks. Failing
    examples found before it (the drawn one first), then the `sources` (the example moved off its
    kink, equivcheck.ops.nudge; a fresh search), get the same
    diagnosis; the first that names a side decides, and the record says it was decided
    there, with its inputs."""
    for others in (lambda: failure.others, *sources):
        try:
            candidates = others()
        except Exception:  # noqa: BLE001 - advice only: the minimal example's verdict stands
            return
        # Generation starts from the simplest inputs (zeros, one value repeated): the examples
        # with the most distinct values are the least likely to sit on a kink, so they go first.
        candidates = sorted((c for c in candidates if not _same_args(c.args, failure.args)), key=_distinct,
                            reverse=True)
        for other in candidates[:MAX_ELSEWHERE]:
            try:
                diagnose(pair, other.check, other.args, other.ev, other.verdict, dtype=dtype, tol=tol)
            except Exception:  # noqa: BLE001, S112 - advice only, as for the minimal example
                continue
            # "both" at a larger example is most often the arbiter's differences crossing a kink
            # at another element than the failing one: only one side named decides.
            if other.verdict.side in ("torch", "jax"):
                failure.verdict.side = other.verdict.side
                failure.verdict.diagnosis = (f"decided at another failing example ({format_args(other.args)}): "
                                             f"{other.verdict.diagnosis}. At the minimal example shown: "
                                             f"{failure.verdict.diagnosis}")
                return


def _same_args(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Element by element, NaNs equal: the printed form summarises large arrays, so two examples
    differing only in the elided middle would print alike and the other would never be tried."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape
                    and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")):
                return False
        elif not _scalar_equal(x, y):
            return False
    return True


def _scalar_equal(x: Any, y: Any) -> bool:
    try:
        return bool(x == y) or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
    except Exception:  # noqa: BLE001 - no usable ==: call them different, so the other is tried
        return False


def _distinct(failure: CheckFailed) -> int:
    return sum(len(np.unique(a)) for a in failure.args if isinstance(a, np.ndarray) and a.dtype.kind == "f")


def _fill_errors(rec: CheckRecord, leaf: LeafDiff | None) -> None:
    if leaf is not None:
        rec.max_abs_err, rec.max_rel_err, rec.max_ulp = leaf.max_abs, leaf.max_rel, leaf.max_ulp


def _fill_failure(rec: CheckRecord, failure: CheckFailed, pair: Pair, dtype: str, tol: Any,
                  sources: Sequence[Callable[[], list[CheckFailed]]] = ()) -> None:
    verdict = failure.verdict
    try:
        diagnose(pair, failure.check, failure.args, failure.ev, verdict, dtype=dtype, tol=tol)
    except Exception as exc:  # advice only: the failure stands without it
        verdict.diagnosis = f"diagnosis failed: {type(exc).__name__}: {exc}"
    if verdict.side is None and verdict.local:
        _decide_elsewhere(failure, pair, dtype, tol, sources)
    rec.kind, rec.side, rec.diagnosis = verdict.kind, verdict.side, verdict.diagnosis
    worst = verdict.worst if verdict.kind == "values" else None
    rec.message = verdict.message + (f"\n  worst: {worst.summary()}" if worst else "")
    if worst is not None:
        rec.worst_ratio = worst.ratio
        _fill_errors(rec, worst)
    else:
        rec.worst_ratio = math.inf
    rec.inputs = format_args(failure.args)
    rec.notes = sorted(set(rec.notes) | set(verdict.notes))

