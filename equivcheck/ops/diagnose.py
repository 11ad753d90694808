"""Which side is off? Re-run a failing example in float64 on the CPU and decide.

1. Both sides again in float64. If they now agree far better than they did (against a NaN or
   inf, under the float64 bound), the two compute the same function and the gap is the
   tested dtype's. It is rounding only where the
   conditioning rule (`equivcheck.ops.conditioning.rounding`, the one the acceptance uses)
   says input rounding explains it; then the side further from the float64 value is the one
   off. A larger gap is no rounding: a dtype-dependent threshold or default differs (a cutoff
   relative to the dtype's eps), or one side's formula loses precision in that dtype; the
   side further from float64 is still named.
2. If they still disagree, the two sides compute different functions. For the forward, the
   pair's own `reference` (a NumPy float64 implementation) decides; without one, a value not
   finite on one side only names that side where the other side's is finite and in range,
   in float64 too (`equivcheck.ops.poles`); so it does for a derivative the differences cannot decide. For derivatives, finite
   differences decide (`equivcheck.ops.finite`), never one side's forward alone and no
   framework's autodiff: of the pair's `reference` if it has one, else of both sides' float64
   forwards if those agree at the example and around it (each side differenced on its own).
   No side is named where they do not, where the differences are unstable, or where the
   function (for an HVP, its first derivative) has a kink at the failing element. The failing element,
   probed for that kink, outweighs the leaf's largest errors (differences across a kink at
   another element read a slope neither side owes).
3. Whatever decided, a failure whose symptom matches a row of the known-divergence tables
   (`equivcheck.layers.traps`) gets that row's cause and reconciling setting.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import Verdict, compare, within
from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.tolerance import Tolerance, lookup
from equivcheck.layers.traps import Evidence, matching
from equivcheck.ops.autodiff import Evaluation, evaluate, keyed, leaf_at, widen
from equivcheck.ops.conditioning import ULPS, rounding
from equivcheck.ops.finite import DECISIVE, as_tree, derivative, gap
from equivcheck.ops.mismatch import odd_type, shape_by_reference
from equivcheck.ops.poles import forward_pole, lone_nonfinite, pole

__all__ = ["DECISIVE", "diagnose", "leaf_at", "widen"]


def diagnose(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict, *, dtype: str,
             tol: Tolerance | None = None) -> None:
    """Fill verdict.side and verdict.diagnosis for a value or NaN/Inf disagreement, and add the
    known divergence its symptom matches. `tol` is the check's bound (the table's by default)."""
    if verdict.kind == "shape" and check == "forward" and verdict.path is not None:
        shape_by_reference(pair, args, ev, verdict)
        return
    if verdict.kind in ("dtype", "structure"):
        odd_type(pair, check, ev, verdict, dtype)
        return
    if verdict.kind not in ("values", "nonfinite") or verdict.path is None:
        return
    tol = tol or lookup(dtype, check=check, tags=pair.tags, override=pair.tolerance_for(dtype, check))
    _arbitrate(pair, check, args, ev, verdict, dtype, tol)
    try:
        evidence = _evidence(pair, check, args, ev, verdict.path, tol)
    except (KeyError, IndexError, ValueError):  # no leaf to match: the verdict stands as decided
        return
    for d in matching(evidence):
        verdict.diagnosis += f"; this matches a known divergence: {d.cause}; reconcile: {d.reconcile}"


def _evidence(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, path: str, tol: Tolerance
              ) -> Evidence:
    t, j = (leaf_at(keyed(pair, check, r.values[check]), path) if check in r.values else np.zeros(0)
            for r in (ev.torch, ev.jax))
    if t is None or j is None or t.shape != j.shape:
        t = j = np.zeros(0)
    close = within(tol, t, j)
    arg = None
    if check in ("vjp", "hvp"):
        arg = np.asarray(args[pair.diff_args[pair.grad_index(path)]], np.float64)
    return Evidence(check, path, t, j, close, list(args), arg)


def _arbitrate(pair: Any, check: str, args: Sequence[Any], ev: Evaluation, verdict: Verdict, dtype: str,
               tol: Tolerance) -> None:
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
    observed = gap(t32, j32)
    gap64 = gap(t64, j64)
    # Against a NaN or inf (an infinite gap) any finite float64 gap is "far better": exp(100)
    # overflowing float32 on one side only looked like agreement at 2.7e43. There the float64
    # sides must agree under the float64 bound.
    tol64 = lookup("float64", check=check, tags=pair.tags, override=pair.tolerance_for("float64", check))
    agrees = (gap64 <= 0.1 * observed if math.isfinite(observed) else compare(t64, j64, tol64).ok)
    if dtype == "float64" and agrees and compare(t64, j64, tol64).ok:
        # The re-run is the failing dtype itself, on the CPU: it can only differ from the failing
        # run if that ran elsewhere (torchvision's float64 crop on an H200: torch 0.556, its CPU 0).
        _decide(verdict, path, t32, j32, (t64 + j64) / 2,
                f"re-run on the CPU, the two sides agree in float64 ({gap64:.2g}, against {observed:.3g} in this "
                "run): not rounding but a kernel of this run's device, so the CPU result is the reference",
                dtype=dtype, evidence="grid", tol=tol)
        return
    if dtype != "float64" and math.isfinite(gap64) and agrees:
        ref = (t64 + j64) / 2
        agree = f"in float64 the two sides agree to {gap64:.2g} (against {observed:.2g} in {dtype})"
        found = rounding(pair, check, args, ev, verdict, dtype, tol)
        if found.explained:
            # The tested dtype's own rounding explains the gap: no lower precision to suspect.
            _decide(verdict, path, t32, j32, ref, agree + ": the gap is rounding, so the float64 result is the "
                    "reference", dtype=dtype, evidence="none")
            return
        if verdict.kind == "nonfinite":
            lead = (agree + f": not rounding: in {dtype} one side is not finite where the other is (an overflow "
                    f"or a lost value in that side's {dtype} arithmetic); the float64 result is the reference")
        else:
            times = found.off / found.spread if found.spread > 0 else math.inf
            ulps = f"{dtype} ulps" if tol.unit is None else f"ulps of the arithmetic's unit {tol.unit:.3g}"
            lead = (agree + f", but the {dtype} gap is not rounding: the sides are up to {found.off:.3g} from the "
                    f"float64 answer, {times:.3g} times the most that input perturbations of {ULPS:g} {ulps} "
                    f"move it ({found.spread:.3g}): a dtype-dependent threshold or default differs (e.g. a cutoff "
                    f"relative to the dtype's eps), or one side's formula loses precision in {dtype}")
        _decide(verdict, path, t32, j32, ref, lead, both="both sides are that far from the float64 answer",
                dtype=dtype, evidence="vanishes", tol=tol)
        return
    # A derivative can differ where the forwards agree (a custom backward, torch's once_differentiable
    # under an HVP): "different functions" would send the reader to the forward.
    lead = (f"the two sides differ in float64 too ({gap64:.3g}): not rounding, they compute different "
            + ("functions" if check == "forward" else f"derivatives ({check.upper()}s)"))
    if check == "forward":
        if pair.reference is None:
            lone = lone_nonfinite(verdict, t32, j32, t64, j64, dtype)
            at_pole = pole(pair, args64, vec64, lone[0], path, t64 if lone[0] == "torch" else j64) if lone else ""
            verdict.side = lone[0] if lone and not at_pole else None
            verdict.diagnosis = lead + "; " + (at_pole or (lone[1] if lone else "give the Pair a float64 `reference` "
                                                        "to decide which side is right"))
            return
        try:
            ref_tree = pair.reference(*args64)
        except Exception as exc:
            verdict.diagnosis = lead + f"; the pair's reference raised {type(exc).__name__}: {exc}"
            return
        ref = leaf_at(as_tree(ref_tree), path)
        if ref is None or ref.shape != t64.shape:
            verdict.diagnosis = lead + "; the pair's reference returns another structure or shape"
            return
        _decide(verdict, path, t64, j64, ref, lead + "; the pair's NumPy reference decides", dtype=dtype, tol=tol)
        return
    # The failing element, for the one-sided probes; a NaN/Inf verdict has none (its leaves are
    # the leaves that compared, the failing one not among them).
    worst = verdict.worst
    index = worst.worst_index if verdict.kind == "values" and worst is not None and worst.path == path else None
    lone = lone_nonfinite(verdict, t32, j32, t64, j64, dtype)
    if lone and forward_pole(pair, args64, vec64, lone[0]):
        # log at 0: torch's -inf forward has an infinite derivative, a port that clamps has a
        # finite one; the forward check judges that, and names the port where it is wrong.
        lead += (f"; {lone[0]}'s own float64 forward is infinite at a pole at this input (its values approaching "
                 f"it grow without bound), so its non-finite derivative follows from its forward, which the forward "
                 f"check judges: no side is named for the derivative")
        lone = None
    try:
        found = derivative(pair, check, args64, vec64, path, t64, j64, index)
    except Exception as exc:
        verdict.side = lone[0] if lone else None
        verdict.diagnosis = lead + "; " + (lone[1] if lone else f"finite differences failed ({type(exc).__name__}: "
                                           f"{exc})")
        return
    if found.ref is None:
        if lone:
            # Nothing to difference (the non-finite side's forward is not finite either, most
            # often), but the lone non-finite value is evidence enough, and said as such.
            verdict.side, verdict.diagnosis = lone[0], lead + "; " + lone[1]
            return
        verdict.side, verdict.local = found.side, found.local
        if found.side:
            verdict.diagnosis = lead + "; " + found.why
            return
        # Unstable differences and no agreement in float64: a derivative exactly zero by cancelling
        # terms of size 1/eps-ish (std of two close values) looks the same as two different formulas.
        verdict.diagnosis = (found.why if found.kink else
                             lead + ", or one formula whose terms cancel, leaving each side's float64 result "
                             "rounding noise; " + found.why)
        return
    # Elements the differences could not settle count as agreeing with them on both sides.
    t_, j_ = ((t64, j64) if found.unsettled is None else
              (np.where(found.unsettled, found.ref, x) for x in (t64, j64)))
    # The check's bound names the nearer side too, past what the differences may be off by; at
    # the failing element only where there is one (elsewhere they may straddle a kink).
    _decide(verdict, path, t_, j_, found.ref, lead + "; " + found.why, dtype=dtype,
            tol=tol if index is None else None, slack=found.error)
    if index is not None:
        _at_failing_element(verdict, index, t64, j64, found.ref, lead + "; " + found.why,
                            beyond=None if tol is None else _beyond(tol, t64, j64, found.ref, dtype, found.error))


def _beyond(tol: Tolerance, t: np.ndarray, j: np.ndarray, ref: np.ndarray, dtype: str,
            slack: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per side, elementwise: further from `ref` than the check's bound plus `slack` (what `ref`,
    an estimate, may be off by)."""
    out = {}
    for side, x in (("torch", t), ("jax", j)):
        with np.errstate(invalid="ignore"):
            far = ~within(tol, x, ref, dtype) & np.isfinite(ref)
            if slack is not None:
                far &= np.abs(np.asarray(x, np.float64) - ref) > slack
        out[side] = far
    return out


def _at_failing_element(verdict: Verdict, index: tuple[int, ...], t: np.ndarray, j: np.ndarray, ref: np.ndarray,
                        lead: str, beyond: dict[str, np.ndarray] | None = None) -> None:
    """The failing element, probed for a kink and found smooth, outweighs the leaf's largest
    errors: central differences across a kink at another element (relu or softsign'' at a drawn
    0) read a slope neither side owes, and would name the side that is right, or both. Where the
    failing element names another side than the leaf did, it is the one named; both where the
    nearer side is beyond the check's bound there too (`beyond`, per side)."""
    et, ej = (abs(float(x[index]) - float(ref[index])) for x in (t, j))
    side = "torch" if et > DECISIVE * ej else "jax" if ej > DECISIVE * et else None
    near = {"torch": "jax", "jax": "torch"}.get(side or "")
    if near and beyond is not None and bool(beyond[near][index]):
        verdict.side = "both"
        verdict.diagnosis = (
            f"{lead}; at the failing element {list(index)} both are off: {side} most, and {near} too, beyond the "
            f"check's bound against the differences and what they may be off by (torch {float(t[index]):.6g}, "
            f"jax {float(j[index]):.6g}, differences {float(ref[index]):.6g})")
        return
    if side is None or side == verdict.side:
        return
    leaf = "both sides" if verdict.side == "both" else verdict.side
    verdict.side = side
    verdict.diagnosis = (
        f"{lead}; at the failing element {list(index)}, where one-sided differences show no kink, {side} is off "
        f"(torch {float(t[index]):.6g}, jax {float(j[index]):.6g}, differences {float(ref[index]):.6g}); elsewhere "
        f"in the leaf the differences are further from {leaf} (torch {gap(t, ref):.3g}, jax {gap(j, ref):.3g}), "
        f"at elements not probed for a kink, where differences across one read a slope neither side owes")


def _on(dtype: Any, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype).astype(np.float64) == x


def _tf32(x: np.ndarray) -> np.ndarray:
    f = x.astype(np.float32)
    return (f.astype(np.float64) == x) & ((f.view(np.uint32) & np.uint32(0x1FFF)) == 0)


_LOW_PRECISION = (("bfloat16", 2.0**-8, lambda x: _on(np_dtype("bfloat16"), x)),
                  ("float16 or TF32", 2.0**-11, lambda x: _on(np.float16, x) | _tf32(x)))
_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def _precision_hint(x: np.ndarray, ref: np.ndarray, dtype: str, evidence: str) -> str:
    """" (does it compute in bfloat16?)" where the evidence says so, else "". A relative error
    of a lower format's size is no evidence alone: a constant factor of 1.001 has it too. Where
    the gap vanishes in float64 ("vanishes"), the difference is precision, and its size names
    the format. Where the sides differ in float64 too ("grid"), the side's values themselves
    must lie on the format's grid, within one of its roundings of the answer: a result rounded
    to it."""
    if evidence == "none":
        return ""
    with np.errstate(invalid="ignore"):
        if np.any(~np.isfinite(x) & np.isfinite(ref)):
            # A NaN or an overflow where the answer is finite is no lower format's rounding
            # (torch's cumprod JVP at float32's smallest normal: NaN beside a 6.3e-05 error).
            return ""
    vanishes = evidence == "vanishes"
    differ = np.isfinite(x) & np.isfinite(ref) & (np.abs(ref) > 1e-30) & (x != ref)
    if not differ.any():
        return ""
    rel = float(np.max(np.abs(x[differ] - ref[differ]) / np.abs(ref[differ])))
    for name, eps, on_grid in _LOW_PRECISION:
        if eps <= _UNIT_ROUNDOFF.get(dtype, 0.0):
            continue  # not lower than the tested dtype: that is the dtype's own rounding
        if vanishes and eps / 16 <= rel <= eps:
            # Values alone cannot tell the two apart: x^2 - mean^2 at x ~ 100 in float32 lands on
            # multiples of 2^-10, bfloat16's grid at 0.2 (the planted-bug trial's naive variance).
            return (f" (its relative error {rel:.2g} is what {name} rounding gives, and the gap vanishes in float64: "
                    f"it computes part of the result in {name}, or its {dtype} formula cancels much larger terms)")
        if not vanishes and rel <= eps and np.all(on_grid(x[differ])):
            return (f" (its values lie on the {name} grid, within one {name} rounding of the answer (relative "
                    f"error {rel:.2g}): does it compute in {name}?)")
    return ""


_BOTH = "both sides are off by similar amounts (an ill-conditioned input, or a tolerance too tight for this op)"


def _decide(verdict: Verdict, path: str, t: np.ndarray, j: np.ndarray, ref: np.ndarray, lead: str,
            both: str = _BOTH, *, dtype: str, evidence: str = "grid", tol: Tolerance | None = None,
            slack: np.ndarray | None = None) -> None:
    """Name the side further from `ref` by DECISIVE, or both. With `tol` (the check's bound), the
    nearer side is off too where it is beyond that bound against `ref` plus `slack` (what `ref`,
    an estimate, may be off by): one side 29x further than the other must not hide that the other
    is 15x the bound (gelu's tanh approximation against a sigmoid one, with erf's as the reference).
    `evidence` for the precision hint (`_precision_hint`): "vanishes" where the gap vanishes in
    float64 and is no input rounding, "grid" where the sides differ in float64 too, "none" where
    rounding explains it."""
    et, ej = gap(t, ref), gap(j, ref)
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
    if verdict.side != "both" and tol is not None:
        near, far = ("jax", "torch") if verdict.side == "torch" else ("torch", "jax")
        with np.errstate(invalid="ignore"):
            beyond = _beyond(tol, t, j, ref, dtype, slack)[near]
        if np.any(beyond):
            verdict.side = "both"
            both = (f"both are off: {far} most, and {near} too, beyond the check's bound against it "
                    f"({tol.describe()})")
    verdict.diagnosis = (
        f"{lead}; max error against it: torch {et:.3g}, jax {ej:.3g} at {path}: "
        + {"torch": "torch is off" + _precision_hint(t, ref, dtype, evidence),
           "jax": "jax is off" + _precision_hint(j, ref, dtype, evidence), "both": both}[verdict.side]
    )
