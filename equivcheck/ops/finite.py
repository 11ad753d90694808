"""Derivatives by finite differences, to decide which side's derivative is right.

The function differentiated is the arbiter (`arbiter`): the pair's float64 NumPy reference, or
both sides' float64 forwards where they agree. Steps are relative to the input: element e moves
by REL * scale_e, scale_e = |x_e| (the argument's largest magnitude where x_e = 0, 1 where all
are 0), so an input of 1e-9 is differentiated on its own scale and never stepped across zero.
Each derivative is taken at steps h and h/2 and Richardson-extrapolated; where the two steps
disagree by more than 1/DECISIVE of the float64 gap between the sides, the finite differences
cannot tell the sides apart and no side is named. A step that changes the function by rounding only
(an input of 1e-32 where the function's value is about 1), while a step of REL in the input's own
units changes it, cannot see the derivative: where what it missed could explain the sides' gap at
the failing element, no side is named. At the failing element of a VJP or JVP,
one-sided differences from the left and the right are compared first: where they differ by a
jump that does not shrink with the step, the function has a kink there, and the derivative is
a convention the pair has to declare. An HVP is probed the same way, on the gradient: a jump in
the first derivative along the HVP direction is a kink of the first derivative.

Without a reference, agreeing at the example is not enough: tanh(1.01 x) and tanh(x) agree at
x = 0, and their mean has the derivative 1.005, which blames both sides. So each side's forward
is differenced on its own, at the very points the arbiter uses, and where the two differ by
more than 1/DECISIVE of the sides' gap the forwards differ near the example: their derivatives
cannot be arbitrated, and the forward difference is the likely cause.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from equivcheck.backends import Vectors, jax_side, torch_side
from equivcheck.engine.compare import compare, float_leaves
from equivcheck.engine.tolerance import lookup
from equivcheck.ops.autodiff import leaf_at
from equivcheck.ops.differences import Differences

MAX_ELEMENTS = 2048
# One side must be this many times further from the reference to be named alone; the finite
# differences must be that many times more certain than the gap between the sides.
DECISIVE = 4.0


@dataclasses.dataclass
class Arbitration:
    """The finite-difference derivative at the failing leaf (None where there is none), and
    how it was taken or why it could not be; `kink` where the function is not differentiable."""

    ref: np.ndarray | None
    why: str
    kink: bool = False
    forwards_differ: bool = False
    unstable: bool = False  # the differences, not the sides, are what cannot decide at this example
    unsettled: np.ndarray | None = None  # elements of `ref` the differences could not settle: left out
    side: str | None = None  # named without a `ref`: "both" where each follows its own, wrong, forward
    error: np.ndarray | None = None  # elementwise, what `ref` may be off by: steps h and h/2 apart, and arbiters apart

    @property
    def local(self) -> bool:
        """Undecided because of where the example lies, not of the pair: elsewhere it may decide."""
        return self.kink or self.unstable


def as_tree(x: Any) -> Any:
    return x if isinstance(x, (list, tuple, dict)) else np.asarray(x)


def forward64(pair: Any, args64: Sequence[Any], side: str, vec: Vectors
               ) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """The float leaves of one side's float64 forward, or of the pair's reference, as a
    function of the differentiable arguments."""
    tb, jb = torch_side(), jax_side()
    cpu = tb.device_of("cpu")

    def f(diff_vals: Sequence[np.ndarray]) -> list[np.ndarray]:
        a = list(args64)
        for i, v in zip(pair.diff_args, diff_vals):
            a[i] = np.asarray(v)  # arithmetic on a 0-d array gives a NumPy scalar, which torch refuses
        if side == "reference":
            out = as_tree(pair.reference(*a))
        elif side == "torch":
            out = tb.to_numpy(pair.torch_fn(*[tb.to_torch(x, cpu) for x in a]))
        else:
            res = jb.run(pair.jax_fn, a, pair.diff_args, ("forward",), "cpu", vec, True)
            if "forward" in res.errors:
                raise RuntimeError(res.errors["forward"].describe())
            out = res.values["forward"]
        return [np.asarray(leaf, np.float64) for leaf in float_leaves(out)]

    return f


Function = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def arbiter(pair: Any, args64: Sequence[Any], vec: Vectors) -> tuple[dict[str, Function] | None, str]:
    """The float64 functions whose derivatives decide, and how to name them: the pair's
    reference when it has one; else both sides' float64 forwards, whose mean decides, provided
    they agree at the example (if they do not, no derivative of either can be trusted over the
    other). `derivative` also checks that they agree around it."""
    if pair.reference is not None:
        source = "central finite differences of the pair's float64 NumPy reference decide"
        return {"reference": forward64(pair, args64, "reference", vec)}, source
    ft, fj = forward64(pair, args64, "torch", vec), forward64(pair, args64, "jax", vec)
    primals = [np.asarray(args64[i], np.float64) for i in pair.diff_args]
    tol = lookup("float64", check="forward", tags=pair.tags, override=pair.tolerance_for("float64", "forward"))
    same = compare(ft(primals), fj(primals), tol)
    if not same.ok:
        return None, (f"the two forwards differ ({same.message}), so their derivatives cannot be arbitrated; "
                      f"give the Pair a float64 `reference` to decide which side is right")
    source = "central finite differences of both sides' float64 forwards (which agree there and around) decide"
    return {"torch": ft, "jax": fj}, source


def derivative(pair: Any, check: str, args64: Sequence[Any], vec: Vectors, path: str, t64: np.ndarray,
               j64: np.ndarray, index: tuple[int, ...] | None) -> Arbitration:
    """The derivative `check` at `path` by finite differences of the arbiter, or why there is
    none: the arbiter cannot be had, the two forwards differ around the example, the function
    (or, for an HVP, its first derivative) has a kink at the failing element `index`, or the
    differences are unstable against the sides' float64 gap."""
    fs, source = arbiter(pair, args64, vec)
    if fs is None:
        return Arbitration(None, source)
    if check not in ("vjp", "jvp", "hvp"):
        return Arbitration(None, f"no finite-difference rule for {check}")
    primals = [np.asarray(args64[i], np.float64) for i in pair.diff_args]
    fds = {name: Differences(f, primals, vec) for name, f in fs.items()}
    sides_gap = gap(t64, j64)
    if index is not None:
        found, ones = _at_element(pair, check, path, index, fds, t64, j64)
        if found is None and "reference" in fds:
            found = _reference_near(pair, check, path, index, fds["reference"], ones["reference"], args64, vec,
                                    t64, j64)
        if found is not None:
            return found
    if check != "jvp" and primals[pair.grad_index(path)].size > MAX_ELEMENTS:
        return Arbitration(None, f"too many elements for finite differences (> {MAX_ELEMENTS})")
    if check == "jvp" and sum(p.size for p in primals) > MAX_ELEMENTS:
        return Arbitration(None, f"too many elements for finite differences (> {MAX_ELEMENTS})")
    steps = {name: [fd.at(pair, check, path, s) for s in (1.0, 0.5)] for name, fd in fds.items()}
    if any(d is None or d.shape != t64.shape for pair_ in steps.values() for d in pair_):
        return Arbitration(None, "the arbiter function returns another structure than the sides")
    d1, d2 = (sum(ds[i] for ds in steps.values()) / len(steps) for i in (0, 1))  # the mean's differences
    # Elements where what the small steps read as flat (a larger step's value) could explain the gap
    blind = np.zeros(t64.shape, bool)
    with np.errstate(invalid="ignore"):
        for fd in fds.values():
            for (k, e), wide in fd.unresolved.items():
                if check == "jvp":
                    missed = np.abs(float(fd.vec.t[k].flat[e]) * np.asarray(leaf_at(wide, path), np.float64))
                elif k == pair.grad_index(path):
                    missed = np.zeros(t64.shape)
                    missed.flat[e] = abs(wide if check == "hvp" else fd.weighted(wide))
                else:
                    continue
                blind |= DECISIVE * missed > np.abs(t64 - j64)
    if blind.any() and (index is None or not blind.shape or blind[index]):
        return Arbitration(None, "finite differences cannot resolve this example: a step relative to the input "
                                 "moves the function by less than float64 rounding of its value, while a larger one "
                                 "moves it (an input far smaller than the function's own scale); no side is named",
                           unstable=True)
    with np.errstate(invalid="ignore"):
        if not (np.all(np.isfinite(d1)) and np.all(np.isfinite(d2))):
            return Arbitration(None, "finite differences are unstable here: they are not finite at this example; "
                                     "no side is named", unstable=True)
        drift = np.abs(d1 - d2)
    # Steps h and h/2 that disagree at other elements than the failing one (a 1e-38 input beside
    # ones, whose second differences are rounding over h^2) leave those elements out; the failing
    # element, stable, decides, as it outweighs the leaf elsewhere (`diagnose._at_failing_element`).
    noisy = (DECISIVE * drift > sides_gap) | blind
    unsettled = None
    if noisy.any():
        if (index is None or not drift.shape or noisy[index]
                or DECISIVE * drift[index] > abs(float(t64[index]) - float(j64[index]))):
            return Arbitration(None, f"finite differences are unstable here: steps h and h/2 give derivatives "
                                     f"{float(np.max(drift)):.3g} apart, against a gap of {sides_gap:.3g} between the "
                                     f"sides' float64 results; no side is named", unstable=True)
        unsettled = noisy
    # Richardson: both rules err by O(h^2), so this cancels the leading term.
    refs = {name: b + (b - a) / 3 for name, (a, b) in steps.items()}
    # Richardson's b + (b - a) / 3 carries 4/3 of b's rounding and 1/3 of a's
    noise = np.max([np.maximum(fd.noise.get(1.0, np.inf), fd.noise.get(0.5, np.inf)) for fd in fds.values()], axis=0)
    error = np.where(np.isfinite(drift), drift, np.inf) + 2 * noise
    if len(refs) == 2:
        apart = np.abs(refs["torch"] - refs["jax"])
        error = error + apart
        if unsettled is not None:
            apart[unsettled] = 0.0
        if DECISIVE * float(np.max(apart, initial=0.0)) > sides_gap:
            at = np.unravel_index(int(np.argmax(apart)), apart.shape) if apart.shape else ()
            where = f"at {path}{list(at)}" if at else f"at {path}"
            return _forwards_differ(float(refs["torch"][at]), float(refs["jax"][at]), float(t64[at]),
                                    float(j64[at]), where)
    why = source.replace("central finite differences", "central finite differences (steps relative to the input, "
                         "two steps agreeing)")
    if unsettled is not None:
        why += (f"; at {int(unsettled.sum())} other elements steps h and h/2 disagree (up to "
                f"{float(np.max(drift[unsettled])):.3g}): those are left out, and the failing element decides")
    return Arbitration(sum(refs.values()) / len(refs), why, unsettled=unsettled, error=error)


def _at_element(pair: Any, check: str, path: str, index: tuple[int, ...], fds: dict[str, Differences],
                t64: np.ndarray, j64: np.ndarray) -> tuple[Arbitration | None, dict[str, Any]]:
    """What one-sided differences at the failing element say, before the costly full differences:
    the forwards' own differences disagree there, or the arbiter has a kink there (None where
    neither); and each function's one-sided differences, which `_reference_near` reuses."""
    ones = {name: fd.one_sided(pair, check, path, index) for name, fd in fds.items()}
    t, j = float(t64[index]), float(j64[index])
    apart = abs(t - j)
    where = next(iter(ones.values()))[1]
    if len(ones) == 2:
        (lt, rt), (lj, rj) = ones["torch"][0][-1], ones["jax"][0][-1]
        with np.errstate(invalid="ignore"):
            differ = max(abs(lt - lj), abs(rt - rj))
        if np.isfinite(differ) and DECISIVE * differ > apart:
            # The side whose one-sided differences are further apart from the other's is shown.
            worst = 0 if abs(lt - lj) >= abs(rt - rj) else 1
            return _forwards_differ((lt, rt)[worst], (lj, rj)[worst], t, j,
                                    where + (", from the left" if worst == 0 else ", from the right")), ones
    mean = [tuple(sum(o[0][k][i] for o in ones.values()) / len(ones) for i in (0, 1)) for k in (0, 1)]
    kink = _kink(check, mean, t, j, where)
    return (Arbitration(None, kink, kink=True) if kink else None), ones


def _reference_near(pair: Any, check: str, path: str, index: tuple[int, ...], ref: Differences, ref_one_sided: Any,
                    args64: Sequence[Any], vec: Vectors, t64: np.ndarray, j64: np.ndarray) -> Arbitration | None:
    """None where the reference's one-sided differences at the failing element match those of
    at least one side's own float64 forward; else why the reference cannot decide. A reference
    that agrees with both sides on the drawn inputs may still differ off them: NumPy's cholesky
    reads the lower triangle where both sides symmetrise, so its derivative along an upper
    element is 0 against both sides' half of the lower's, and it would blame the side that is
    right. The same function differenced at the same points agrees to rounding; the slack is
    the differences' own drift between steps h and h/2, and 1e-6 of their size for rounding
    amplified by 1/h (~1e5 eps)."""
    steps, where = ref_one_sided  # `ref.one_sided` at this element, as `_at_element` took it
    seen, drift, fns = [], 0.0, {}
    for side in ("torch", "jax"):
        try:
            fns[side] = forward64(pair, args64, side, vec)
            own = Differences(fns[side], ref.primals, vec).one_sided(pair, check, path, index)[0]
        except Exception:  # noqa: BLE001 - a side that cannot be differenced is no evidence against it
            return None
        both = np.array([steps, own], dtype=np.float64)  # [function, step, left/right]
        if not np.all(np.isfinite(both)):
            return None
        off = float(np.max(np.abs(both[0, -1] - both[1, -1])))
        slack = float(np.sum(np.abs(both[:, 0] - both[:, 1])) + 1e-6 * np.sum(np.abs(both[:, -1])) + 1e-300)
        if off <= slack:
            return None
        seen.append(float(np.mean(both[1, -1])))
        drift += float(np.sum(np.abs(both[1, 0] - both[1, 1])))
    t, j = float(t64[index]), float(j64[index])
    tol = lookup("float64", check="forward", tags=pair.tags, override=pair.tolerance_for("float64", "forward"))
    forwards_apart = abs(seen[0] - seen[1]) > DECISIVE * max(abs(t - seen[0]), abs(j - seen[1]), drift)
    at_ref = ref.f(ref.primals) if forwards_apart else None
    if forwards_apart and not any(compare(fns[s](ref.primals), at_ref, tol).ok for s in fns):
        # Not a reference slip (a side whose forward is the reference's at the example, NumPy's
        # lower-triangle cholesky): both forwards differ from it there and from each other near
        # it, each derivative its own forward's. Two approximations of gelu against erf's.
        return Arbitration(None, (
            f"each side's derivative is that of its own forward (one-sided differences of each side's float64 "
            f"forward give torch {seen[0]:.6g}, jax {seen[1]:.6g} {where}; the sides give torch {t:.6g}, jax "
            f"{j:.6g}), and neither forward is the pair's float64 reference near this point (its differences give "
            f"{float(np.mean(steps[-1])):.6g}): both are off, as their forwards are"), side="both")
    return Arbitration(None, (
        f"the pair's float64 reference is not the function either side computes near this point: its one-sided "
        f"differences give {float(np.mean(steps[-1])):.6g} {where}, each side's own float64 forward torch "
        f"{seen[0]:.6g}, jax {seen[1]:.6g}; no side is named: make the reference compute what both sides compute "
        f"off the drawn inputs too (the same symmetrisation, clamp or mask), or leave it out"))


def _forwards_differ(dt: float, dj: float, t: float, j: float, where: str) -> Arbitration:
    own = max(abs(t - dt), abs(j - dj)) <= abs(dt - dj) / DECISIVE
    mine = " Each side's derivative matches its own forward: the forwards are what differ." if own else ""
    return Arbitration(None, (
        f"the two forwards differ near this point, so their derivatives cannot be arbitrated: they agree at the "
        f"example, but differencing each side's float64 forward on its own gives torch {dt:.6g}, jax {dj:.6g} "
        f"{where} (the sides' derivatives: torch {t:.6g}, jax {j:.6g}); no side is named.{mine} A forward "
        f"difference near this point is the likely cause: check the forward on inputs around this one, or give "
        f"the Pair a float64 `reference` to decide"), forwards_differ=True)


def _kink(check: str, one_sided: list[tuple[float, float]], t: float, j: float, where: str) -> str:
    """Why the derivative at the failing element is undefined, or "": one-sided differences
    from the left and the right that each hold still as the step halves but differ from each
    other by a jump that explains the sides' gap there."""
    (l1, r1), (l2, r2) = one_sided
    jump, drift = abs(r2 - l2), abs(r1 - r2) + abs(l1 - l2)
    if not (np.isfinite(jump) and jump > 0 and drift < jump / DECISIVE and DECISIVE * jump >= abs(t - j)):
        return ""
    if check == "hvp":
        return (f"the function's first derivative has a kink here (left second derivative {l2:.6g}, right second "
                f"derivative {r2:.6g}, {where}); the sides give torch {t:.6g}, jax {j:.6g}: each picks its own "
                f"value where no second derivative exists, so no side is named; declare a Convention with the "
                f"second derivatives: Convention(name, where=..., torch=..., jax=..., doc=..., hvp=(torch, jax))")
    return (f"the function has a kink here (left derivative {l2:.6g}, right derivative {r2:.6g}, {where}); "
            f"the sides give torch {t:.6g}, jax {j:.6g}: each picks its own "
            f"value where no derivative exists, so no side is named; declare a Convention: "
            f"Convention(name, where=..., torch=..., jax=..., doc=...)")


def gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise distance; a NaN or infinity the other side lacks is infinitely far."""
    both = np.isfinite(a) & np.isfinite(b)
    nonfinite_mismatch = (np.isnan(a) != np.isnan(b)) | ((np.isinf(a) | np.isinf(b)) & (a != b))
    if nonfinite_mismatch.any():
        return float("inf")
    return float(np.max(np.abs(a[both] - b[both]), initial=0.0))
