"""Forward, VJP, JVP and HVP of one pair on one example, on both sides, and their judgement.

Both sides get the same NumPy arguments and the same random cotangent (drawn from the
torch output's shapes), tangent and HVP direction. The HVP is the cotangent-weighted
Hessian times v, which is symmetric, so torch's reverse-over-reverse and JAX's
forward-over-reverse compute the same vector.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from equivcheck.backends import CotangentMismatch, SideResult, Vectors, jax_side, shapes_text, torch_side
from equivcheck.engine.compare import Verdict, compare, flatten, is_float
from equivcheck.engine.tolerance import Tolerance
from equivcheck.ops.conventions import Convention
from equivcheck.ops.strategies import tangent_like

if TYPE_CHECKING:
    from equivcheck.ops.pairs import Pair

CHECKS = ("forward", "vjp", "jvp", "hvp")


@dataclasses.dataclass
class Evaluation:
    torch: SideResult
    jax: SideResult
    vectors: Vectors
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)  # check -> why


def wide(pair: Pair, dtype: str) -> bool:
    """Whether the JAX side needs 64-bit types switched on for this check."""
    return dtype == "float64" or "needs-x64" in pair.tags


def make_vectors(seed: int, out_leaves: Sequence[np.ndarray], primals: Sequence[np.ndarray]) -> Vectors:
    ct = [tangent_like(seed + i, [leaf], str(leaf.dtype))[0] for i, leaf in enumerate(out_leaves)]
    t = [tangent_like(seed + 1000 + i, [p], str(p.dtype))[0] for i, p in enumerate(primals)]
    v = [tangent_like(seed + 2000 + i, [p], str(p.dtype))[0] for i, p in enumerate(primals)]
    return Vectors(ct, t, v)


def _floating(a: Any) -> bool:
    return isinstance(a, np.ndarray) and is_float(a)


def check_diff_args(pair: Pair, args: Sequence[Any]) -> None:
    for i in pair.diff_args:
        if not _floating(args[i]):
            kind = type(args[i]).__name__ if not isinstance(args[i], np.ndarray) else str(args[i].dtype)
            raise TypeError(f"pair {pair.name!r}: diff_args names argument {i}, which is drawn as {kind}, not floating")


def evaluate(pair: Pair, args: Sequence[Any], seed: int, *, dtype: str, device: str, checks: Sequence[str],
             vectors: Vectors | None = None) -> Evaluation:
    """Run `checks` on both sides. `vectors` pins the cotangents etc. (float64 re-runs).

    Derivative checks are not applicable, and not run, when no argument is floating at all;
    `diff_args` naming a non-floating argument while a floating one exists is the pair's error
    (TypeError), not a derivative to skip."""
    derivatives = [c for c in checks if c != "forward"]
    if derivatives and not any(_floating(a) for a in args):
        na = {c: "no floating-point input to differentiate" for c in derivatives}
        checks = [c for c in checks if c == "forward"]
        if not checks:
            return Evaluation(SideResult("torch"), SideResult("jax"), Vectors([], [], []), na)
        ev = evaluate(pair, args, seed, dtype=dtype, device=device, checks=checks, vectors=Vectors([], [], []))
        ev.not_applicable = na
        return ev
    if derivatives:
        check_diff_args(pair, args)
    primals = [args[i] for i in pair.diff_args] if derivatives else []
    tb, jb = torch_side(), jax_side()

    def vectors_for(leaves: list[np.ndarray]) -> Vectors:
        return vectors if vectors is not None else make_vectors(seed, leaves, primals)

    tres, vec = tb.run(pair.torch_fn, args, pair.diff_args, checks, device, vectors_for)
    if vec is None:
        # torch failed before giving output shapes: take them from JAX's abstract evaluation.
        try:
            leaves = jb.output_leaves(pair.jax_fn, args, device, wide(pair, dtype))
        except Exception:
            leaves = []
        vec = vectors_for(leaves)
    jres = jb.run(pair.jax_fn, args, pair.diff_args, checks, device, vec, wide(pair, dtype))
    return Evaluation(tres, jres, vec)


def keyed(pair: Pair, check: str, value: Any) -> Any:
    """A check's result as compared: gradients keyed by argument (its name, if the pair names it)."""
    if check in ("vjp", "hvp") and isinstance(value, list):
        return {pair.grad_key(k): g for k, g in enumerate(value)}
    return value


def judge(pair: Pair, ev: Evaluation, check: str, tol: Tolerance, args: Sequence[Any]) -> Verdict:
    """One check of one example: whether a derivative can be taken at all, then errors, then
    conventions, then values.

    A derivative check is not applicable (an ok verdict of kind "not-applicable", never a pass
    of zeros) when nothing floating goes in or comes out. It fails on the torch side when that
    side's output is a Python float or NumPy array (autograd lost the graph), and fails naming
    no side when the two sides' floating outputs differ in shape (no common cotangent).
    """
    if check != "forward":
        early = _derivable(ev, check)
        if early is not None:
            return early
    errs = [e for e in (ev.torch.errors.get(check), ev.jax.errors.get(check)) if e]
    if errs:
        side = errs[0].side if len(errs) == 1 else "both"
        return Verdict(False, "error", "; ".join(e.describe() for e in errs), ratio=float("inf"), side=side)
    t, j = keyed(pair, check, ev.torch.values[check]), keyed(pair, check, ev.jax.values[check])
    masks: dict[str, np.ndarray] = {}
    for conv in pair.conventions:
        bad = _apply_convention(pair, conv, check, args, ev, t, j, tol, masks)
        if bad is not None:
            return bad
    verdict = compare(t, j, tol, masks=masks)
    verdict.notes += ev.torch.notes.get(check, []) + ev.jax.notes.get(check, [])
    if not verdict.ok and check == "forward" and ev.torch.lost:
        verdict.message, verdict.side = f"{ev.torch.lost}: {verdict.message}", "torch"
    elif (not verdict.ok and check != "forward" and ev.torch.detached and verdict.kind in ("values", "nonfinite")
          and not np.any(dict(flatten(t)).get(verdict.path, 1))):
        # Zeros where the other side has a derivative: the output was cut from the graph.
        verdict.kind, verdict.side = "graph", "torch"
        verdict.message = f"{ev.torch.detached}, so no {check.upper()}: {verdict.message}"
        verdict.diagnosis = _GRAPH_ADVICE
    return verdict


_GRAPH_ADVICE = ("autograd cannot see the torch output: return the tensor itself (no .item(), .numpy(), .tolist(), "
                 ".detach() or torch.no_grad() on the way out)")


def _derivable(ev: Evaluation, check: str) -> Verdict | None:
    """Why a derivative check cannot compare derivatives at this example, as its verdict; None if it can."""
    if check in ev.not_applicable:
        return Verdict(True, "not-applicable", ev.not_applicable[check])
    t, name = ev.torch, check.upper()
    if t.lost:
        return Verdict(False, "graph", f"{t.lost}, so no {name}", ratio=float("inf"), side="torch",
                       diagnosis=_GRAPH_ADVICE)
    if t.outputs is None:
        return None  # torch's forward raised: its error is the finding
    no_side = "no side is named: the two forwards differ in shape, so their derivatives have nothing to compare"
    jerr = ev.jax.errors.get(check)
    if jerr is not None and jerr.type == CotangentMismatch.__name__:
        return Verdict(False, "structure", f"{jerr.message}: the {name} could not run", ratio=float("inf"),
                       diagnosis=no_side)
    if check == "jvp" and isinstance(ev.jax.values.get(check), list):
        shapes = [tuple(np.shape(x)) for x in ev.jax.values[check]]  # JVP leaves follow the outputs
        if shapes != t.outputs:
            return Verdict(False, "structure", f"outputs have different shapes (torch {shapes_text(t.outputs)}, "
                           f"jax {shapes_text(shapes)}), so their {name}s cannot be compared", ratio=float("inf"),
                           diagnosis=no_side)
    if not t.outputs:
        return Verdict(True, "not-applicable", "no floating-point output to differentiate")
    return None


def _apply_convention(pair: Pair, conv: Convention, check: str, args: Sequence[Any], ev: Evaluation,
                      t: Any, j: Any, tol: Tolerance, masks: dict[str, np.ndarray]) -> Verdict | None:
    """Check each side against its own documented value at the marked points; mask them."""
    if check not in conv.checks and check != "hvp":
        return None
    x = args[conv.arg]
    mask = np.broadcast_to(np.asarray(conv.where(*args), dtype=bool), x.shape)
    if not mask.any():
        return None
    k = pair.diff_args.index(conv.arg)
    # the shapes torch's forward gave, recorded whichever checks run: once the forward check has
    # failed, later passes run the derivative checks alone
    shapes = ev.torch.outputs
    if shapes is None or len(shapes) != 1:
        raise ValueError(f"pair {pair.name!r}: convention {conv.name!r} needs exactly one floating output")
    out_shape = tuple(shapes[0])
    elementwise = out_shape == x.shape
    if not elementwise and out_shape != ():
        raise ValueError(f"pair {pair.name!r}: convention {conv.name!r} needs an elementwise op or a full reduction")
    if check == "hvp" and (conv.hvp is None or not elementwise):
        # Second derivatives at a kink, undeclared: leave them out.
        masks[pair.grad_path(k)] = masks.get(pair.grad_path(k), False) | mask
        return None
    val = {s: np.broadcast_to(np.asarray(conv.value(s, args, check), np.float64), x.shape) for s in ("torch", "jax")}
    with np.errstate(invalid="ignore"):
        if check == "hvp":
            # Elementwise: (H v)_i = ct_i * f''(x_i) * v_i.
            ct = ev.vectors.ct[0].astype(np.float64)
            key = pair.grad_key(k)
            path, where, got = pair.grad_path(k), mask, {"torch": t[key], "jax": j[key]}
            want = {s: val[s] * ct * ev.vectors.v[k].astype(np.float64) for s in val}
        elif check == "vjp":
            key = pair.grad_key(k)
            path, ct = pair.grad_path(k), np.broadcast_to(ev.vectors.ct[0].astype(np.float64), x.shape)
            where, got = mask, {"torch": t[key], "jax": j[key]}
            want = {s: val[s] * ct for s in val}
        elif elementwise:
            path, where = "out[0]", mask
            got = {"torch": t[0], "jax": j[0]}
            want = {s: val[s] * ev.vectors.t[k].astype(np.float64) for s in val}
        else:
            # A full reduction: the sides' JVPs differ by exactly sum((value_t - value_j) * t)
            # over the kinks; with every element on a kink each JVP is known outright.
            tk = ev.vectors.t[k].astype(np.float64)
            offset = {s: float(np.sum((val[s] * tk)[mask])) for s in val}
            path, where = "out[0]", np.ones((), bool)
            if mask.all():
                got = {"torch": t[0], "jax": j[0]}
                want = {s: np.asarray(offset[s]) for s in val}
            else:
                sub = compare(np.asarray(t[0], np.float64) - offset["torch"],
                              np.asarray(j[0], np.float64) - offset["jax"], tol)
                masks[path] = np.ones((), bool)
                if not sub.ok:
                    sub.message = f"away from the kinks ({conv.name}): {sub.message}"
                return None if sub.ok else sub
    for side in ("torch", "jax"):
        g = np.asarray(got[side], np.float64)[where]
        w = np.broadcast_to(np.asarray(want[side], np.float64), np.shape(got[side]))[where]
        same_nan = np.isnan(g) == np.isnan(w)
        close = np.isnan(g) | (np.abs(g - w) <= tol.atol + tol.rtol * np.abs(w))
        if not (same_nan.all() and close.all()):
            i = int(np.argmin(same_nan & close))
            return Verdict(
                False, "convention",
                f"{path}: at {conv.name} the {side} side gives {g.flat[i]:.9g} where its documented convention "
                f"gives {w.flat[i]:.9g} ({conv.doc})",
                ratio=float("inf"), side=side,
            )
    masks[path] = masks.get(path, False) | where
    return None


def leaf_at(tree: Any, path: str) -> np.ndarray | None:
    """The leaf of `tree` at `path`, in float64; None where there is none."""
    for p, leaf in flatten(tree):
        if p == path:
            return np.asarray(leaf, dtype=np.float64)
    return None


def widen(args: Sequence[Any], ev: Evaluation) -> tuple[list[Any], Vectors]:
    """The example's inputs and vectors, exactly, in float64."""
    up = lambda x: x.astype(np.float64) if _floating(x) else x  # noqa: E731
    vec64 = Vectors(*[[v.astype(np.float64) for v in vs] for vs in (ev.vectors.ct, ev.vectors.t, ev.vectors.v)])
    return [up(a) for a in args], vec64
