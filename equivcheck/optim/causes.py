"""Causes an optimizer diagnosis recognises from the trajectories themselves, without
changing a hyperparameter: an update applied one step late, and weight decay applied to
other parameters (other param groups) on the two sides.

Both re-run the failing example; both return "" when the pattern is not there, so the
diagnosis goes on to its hyperparameter probes (equivcheck.optim.diagnose).
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from equivcheck.engine.compare import flatten, within
from equivcheck.engine.tolerance import Tolerance
from equivcheck.optim.problems import LINEAR
from equivcheck.optim.sides import MAX_STEPS, leaf_paths, run_jax, run_torch, scan_length, torch_optimizer_for
from equivcheck.optim.trajectory import PROBLEM_OF, Example, compare_steps

# Steps over which a lag is looked for. A one-step check has nothing to shift, so its
# example runs this many steps of its constant gradient (the linear problem: a lagging side
# then equals the other delayed, at every step).
LAG_STEPS = 8
# A side that does not move at all matches the other "delayed" at step 1 (both at the start):
# a lag needs at least two steps in agreement, and more than the unshifted comparison.
MIN_LAG_STEPS = 2

__all__ = ["LAG_STEPS", "coarse_grid", "decay_elsewhere", "lagged", "nonfinite"]


# What makes a side's first update zero and the later ones a step late; from the first steps alone
# the two cannot be told apart (an Adam whose first learning rate is 0 sees the same gradient twice).
_LATE = {
    "jax": ("a learning rate of 0 at count 0 (a schedule that starts from 0 or counts from 1), or an update "
            "computed from the previous gradient (optax's scale_by_rprop does)"),
    "torch": ("a learning rate of 0 at the first optimizer.step() (a warm-up from 0, a scheduler stepped before "
              "the optimizer), or an update computed from the previous gradient"),
}


def lagged(pair: Any, ex: Example, dtype: str, run: Any, base: Tolerance) -> tuple[str | None, str] | None:
    """One side's step n equals the other's step n-1 (its first update is zero, or it applies
    the update computed from the previous gradient: optax's scale_by_rprop does). Compared on
    the parameters only: a lagging side's state may run ahead (Rprop's step sizes).

    In a closed loop the two runs part once the lagging side's stale update meets a gradient
    the other never saw (for a stateful optimizer from step 3, for Rprop at the first sign
    change), so the rule is a longer agreement shifted than unshifted, of at least
    MIN_LAG_STEPS steps."""
    if ex.check not in PROBLEM_OF:
        return None
    problem = PROBLEM_OF[ex.check]
    n = max(ex.steps, LAG_STEPS)
    length = LAG_STEPS if problem is LINEAR and ex.check == "step" else MAX_STEPS
    try:
        t = run_torch(pair, problem, ex.params, ex.data, n, dtype=dtype, device=run.device)
        j = run_jax(pair, problem, length, ex.params, ex.data, n, dtype=dtype, device=run.device)
    except Exception:  # a side that raises on the longer run says nothing about a lag
        return None
    start = [{"params": ex.params}]
    tp = start + [{"params": s["params"]} for s in t]
    jp = start + [{"params": s["params"]} for s in j]

    def agree(a: list[Any], b: list[Any]) -> int:
        out = compare_steps(a, b, base)
        return len(a) if out.ok else out.step - 1

    same = agree(tp[1:], jp[1:])
    for late, a, b in (("jax", tp[:-1], jp[1:]), ("torch", jp[:-1], tp[1:])):
        k = agree(a, b)
        # A late side's first update is zero, so its first step is the start exactly, where the other
        # side moved past the bound: updates under the bound (gradients of 1e-6) agree with any shift.
        if k >= MIN_LAG_STEPS and k > same and _still(b[0], ex.params) and not compare_steps(a[1:2], a[:1], base).ok:
            other = "torch" if late == "jax" else "jax"
            span = "" if k == n else f", for its first {k} steps of {n}"
            return late, (f"the {late} side applies each update one step late (its step n equals {other}'s step n-1"
                          f"{span}): its first update is zero and each later one is the one {other} made a step "
                          f"earlier: {_LATE[late]}")
    return None


def nonfinite(pair: Any, ex: Example, out: Any, dtype: str, run: Any) -> tuple[str | None, str] | None:
    """A step that is NaN or infinite on one side where the other's is finite: a step from finite
    parameters and gradients is finite, so the non-finite side is off, once the finite side's float64
    run is finite there too (the finite value is then no float32 accident). Elements non-finite on
    both sides, or finite in neither float64 run, leave it undecided."""
    v = out.verdict
    if v is None or v.kind != "nonfinite":
        return None
    odd: dict[str, list[str]] = {"torch": [], "jax": []}
    for path, a, b in ((p, np.asarray(a, np.float64), np.asarray(b, np.float64)) for p, a, b in _matched(out)):
        odd["torch"] += [path] * bool(np.any(~np.isfinite(a) & np.isfinite(b)))
        odd["jax"] += [path] * bool(np.any(~np.isfinite(b) & np.isfinite(a)))
    sides = [s for s, paths in odd.items() if paths]
    if len(sides) != 1:
        return None
    off = sides[0]
    fine = "jax" if off == "torch" else "torch"
    problem, n = PROBLEM_OF.get(ex.check), out.global_step
    if out.start is None and problem is not None:
        try:
            wide = (run_torch(pair, problem, ex.params, ex.data, n, dtype="float64", device=run.device) if fine == "torch"
                    else run_jax(pair, problem, scan_length(ex.check), ex.params, ex.data, n,
                                 dtype="float64", device=run.device))
            at = dict(flatten(wide[n - 1]))
        except Exception:  # noqa: BLE001 - a float64 re-run that fails cannot confirm the finite value
            return None
        if not all(np.all(np.isfinite(np.asarray(at[p], np.float64))) for p in odd[off] if p in at):
            return None
    return off, (f"the {off} side's step {out.global_step} is NaN or infinite at {odd[off][0]} where {fine}'s is "
                 f"finite (in float64 too): a step from finite parameters and gradients is finite")


def coarse_grid(out: Any) -> tuple[str, str] | None:
    """A leaf (parameters or state) that one side keeps in a narrower float dtype than the other,
    or whose every nonzero value on one side is a float16 or bfloat16 number where the other
    side's are not: that side keeps it in, or rounds it through, the narrower dtype (an Adam second
    moment through float16 read "check the StateField" or "no single change"). A float32 number
    is a float16 one by chance once in 8192, and this is asked of failing steps only."""
    matched = [m for m in _matched(out) if m[1].dtype.kind == "f" and m[2].dtype.kind == "f"]
    pairs = [("jax", "torch", path, b, a) for path, a, b in matched] + [("torch", "jax", path, a, b)
                                                                         for path, a, b in matched]
    for side, other, path, a, b in pairs:  # a narrower dtype first: a leaf that did not move is on every grid
        if a.dtype.itemsize < b.dtype.itemsize:
            return side, f"{side} keeps {path} in {a.dtype.name} where {other} keeps {b.dtype.name}"
    for side, other, path, a, b in pairs:
        for grid in (np.float16, ml_dtypes.bfloat16):
            how = _on_grid(a, b, grid) if a.dtype.itemsize > 2 else ""
            name = np.dtype(grid).name
            if how == "grid":
                return side, (f"{side}'s {path} at step {out.global_step} is on the {name} grid (every nonzero "
                              f"value a {name} number) where {other}'s is not: {side} keeps it in {name}, or "
                              f"rounds it through {name}")
            if how == "flushed":
                return side, (f"{side}'s {path} at step {out.global_step} is 0 where {other}'s is below {name}'s "
                              f"smallest subnormal: {side} flushes it, keeping it in or rounding it through {name} "
                              f"(or never updates it)")
    return None


def _matched(out: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(path, torch's value, jax's value), in each side's own dtype, for every leaf of the failing
    step (parameters and state) both sides hold with one shape, sorted by path; [] without both."""
    if out.torch_at is None or out.jax_at is None:
        return []
    t, j = dict(flatten(out.torch_at)), dict(flatten(out.jax_at))
    both = ((p, np.asarray(t[p]), np.asarray(j[p])) for p in sorted(set(t) & set(j)))
    return [(p, a, b) for p, a, b in both if a.shape == b.shape]


def _on_grid(a: np.ndarray, b: np.ndarray, grid: Any) -> str:
    """"grid" where every finite nonzero element of `a` is a `grid` number and at some element `a`
    differs from `b`, which is not one, while `a` takes more than 4 significant bits (-1, 0.75 or a
    leaf that did not move are on every grid); else "flushed" where `a` is 0 where `b` is under half
    the grid's smallest subnormal (an Adam second moment of 1e-15 flushed by float16); else ""."""
    with np.errstate(over="ignore", invalid="ignore"):
        on_a = a.astype(grid).astype(a.dtype) == a
        on_b = b.astype(grid).astype(b.dtype) == b
        simple = (np.frexp(np.where(np.isfinite(a), a, 0))[0] * 16) % 1 == 0
    some = np.isfinite(a) & (a != 0)
    tiny = float(ml_dtypes.finfo(grid).smallest_subnormal) / 2
    flushed = (a == 0) & (b != 0) & (np.abs(b) < tiny)
    if not on_a[some].all():
        return ""
    return "grid" if (~on_b & (a != b) & some & ~simple).any() else "flushed" if flushed.any() else ""


def _still(step: Any, start: Any) -> bool:
    """The parameters after one step are the start's, bit for bit."""
    return all(np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
               for a, b in zip(_leaves(step["params"]), _leaves(start), strict=True))


def _decay_of(optimizer: Any, leaves: list[Any]) -> list[float]:
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [float(group[id(p)].get("weight_decay", 0.0)) for p in leaves]


def _with_decay(pair: Any, value: float) -> Any:
    def build(params: Any) -> Any:
        optimizer = pair.torch_optimizer(params)
        for g in optimizer.param_groups:
            g["weight_decay"] = value
        return optimizer

    return pair.replace(torch_optimizer=build)


def decay_elsewhere(pair: Any, ex: Example, dtype: str, run: Any, base: Tolerance) -> str:
    """torch's param groups decay some leaves and not others (or with other values); if every
    leaf's first step on the jax side matches torch run with one of those weight_decay values
    on all leaves, and some leaf matches only another group's value, the two sides decay
    different parameters: an inverted or wrong mask (optax.masked, adamw(mask=...)) or
    optax.multi_transform labels that do not follow torch's groups.

    Step 1 only: the leaves are independent there (the same gradient, one elementwise step),
    later the loss couples them and one wrong leaf moves the others."""
    import torch

    if ex.check not in PROBLEM_OF:
        return ""
    problem = PROBLEM_OF[ex.check]
    length = scan_length(ex.check)
    try:
        leaves = [torch.tensor(x) for x in _leaves(ex.params)]
        own = _decay_of(torch_optimizer_for(pair, leaves, ex.params), leaves)
    except Exception:
        return ""
    values = sorted(set(own))
    if len(values) < 2:
        return ""
    try:
        jax1 = _leaves(run_jax(pair, problem, length, ex.params, ex.data, 1, dtype=dtype, device=run.device)[0]["params"])
        torch1 = {w: _leaves(run_torch(_with_decay(pair, w), problem, ex.params, ex.data, 1, dtype=dtype,
                                       device=run.device)[0]["params"]) for w in values}
    except Exception:
        return ""
    close = lambda a, b: bool(np.all(within(base, a, b, dtype)))
    matches = [[w for w in values if close(torch1[w][i], x)] for i, x in enumerate(jax1)]
    if any(not m for m in matches):
        return ""
    wrong = [i for i, m in enumerate(matches) if own[i] not in m]
    if not wrong:
        return ""
    paths = leaf_paths(ex.params)
    torch_side = ", ".join(f"weight_decay={w:g} on {[p for p, v in zip(paths, own) if v == w]}" for w in values)
    seen = {w: [paths[i] for i in wrong if matches[i][0] == w] for w in values}
    jax_side = "; ".join(f"{', '.join(ps)} as if weight_decay={w:g}" for w, ps in seen.items() if ps)
    return (f"weight decay is applied to other parameters on the two sides: torch's param groups have {torch_side}; "
            f"the jax side's first step moves {jax_side} (an inverted or wrong mask, or multi_transform labels "
            "that do not follow torch's groups)")


def _leaves(tree: Any) -> list[np.ndarray]:
    """In jax.tree.leaves order: the order run_torch hands the leaves to the optimizer."""
    import jax

    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
