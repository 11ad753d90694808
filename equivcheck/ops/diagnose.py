"""Which side is off? Re-run a failing example in float64 on the CPU and decide.

1. Both sides again in float64. If they now agree far better than they did, the failure was
   rounding: the side further from the float64 value is the one off.
2. If they still disagree, the two sides compute different functions. For the forward, the
   pair's own `reference` (a NumPy float64 implementation) decides. For derivatives, central
   finite differences decide, never one side's forward alone and no framework's autodiff: of
   the pair's `reference` if it has one, else of both sides' float64 forwards if those agree
   at the example. If they do not, the derivatives cannot be arbitrated and no side is named.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from equivcheck.backends import Vectors, jax_side, torch_side
from equivcheck.engine.compare import Verdict, compare, flatten, float_leaves, is_float
from equivcheck.engine.tolerance import lookup
from equivcheck.ops.autodiff import Evaluation, evaluate, keyed

# Central differences in float64 with this step are accurate to ~1e-9 relative for smooth
# functions of O(1) inputs (truncation h^2 ~ 1e-12, rounding eps/h ~ 1e-10).
FD_STEP = 1e-6
# A mixed second difference (HVP) errs by ~h^2 in truncation and ~eps/h^2 in rounding: h = 1e-4
# balances them near 1e-8 relative.
FD2_STEP = 1e-4
FD_MAX_ELEMENTS = 2048
# One side must be this many times further from the reference to be named alone.
DECISIVE = 4.0


def _wide(x: Any) -> Any:
    return x.astype(np.float64) if isinstance(x, np.ndarray) and is_float(x) else x


def leaf_at(tree: Any, path: str) -> np.ndarray | None:
    for p, leaf in flatten(tree):
        if p == path:
            return np.asarray(leaf, dtype=np.float64)
    return None


def widen(args: Sequence[Any], ev: Evaluation) -> tuple[list[Any], Vectors]:
    """The example's inputs and vectors, exactly, in float64."""
    vec64 = Vectors(*[[v.astype(np.float64) for v in vs] for vs in (ev.vectors.ct, ev.vectors.t, ev.vectors.v)])
    return [_wide(a) for a in args], vec64


def diagnose(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict, *, dtype: str) -> None:
    """Fill verdict.side and verdict.diagnosis for a value or NaN/Inf disagreement."""
    if verdict.kind not in ("values", "nonfinite") or verdict.path is None:
        return
    path = verdict.path
    args64, vec64 = widen(args, ev)
    try:
        ev64 = evaluate(pair, args64, 0, dtype="float64", device="cpu", checks=(check,), vectors=vec64)
    except Exception as exc:  # the float64 re-run is advice; never let it hide the finding
        verdict.diagnosis = f"no float64 reference: re-running in float64 failed ({type(exc).__name__}: {exc})"
        return
    if check in ev64.torch.errors or check in ev64.jax.errors:
        errs = [e.describe() for e in (ev64.torch.errors.get(check), ev64.jax.errors.get(check)) if e]
        verdict.diagnosis = "no float64 reference: " + "; ".join(errs)
        return
    t32, j32 = (leaf_at(keyed(pair, check, r.values[check]), path) for r in (ev.torch, ev.jax))
    t64, j64 = (leaf_at(keyed(pair, check, r.values[check]), path) for r in (ev64.torch, ev64.jax))
    if t64 is None or j64 is None or t32 is None or t64.shape != j64.shape or t32.shape != t64.shape:
        verdict.diagnosis = "no float64 reference: the float64 results have another structure"
        return
    observed = _gap(t32, j32)
    gap64 = _gap(t64, j64)
    if dtype != "float64" and math.isfinite(gap64) and gap64 <= 0.1 * observed:
        ref = (t64 + j64) / 2
        _decide(verdict, path, t32, j32, ref,
                f"in float64 the two sides agree to {gap64:.2g} (against {observed:.2g} in {dtype}): "
                f"the gap is rounding, so the float64 result is the reference")
        return
    lead = (f"the two sides differ in float64 too ({gap64:.3g}): not rounding, they compute different "
            f"functions")
    if check == "forward":
        if pair.reference is None:
            # Without a reference only a NaN on one side tells: it is rarely the right answer.
            verdict.side = verdict.side if verdict.kind == "nonfinite" else None
            verdict.diagnosis = lead + "; give the Pair a float64 `reference` to decide which side is right"
            return
        try:
            ref_tree = pair.reference(*args64)
        except Exception as exc:
            verdict.diagnosis = lead + f"; the pair's reference raised {type(exc).__name__}: {exc}"
            return
        ref = leaf_at(_as_tree(ref_tree), path)
        if ref is None or ref.shape != t64.shape:
            verdict.diagnosis = lead + "; the pair's reference returns another structure or shape"
            return
        _decide(verdict, path, t64, j64, ref, lead + "; the pair's NumPy reference decides")
        return
    try:
        ref, source = _finite_difference(pair, check, args64, vec64, path)
    except Exception as exc:
        verdict.diagnosis = lead + f"; finite differences failed ({type(exc).__name__}: {exc})"
        return
    if ref is None:
        verdict.side = None
        verdict.diagnosis = lead + "; " + source
        return
    _decide(verdict, path, t64, j64, ref, lead + "; " + source)


def _as_tree(x: Any) -> Any:
    return x if isinstance(x, (list, tuple, dict)) else np.asarray(x)


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise distance; a NaN or infinity the other side lacks is infinitely far."""
    both = np.isfinite(a) & np.isfinite(b)
    nonfinite_mismatch = (np.isnan(a) != np.isnan(b)) | ((np.isinf(a) | np.isinf(b)) & (a != b))
    if nonfinite_mismatch.any():
        return float("inf")
    return float(np.max(np.abs(a[both] - b[both]), initial=0.0))


# Relative error at which a computation has quietly run in a lower precision.
_LOW_PRECISION = (("bfloat16", 2.0**-8), ("float16 or TF32", 2.0**-11))


def _precision_hint(x: np.ndarray, ref: np.ndarray) -> str:
    finite = np.isfinite(x) & np.isfinite(ref) & (np.abs(ref) > 1e-30)
    if not finite.any():
        return ""
    rel = float(np.max(np.abs(x[finite] - ref[finite]) / np.abs(ref[finite])))
    for name, eps in _LOW_PRECISION:
        if eps / 16 <= rel <= eps:
            return f" (its relative error {rel:.2g} is what {name} rounding gives: does it compute in {name}?)"
    return ""


def _decide(verdict: Verdict, path: str, t: np.ndarray, j: np.ndarray, ref: np.ndarray, lead: str) -> None:
    et, ej = _gap(t, ref), _gap(j, ref)
    worst = verdict.worst
    if worst is not None and worst.worst_index is not None and ref.shape:
        worst.reference_value = float(ref[worst.worst_index])
    elif worst is not None and worst.worst_index is not None:
        worst.reference_value = float(ref)
    if et > DECISIVE * ej:
        verdict.side = "torch"
    elif ej > DECISIVE * et:
        verdict.side = "jax"
    else:
        verdict.side = "both"
    verdict.diagnosis = (
        f"{lead}; max error against it: torch {et:.3g}, jax {ej:.3g} at {path}: "
        + {"torch": "torch is off" + _precision_hint(t, ref), "jax": "jax is off" + _precision_hint(j, ref),
           "both": "both sides are off by similar amounts (an ill-conditioned input, or a tolerance too tight "
                   "for this op)"}[verdict.side]
    )


def _forward64(pair: Any, args64: Sequence[Any], side: str, vec: Vectors
               ) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """The float leaves of one side's float64 forward, or of the pair's reference, as a
    function of the differentiable arguments."""
    tb, jb = torch_side(), jax_side()
    cpu = tb.device_of("cpu")

    def f(diff_vals: Sequence[np.ndarray]) -> list[np.ndarray]:
        a = list(args64)
        for i, v in zip(pair.diff_args, diff_vals):
            a[i] = v
        if side == "reference":
            out = _as_tree(pair.reference(*a))
        elif side == "torch":
            out = tb.to_numpy(pair.torch_fn(*[tb.to_torch(x, cpu) for x in a]))
        else:
            res = jb.run(pair.jax_fn, a, pair.diff_args, ("forward",), "cpu", vec, True)
            if "forward" in res.errors:
                raise RuntimeError(res.errors["forward"].describe())
            out = res.values["forward"]
        return [np.asarray(leaf, np.float64) for leaf in float_leaves(out)]

    return f


def _arbiter(pair: Any, args64: Sequence[Any], vec: Vectors
             ) -> tuple[Callable[[Sequence[np.ndarray]], list[np.ndarray]] | None, str]:
    """The float64 function whose derivatives decide, and how to name it. The pair's reference
    when it has one; else the mean of both sides' float64 forwards, provided they agree at the
    example (if they do not, no derivative of either can be trusted over the other)."""
    if pair.reference is not None:
        source = "central finite differences of the pair's float64 NumPy reference decide"
        return _forward64(pair, args64, "reference", vec), source
    ft, fj = _forward64(pair, args64, "torch", vec), _forward64(pair, args64, "jax", vec)
    primals = [np.asarray(args64[i], np.float64) for i in pair.diff_args]
    tol = lookup("float64", check="forward", tags=pair.tags, override=pair.tolerance_for("float64", "forward"))
    same = compare(ft(primals), fj(primals), tol)
    if not same.ok:
        return None, (f"the two forwards differ ({same.message}), so their derivatives cannot be arbitrated; "
                      f"give the Pair a float64 `reference` to decide which side is right")
    source = "central finite differences of both sides' float64 forwards (which agree) decide"
    return (lambda d: [(a + b) / 2 for a, b in zip(ft(d), fj(d))]), source


def _finite_difference(pair: Any, check: str, args64: Sequence[Any], vec: Vectors, path: str
                       ) -> tuple[np.ndarray | None, str]:
    """The derivative `check` at `path` by central differences of the arbiter function (see
    `_arbiter`), and how it was taken; None with the reason where it cannot be."""
    f, source = _arbiter(pair, args64, vec)
    if f is None:
        return None, source
    primals = [np.asarray(args64[i], np.float64) for i in pair.diff_args]
    shifted = lambda steps: f([np.asarray(p + sum(h * x[k] for h, x in steps))  # noqa: E731
                               for k, p in enumerate(primals)])

    def directional(d: Sequence[np.ndarray]) -> list[np.ndarray]:
        plus, minus = shifted([(FD_STEP, d)]), shifted([(-FD_STEP, d)])
        return [(a - b) / (2 * FD_STEP) for a, b in zip(plus, minus)]

    def unit(k: int, e: int) -> list[np.ndarray]:
        d = [np.zeros_like(p) for p in primals]
        d[k].flat[e] = 1.0
        return d

    def weighted(outs: list[np.ndarray]) -> float:
        if len(outs) != len(vec.ct) or any(o.shape != np.shape(c) for o, c in zip(outs, vec.ct)):
            raise ValueError("the arbiter's outputs do not match the cotangents' shapes")
        return sum(float(np.sum(o * c)) for o, c in zip(outs, vec.ct))

    too_many = f"too many elements for finite differences (> {FD_MAX_ELEMENTS})"
    if check == "jvp":
        ref = leaf_at(directional(vec.t), path)  # JVP leaves follow the outputs
    elif check == "vjp":
        k = pair.grad_index(path)
        if primals[k].size > FD_MAX_ELEMENTS:
            return None, too_many
        ref = np.zeros_like(primals[k])
        for e in range(primals[k].size):
            ref.flat[e] = weighted(directional(unit(k, e)))
    elif check == "hvp":
        # (H v)_e of the cotangent-weighted output: a mixed second difference along e and v.
        k = pair.grad_index(path)
        if primals[k].size > FD_MAX_ELEMENTS:
            return None, too_many
        h = FD2_STEP
        ref = np.zeros_like(primals[k])
        for e in range(primals[k].size):
            u = unit(k, e)
            corners = [weighted(shifted([(a * h, u), (b * h, vec.v)])) for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
            ref.flat[e] = (corners[0] - corners[1] - corners[2] + corners[3]) / (4 * h * h)
    else:
        return None, f"no finite-difference rule for {check}"
    if ref is None:
        return None, "the arbiter function returns another structure than the sides"
    return ref, source
