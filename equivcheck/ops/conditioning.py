"""When a disagreement is not a difference: ill-conditioned inputs, and low-precision arithmetic.

A fixed tolerance cannot serve every input: the HVP of std for two nearly equal values, or
erfinv' near 1, amplify one ulp of input error by thousands. So when the two sides differ
beyond the table's bound, we ask the float64 computation itself: evaluate the check at the
exact inputs and at SAMPLES copies nudged by ULPS units of the tested dtype's epsilon. The
spread of those float64 results is what the dtype's rounding of the inputs can do to the
answer. If both sides lie within SAFETY x that spread (plus the table's bound) of the exact
float64 value, and the two sides agree in float64, neither side is wrong: the input is
ill-conditioned. A wrong formula (log for log1p, a missing factor) leaves the spread far
behind and still fails.

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

from equivcheck.backends import torch_side
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
    disagreement. Where the float64 answer overflows the dtype, an inf from one side and a NaN or
    a huge number from the other are equally (in)valid: those elements are not comparable."""
    if verdict.kind not in ("values", "nonfinite") or verdict.path is None:
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
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(exact_t) & (np.abs(exact_t) <= _largest(dtype))
        mismatch = (np.isnan(t) != np.isnan(j)) | ((np.isinf(t) | np.isinf(j)) & (t != j))
    if np.any(mismatch & inside):
        return False
    spread = _spread(pair, check, args64, vec64, path, exact_t, _eps(dtype), seed)
    if spread is None:
        return False
    bound = SAFETY * spread + tol.atol + tol.rtol * np.abs(exact_t)
    with np.errstate(invalid="ignore"):
        ok = [np.all(((np.abs(x - exact_t) <= bound) | (x == exact_t))[inside]) for x in (t, j, exact_j)]
    return bool(all(ok))


def explained_by_precision(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
                           dtype: str) -> bool:
    """True if a bfloat16/float16 disagreement is the two frameworks' low-precision arithmetic."""
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
            ref = leaf_at(t32, path)
            low = np.asarray(low, np.float64)
            if ref is None or ref.shape != low.shape:
                return False
            with np.errstate(invalid="ignore"):
                representable = np.isfinite(ref) & (np.abs(ref) <= top)
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


def _spread(pair: Any, check: str, args64: list[Any], vec64: Any, path: str, exact: np.ndarray, eps: float,
            seed: int) -> np.ndarray | None:
    """Largest change of the float64 result when the float inputs move by ULPS * eps (relative)."""
    tb = torch_side()
    rng = np.random.default_rng(seed)
    spread = np.zeros_like(exact)
    for _ in range(SAMPLES):
        nudged = [np.asarray(a * (1 + ULPS * eps * rng.uniform(-1, 1, np.shape(a)))) if _is_float(a) else a
                  for a in args64]
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
