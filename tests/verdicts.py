"""Shared by the verdict tests: one failing example taken through the runner's steps."""
from __future__ import annotations

from equivcheck.engine import tolerance
from equivcheck.ops.autodiff import evaluate, judge
from equivcheck.ops.conditioning import explained_by_precision, explained_by_rounding
from equivcheck.ops.diagnose import diagnose


def verdict_on(pair, check, args, dtype):
    """Judge, try every acceptance, then diagnose: what the runner does with one failing example."""
    ev = evaluate(pair, args, 0, dtype=dtype, device="cpu", checks=(check,))
    tol = tolerance.lookup(dtype, check=check, override=pair.tolerance_for(dtype, check))
    verdict = judge(pair, ev, check, tol, args)
    assert not verdict.ok, verdict
    assert not explained_by_rounding(pair, check, args, ev, verdict, dtype, tol, seed=0)
    assert not explained_by_precision(pair, check, args, ev, verdict, dtype)
    diagnose(pair, check, args, ev, verdict, dtype=dtype)
    return verdict
