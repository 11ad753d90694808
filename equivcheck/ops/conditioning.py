"""When a disagreement is not a difference: ill-conditioned inputs, and low-precision arithmetic.

A fixed tolerance cannot serve every input: the HVP of std for two nearly equal values, or
erfinv' near 1, amplify one ulp of input error by thousands. So when the two sides differ
beyond the table's bound, we ask the float64 computation itself: evaluate the check at the
exact inputs and at SAMPLES copies nudged by ULPS units of the tested dtype's epsilon. The
spread of those float64 results is what the dtype's rounding of the inputs can do to the
answer. The exact float64 value is where the two sides agree in float64, never one side's
result alone. If both sides lie within SAFETY x that spread (plus the table's bound) of it and
of each other, and the two float64 sides agree to float64's own rounding (the spread scaled to
float64's epsilon, plus float64's table), neither side is wrong: the input is ill-conditioned. A wrong formula (log for log1p, a
missing factor) leaves the spread far behind and still fails.

How the inputs are nudged follows how kernels round. An elementwise op rounds each element on
its own, so each input moves relative to itself and each output element has its own bound.
An op that mixes elements (a reduction, a normalisation, a matrix function: moving one input
element moves another element's output) is exact, at best, for inputs moved by a few ulps of
the argument's *largest* element (norm-wise backward stability, Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., ch. 1.5 and 19-20), and its rounding spreads over
the whole output: a zero off-diagonal moves too (pinv of a diagonal matrix), and a mean rounded
in float32 shifts every element of a LayerNorm row. Such arguments are nudged norm-wise and the
bound is the leaf's largest spread. This is the one rule for "rounding": the diagnosis calls a
gap rounding exactly when this acceptance holds (`rounding`).

In bfloat16/float16 the frameworks differ in *how* they compute, not only in rounding the
inputs: torch's kernels compute in float32 and round once, XLA rounds each primitive of a
composite op or derivative to the dtype. A low-precision disagreement beyond the table is
accepted when (1) both sides compute the same function, checked in float32 on the very same
inputs under the float32 bound, and (2) each low-precision result stays finite where the
answer is representable and within LOWP_SAFETY x what XLA's arithmetic moves the answer on
this input (the float32 program with every primitive rounded to the dtype,
`equivcheck.ops.emulate`), plus LOWP_FLOOR units of the dtype, at the leaf's scale of the
float32 answer, and never beyond LOWP_CAP such units. A formula wrong in the low dtype only (tanh x 1.2 in bfloat16: 26 ulps, where
the emulation moves tanh by 1) fails (2); so does overflow inside one side's intermediates
(float16 tops out at 65504).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine import tolerance
from equivcheck.engine.compare import Verdict, flatten, float_leaves
from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.tolerance import Tolerance
from equivcheck.ops.autodiff import Evaluation, evaluate, keyed, leaf_at, widen

ULPS = 2.0
SAMPLES = 6
# Elements of an argument moved one at a time to see whether the op mixes them; a small
# matrix has every element probed, a large argument a spread-out sample.
MIX_PROBES = 16
SAFETY = 2.0
# Torch rounds once per kernel, XLA per primitive, and XLA's kernels need not round as the
# emulation does (another summation order, a transcendental's own polynomial): a side may be
# a few times further than the emulation and a few ulps off where it moves nothing.
LOWP_SAFETY = 4.0
LOWP_FLOOR = 4.0
# An emulation runs a side's own program, so a formula that cancels in the dtype excuses itself
# there (JAX's expm1' = expm1 + 1 in bfloat16, 147 ulps, 57% off at -6, where torch is within
# 1): no bound exceeds the fixed one the rule had before the emulations (a share of the leaf's
# scale wide enough for every built-in op: gelu_tanh's HVP in float16 at 2.875 is 48 ulps off on
# both sides), which also stands where no emulation runs.
LOWP_CAP = 64.0


def _eps(dtype: str, tol: Tolerance | None = None) -> float:
    """The dtype's epsilon, or the arithmetic's coarser rounding unit where the tolerance names
    one (TF32's 2^-10 for float32 matmul/conv on a GPU at default precision)."""
    eps = 2.0**-8 if dtype == "bfloat16" else float(np.finfo(np_dtype(dtype)).eps)
    return max(eps, tol.unit) if tol is not None and tol.unit is not None else eps


@dataclasses.dataclass
class Rounding:
    """The rounding rule's finding for one failing leaf: whether input rounding explains it,
    the largest float64 spread, the largest distance of a side from the exact answer, and
    whether the op mixes elements (norm-wise nudges, leaf-wise bound)."""

    explained: bool
    spread: float = float("nan")
    off: float = float("nan")
    mixing: bool = False
    why: str = ""


def explained_by_rounding(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
                          dtype: str, tol: Tolerance, seed: int) -> bool:
    """True if input rounding, or an exact answer beyond the dtype's range, explains the whole
    disagreement (see `rounding`)."""
    return rounding(pair, check, args, ev, verdict, dtype, tol, seed).explained


def rounding(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
             dtype: str, tol: Tolerance, seed: int = 0) -> Rounding:
    """Whether input rounding, or an exact answer beyond the dtype's range, explains the whole
    disagreement, with the measured spread.

    The exact answer is where the two float64 sides agree; neither side's result alone is the
    truth. An element is beyond the dtype's range only if both float64 sides put it there (an
    inf, a NaN or a number past the dtype's largest); there an inf from one side and a NaN or a
    huge number from the other are equally (in)valid, so it is not compared. An element where
    the float64 sides disagree (one finite, one not; or far apart) is never explained. The
    rounding sensitivity is the smaller of the two sides' float64 spreads, so one side's
    erratic function cannot excuse itself; an argument is nudged norm-wise only if both sides
    mix its elements."""
    if verdict.kind not in ("values", "nonfinite") or verdict.path is None:
        return Rounding(False, why="not a value disagreement")
    path = verdict.path
    args64, vec64 = widen(args, ev)
    ev64 = evaluate(pair, args64, 0, dtype="float64", device="cpu", checks=(check,), vectors=vec64)
    if check in ev64.torch.errors or check in ev64.jax.errors:
        return Rounding(False, why="the float64 re-run raised")
    exact_t, exact_j, t, j = (leaf_at(keyed(pair, check, r.values[check]), path)
                              for r in (ev64.torch, ev64.jax, ev.torch, ev.jax))
    if any(x is None for x in (exact_t, exact_j, t, j)) or not (exact_t.shape == t.shape == exact_j.shape == j.shape):
        return Rounding(False, why="the float64 results have another structure")
    top = largest(dtype)
    with np.errstate(invalid="ignore"):
        beyond_t, beyond_j = (~np.isfinite(x) | (np.abs(x) > top) for x in (exact_t, exact_j))
        if np.any(beyond_t != beyond_j):
            return Rounding(False, why="the float64 sides disagree on whether the answer is representable")
        inside = ~beyond_t
        mismatch = (np.isnan(t) != np.isnan(j)) | ((np.isinf(t) | np.isinf(j)) & (t != j))
    if np.any(mismatch & inside):
        return Rounding(False, why="a NaN or inf on one side only")
    exact = np.where(inside, (exact_t + exact_j) / 2, 0.0)
    mixed = _mixed_args(pair, args64, vec64)
    spread = _spread(pair, check, args64, vec64, path, exact_t, exact_j, _eps(dtype, tol), seed, mixed)
    if spread is None:
        return Rounding(False, why="a nudged re-run failed")
    if mixed and inside.any():
        spread = np.full_like(spread, np.max(spread[inside]))
    bound = SAFETY * spread + tol.atol + tol.rtol * np.abs(exact)
    # The float64 sides must agree to float64's own rounding: the spread scaled down to float64's
    # epsilon, and float64's table. A mean of two sides that differ (a constant factor off, a
    # default that differs) would otherwise sit within the bound of both, and a gap of up to
    # twice the bound would pass as "rounding".
    tol64 = tol if dtype == "float64" else tolerance.lookup(
        "float64", check=check, tags=getattr(pair, "tags", ()), override=_override(pair, check))
    bound64 = SAFETY * spread * (_eps("float64") / _eps(dtype, tol)) + tol64.atol + tol64.rtol * np.abs(exact)
    with np.errstate(invalid="ignore"):
        ok = [np.all(((np.abs(x - exact) <= bound) | (x == exact))[inside]) for x in (t, j, exact_t, exact_j)]
        ok.append(np.all(((np.abs(t - j) <= bound) | (t == j))[inside]))
        agree64 = np.all(((np.abs(exact_t - exact_j) <= bound64) | (exact_t == exact_j))[inside])
        off = max((float(np.max(np.abs(x - exact)[inside], initial=0.0)) for x in (t, j)), default=0.0)
    if not agree64:
        return Rounding(False, float(np.max(spread[inside], initial=0.0)), off, bool(mixed),
                        why="the float64 sides differ by more than float64's rounding explains")
    return Rounding(bool(all(ok)), float(np.max(spread[inside], initial=0.0)), off, bool(mixed))


def _override(pair: Any, check: str) -> Tolerance | None:
    lookup = getattr(pair, "tolerance_for", None)
    return lookup("float64", check) if lookup is not None else None


def explained_by_precision(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict,
                           dtype: str) -> bool:
    """True if a bfloat16/float16 disagreement is the two frameworks' low-precision arithmetic:
    the two sides agree in float32 on the same inputs, and each low-precision result is finite
    and within the bound of `_lowp_bound` of the float32 answer (their mean) wherever both
    float32 sides find that answer representable."""
    if dtype not in ("bfloat16", "float16") or verdict.kind not in ("values", "nonfinite"):
        return False
    from equivcheck.engine.compare import compare
    from equivcheck.engine.tolerance import lookup

    up = lambda xs: [x.astype(np.float32) if _is_low(x) else x for x in xs]
    vec32 = type(ev.vectors)(up(ev.vectors.ct), up(ev.vectors.t), up(ev.vectors.v))
    ev32 = evaluate(pair, up(list(args)), 0, dtype="float32", device="cpu", checks=(check,), vectors=vec32)
    if check in ev32.torch.errors or check in ev32.jax.errors:
        return False
    t32, j32 = (keyed(pair, check, r.values[check]) for r in (ev32.torch, ev32.jax))
    if not compare(t32, j32, lookup("float32", check=check, tags=pair.tags)).ok:
        return False
    eps, top = _eps(dtype), largest(dtype)
    emulated = _emulated(pair, check, args, vec32, dtype)
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
                if np.any(np.abs(low - ref)[representable] > _lowp_bound(emulated, path, ref, representable,
                                                                           eps * scale)):
                    return False
    return True


def _emulated(pair: Any, check: str, args: Sequence[Any], vec32: Any, dtype: str) -> list[Any]:
    """Each side's float32 check on the (upcast) inputs with every operation rounded to `dtype`
    (JAX's primitives, torch's operators: `equivcheck.ops.emulate`), keyed like the sides'
    values; the ones that cannot run are left out."""
    from equivcheck.backends import jax as jb
    from equivcheck.ops.emulate import rounded_each_primitive, torch_rounding

    args32 = [x.astype(np.float32) if _is_low(x) else x for x in args]
    program = jb.check_program(pair.jax_fn, args32, pair.diff_args, (check,))
    inputs = ([a for a in args32 if isinstance(a, np.ndarray)], list(vec32.ct), list(vec32.t), list(vec32.v))
    out = []
    try:
        with jb.x64(False):
            out.append(keyed(pair, check, rounded_each_primitive(program, inputs, dtype)[check]))
    except Exception:  # noqa: BLE001, S110 - the torch side's, or the fixed bound (LOWP_CAP), stands in
        pass
    try:
        with torch_rounding(dtype):
            ev = evaluate(pair, args32, 0, dtype="float32", device="cpu", checks=(check,), vectors=vec32)
        if check not in ev.torch.errors:
            out.append(keyed(pair, check, ev.torch.values[check]))
    except Exception:  # noqa: BLE001, S110 - as above
        pass
    return out


def _lowp_bound(emulated: list[Any], path: str, ref: np.ndarray, representable: np.ndarray, ulp: float) -> float:
    """How far from the float32 answer `ref` a low-precision result may lie in the leaf at `path`:
    LOWP_SAFETY x the emulations' largest distance from it plus LOWP_FLOOR ulps (`ulp`: one unit
    of the dtype at the leaf's scale), at most LOWP_CAP ulps, which also stand where there is no
    emulation."""
    moved = 0.0
    for tree in emulated:
        emu = leaf_at(tree, path)
        if emu is None or np.shape(emu) != ref.shape:
            return LOWP_CAP * ulp
        with np.errstate(invalid="ignore"):
            gap = np.abs(np.asarray(emu, np.float64) - ref)[representable]
        if not np.all(np.isfinite(gap)):  # an emulation overflows where the answer does not
            return LOWP_CAP * ulp
        moved = max(moved, float(np.max(gap, initial=0.0)))
    if not emulated:
        return LOWP_CAP * ulp
    return min(LOWP_SAFETY * moved + LOWP_FLOOR * ulp, LOWP_CAP * ulp)


def _is_low(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.name in ("bfloat16", "float16")


def largest(dtype: str) -> float:
    """The largest finite value of `dtype` (bfloat16 shares float32's exponent range)."""
    return float(np.finfo(np.float32 if dtype == "bfloat16" else np_dtype(dtype)).max)


def _spread(pair: Any, check: str, args64: list[Any], vec64: Any, path: str, exact_t: np.ndarray,
            exact_j: np.ndarray, eps: float, seed: int, mixed: frozenset[int]) -> np.ndarray | None:
    """Largest change of the float64 result when the float inputs move by ULPS * eps (relative
    to each element, or to the argument's largest element where the op mixes them),
    elementwise the smaller of the two sides' changes: a function both sides compute has one
    sensitivity, and the less sensitive side bounds it."""
    rng = np.random.default_rng(seed)
    spreads = [np.zeros_like(exact_t), np.zeros_like(exact_j)]
    for _ in range(SAMPLES):
        nudged = [_nudge(a, ULPS * eps, rng, i in mixed) if _is_float(a) else a for i, a in enumerate(args64)]
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


def _nudge(a: np.ndarray, rel: float, rng: np.random.Generator, normwise: bool) -> np.ndarray:
    scale = np.max(np.abs(a), initial=0.0) if normwise else np.abs(a)
    return np.asarray(a + rel * scale * rng.uniform(-1, 1, np.shape(a)))


def _mixed_args(pair: Any, args64: list[Any], vec64: Any) -> frozenset[int]:
    """The float arguments whose elements the forward mixes, on both float64 sides: moving one
    element moves an output element other than its own (or the output is not shaped like the
    argument: a reduction, a broadcast)."""
    def outputs(a: list[Any]) -> list[list[np.ndarray]] | None:
        ev = evaluate(pair, a, 0, dtype="float64", device="cpu", checks=("forward",), vectors=vec64)
        if "forward" in ev.torch.errors or "forward" in ev.jax.errors:
            return None
        return [[np.asarray(x, np.float64) for x in float_leaves(r.values["forward"])] for r in (ev.torch, ev.jax)]

    base = outputs(args64)
    if base is None:
        return frozenset()
    mixed = set()
    for i, a in enumerate(args64):
        if not _is_float(a) or a.size == 0:
            continue
        if any(o.shape != a.shape for side in base for o in side):
            mixed.add(i)
            continue
        top = float(np.max(np.abs(a))) or 1.0
        for e in np.unique(np.linspace(0, a.size - 1, min(a.size, MIX_PROBES)).astype(int)):
            moved = a.copy()
            moved.flat[e] += 1e-3 * (abs(moved.flat[e]) or top)
            after = outputs([moved if k == i else x for k, x in enumerate(args64)])
            if after is None:
                break
            elsewhere = [any(np.delete(((x != b) & ~(np.isnan(x) & np.isnan(b))).ravel(), e).any()
                             for x, b in zip(side_after, side_base)) for side_after, side_base in zip(after, base)]
            if all(elsewhere):
                mixed.add(i)
                break
    return frozenset(mixed)


def _is_float(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"
