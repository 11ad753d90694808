"""When a disagreement is not a difference: ill-conditioned inputs, and low-precision arithmetic.

A fixed tolerance cannot serve every input: the HVP of std for two nearly equal values, or
erfinv' near 1, amplify one ulp of input error by thousands. So when the two sides differ
beyond the table's bound, we ask the float64 computation itself: evaluate the check at the
exact inputs and at SAMPLES copies nudged by ULPS units of the tested dtype's epsilon. The
spread of those float64 results is what the dtype's rounding of the inputs can do to the
answer. The exact float64 value is where the two sides agree in float64, never one side's
result alone. If both sides lie within SAFETY x that spread (plus the table's bound) of it,
neither side is wrong: the input is ill-conditioned. A wrong formula (log for log1p, a
missing factor) leaves the spread far behind and still fails.

In bfloat16/float16 the frameworks differ in *how* they compute, not only in rounding the
inputs: torch's kernels compute in float32 and round once, XLA rounds each primitive of a
composite op or derivative to the dtype. A low-precision disagreement beyond the table is
accepted when (1) both sides compute the same function, checked in float32 on the very same
inputs under the float32 bound, and (2) each low-precision result stays finite where the
answer is representable and within LOWP_ULPS units of the dtype at the leaf's scale of the
float32 answer. Overflow inside one side's intermediates (float16 tops out at 65504) fails (2).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import Verdict, flatten
from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.tolerance import Tolerance
from equivcheck.ops.autodiff import Evaluation, evaluate, keyed
from equivcheck.ops.diagnose import leaf_at, widen

ULPS = 2.0
SAMPLES = 4
SAFETY = 2.0
LOWP_ULPS = 64.0


def _eps(dtype: str) -> float:
    return 2.0**-8 if dtype == "bfloat16" else float(np.finfo(np_dtype(dtype)).eps)


def explained_by_rounding(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
                          dtype: str, tol: Tolerance, seed: int) -> bool:
    """True if input rounding, or an exact answer beyond the dtype's range, explains the whole
    disagreement.

    The exact answer is where the two float64 sides agree; neither side's result alone is the
    truth. An element is beyond the dtype's range only if both float64 sides put it there (an
    inf, a NaN or a number past the dtype's largest); there an inf from one side and a NaN or a
    huge number from the other are equally (in)valid, so it is not compared. An element where
    the float64 sides disagree (one finite, one not; or far apart) is never explained. The
    rounding sensitivity is the smaller of the two sides' float64 spreads, so one side's
    erratic function cannot excuse itself."""
    if verdict.kind not in ("values", "nonfinite") or verdict.path is None:
        return False
    path = verdict.path
    args64, vec64 = widen(args, ev)
    ev64 = evaluate(pair, args64, 0, dtype="float64", device="cpu", checks=(check,), vectors=vec64)
    if check in ev64.torch.errors or check in ev64.jax.errors:
        return False
    exact_t, exact_j, t, j = (leaf_at(keyed(pair, check, r.values[check]), path)
                              for r in (ev64.torch, ev64.jax, ev.torch, ev.jax))
    if any(x is None for x in (exact_t, exact_j, t, j)) or not (exact_t.shape == t.shape == exact_j.shape == j.shape):
        return False
    top = _largest(dtype)
    with np.errstate(invalid="ignore"):
        beyond_t, beyond_j = (~np.isfinite(x) | (np.abs(x) > top) for x in (exact_t, exact_j))
        if np.any(beyond_t != beyond_j):
            return False  # the float64 sides disagree on whether the answer is representable
        inside = ~beyond_t
        mismatch = (np.isnan(t) != np.isnan(j)) | ((np.isinf(t) | np.isinf(j)) & (t != j))
    if np.any(mismatch & inside):
        return False
    exact = np.where(inside, (exact_t + exact_j) / 2, 0.0)
    spread = _spread(pair, check, args64, vec64, path, exact_t, exact_j, _eps(dtype), seed)
    if spread is None:
        return False
    bound = SAFETY * spread + tol.atol + tol.rtol * np.abs(exact)
    with np.errstate(invalid="ignore"):
        ok = [np.all(((np.abs(x - exact) <= bound) | (x == exact))[inside]) for x in (t, j, exact_t, exact_j)]
    return bool(all(ok))


def explained_by_precision(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
                           dtype: str) -> bool:
    """True if a bfloat16/float16 disagreement is the two frameworks' low-precision arithmetic:
    the two sides agree in float32 on the same inputs, and each low-precision result is finite
    and within LOWP_ULPS at the leaf's scale of the float32 answer (their mean) wherever both
    float32 sides find that answer representable."""
    if dtype not in ("bfloat16", "float16") or verdict.kind not in ("values", "nonfinite"):
        return False
    from equivcheck.engine.compare import compare
    from equivcheck.engine.tolerance import lookup

    up = lambda xs: [x.astype(np.float32) if _is_low(x) else x for x in xs]  # noqa: E731
    vec32 = type(ev.vectors)(up(ev.vectors.ct), up(ev.vectors.t), up(ev.vectors.v))
    ev32 = evaluate(pair, up(list(args)), 0, dtype="float32", device="cpu", checks=(check,), vectors=vec32)
    if check in ev32.torch.errors or check in ev32.jax.errors:
        return False
    t32, j32 = (keyed(pair, check, r.values[check]) for r in (ev32.torch, ev32.jax))
    if not compare(t32, j32, lookup("float32", check=check, tags=pair.tags)).ok:
        return False
    eps, top = _eps(dtype), _largest(dtype)
    for side in (ev.torch, ev.jax):
        for path, low in flatten(keyed(pair, check, side.values[check])):
            ref_t, ref_j = leaf_at(t32, path), leaf_at(j32, path)
            low = np.asarray(low, np.float64)
            if ref_t is None or ref_j is None or not (ref_t.shape == ref_j.shape == low.shape):
                return False
            with np.errstate(invalid="ignore"):
                # The answer is where both float32 sides agree; where only one of them finds it
                # representable, neither decides.
                rep_t, rep_j = (np.isfinite(r) & (np.abs(r) <= top) for r in (ref_t, ref_j))
                if np.any(rep_t != rep_j):
                    return False
                representable = rep_t
                ref = np.where(representable, (ref_t + ref_j) / 2, 0.0)
                if np.any(~np.isfinite(low) & representable):
                    return False
                scale = np.max(np.abs(ref[representable]), initial=0.0)
                if np.any(np.abs(low - ref)[representable] > LOWP_ULPS * eps * scale):
                    return False
    return True


def _is_low(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.name in ("bfloat16", "float16")


def _largest(dtype: str) -> float:
    return float(np.finfo(np.float32 if dtype == "bfloat16" else np_dtype(dtype)).max)


def _spread(pair: Any, check: str, args64: list[Any], vec64: Any, path: str, exact_t: np.ndarray,
            exact_j: np.ndarray, eps: float, seed: int) -> np.ndarray | None:
    """Largest change of the float64 result when the float inputs move by ULPS * eps (relative),
    elementwise the smaller of the two sides' changes: a function both sides compute has one
    sensitivity, and the less sensitive side bounds it."""
    rng = np.random.default_rng(seed)
    spreads = [np.zeros_like(exact_t), np.zeros_like(exact_j)]
    for _ in range(SAMPLES):
        nudged = [np.asarray(a * (1 + ULPS * eps * rng.uniform(-1, 1, np.shape(a)))) if _is_float(a) else a
                  for a in args64]
        ev = evaluate(pair, nudged, 0, dtype="float64", device="cpu", checks=(check,), vectors=vec64)
        for k, (res, exact) in enumerate(((ev.torch, exact_t), (ev.jax, exact_j))):
            if check in res.errors:
                return None
            moved = leaf_at(keyed(pair, check, res.values[check]), path)
            if moved is None or moved.shape != exact.shape:
                return None
            with np.errstate(invalid="ignore"):
                delta = np.where(np.isfinite(moved) & np.isfinite(exact), np.abs(moved - exact), np.inf)
            spreads[k] = np.maximum(spreads[k], np.where(moved == exact, 0.0, delta))
    return np.minimum(*spreads)


def _is_float(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"
