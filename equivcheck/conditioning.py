"""Ill-conditioned inputs: accept a disagreement that rounding the inputs alone explains.

A fixed tolerance cannot serve every input: the HVP of std for two nearly equal values, or
erfinv' near 1, amplify one ulp of input error by thousands. So when the two sides differ
beyond the table's bound, we ask the float64 computation itself: evaluate the check at the
exact inputs and at SAMPLES copies nudged by ULPS units of the tested dtype's epsilon. The
spread of those float64 results is what the dtype's rounding of the inputs can do to the
answer. If both sides lie within SAFETY x that spread (plus the table's bound) of the exact
float64 value, and the two sides agree in float64, neither side is wrong: the input is
ill-conditioned. A wrong formula (log for log1p, a missing factor) leaves the spread far
behind and still fails.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.autodiff import Evaluation, evaluate, keyed
from equivcheck.backends import torch_side
from equivcheck.compare import Verdict
from equivcheck.diagnose import leaf_at, widen
from equivcheck.strategies import np_dtype
from equivcheck.tolerance import Tolerance

ULPS = 2.0
SAMPLES = 4
SAFETY = 2.0


def _eps(dtype: str) -> float:
    return 2.0**-8 if dtype == "bfloat16" else float(np.finfo(np_dtype(dtype)).eps)


def explained_by_rounding(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
                          dtype: str, tol: Tolerance, seed: int) -> bool:
    """True if input rounding explains the whole disagreement of a values failure."""
    if verdict.kind != "values" or verdict.path is None:
        return False
    path = verdict.path
    args64, vec64 = widen(args, ev)
    ev64 = evaluate(pair, args64, 0, dtype="float64", device="cpu", checks=(check,), vectors=vec64)
    if check in ev64.torch.errors or check in ev64.jax.errors:
        return False
    exact_t, exact_j, t, j = (leaf_at(keyed(pair, check, r.values[check]), path)
                              for r in (ev64.torch, ev64.jax, ev.torch, ev.jax))
    if any(x is None for x in (exact_t, exact_j, t, j)) or not (exact_t.shape == t.shape == exact_j.shape):
        return False
    spread = _spread(pair, check, args64, vec64, path, exact_t, _eps(dtype), seed)
    if spread is None:
        return False
    bound = SAFETY * spread + tol.atol + tol.rtol * np.abs(exact_t)
    with np.errstate(invalid="ignore"):
        ok = [np.all((np.abs(x - exact_t) <= bound) | (x == exact_t)) for x in (t, j, exact_j)]
    return bool(all(ok))


def _spread(pair: Any, check: str, args64: list[Any], vec64: Any, path: str, exact: np.ndarray, eps: float,
            seed: int) -> np.ndarray | None:
    """Largest change of the float64 result when the float inputs move by ULPS * eps (relative)."""
    tb = torch_side()
    rng = np.random.default_rng(seed)
    spread = np.zeros_like(exact)
    for _ in range(SAMPLES):
        nudged = [a * (1 + ULPS * eps * rng.uniform(-1, 1, np.shape(a))) if _is_float(a) else a for a in args64]
        res, _ = tb.run(pair.torch_fn, nudged, pair.diff_args, (check,), "cpu", lambda leaves: vec64)
        if check in res.errors:
            return None
        moved = leaf_at(keyed(pair, check, res.values[check]), path)
        if moved is None or moved.shape != exact.shape:
            return None
        with np.errstate(invalid="ignore"):
            delta = np.where(np.isfinite(moved) & np.isfinite(exact), np.abs(moved - exact), np.inf)
        spread = np.maximum(spread, np.where(moved == exact, 0.0, delta))
    return spread


def _is_float(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"
