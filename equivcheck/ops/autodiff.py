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

from equivcheck.backends import SideResult, Vectors, jax_side, torch_side
from equivcheck.engine.compare import Verdict, compare, is_float
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


def wide(pair: Pair, dtype: str) -> bool:
    """Whether the JAX side needs 64-bit types switched on for this check."""
    return dtype == "float64" or "needs-x64" in pair.tags


def make_vectors(seed: int, out_leaves: Sequence[np.ndarray], primals: Sequence[np.ndarray]) -> Vectors:
    ct = [tangent_like(seed + i, [leaf], str(leaf.dtype))[0] for i, leaf in enumerate(out_leaves)]
    t = [tangent_like(seed + 1000 + i, [p], str(p.dtype))[0] for i, p in enumerate(primals)]
    v = [tangent_like(seed + 2000 + i, [p], str(p.dtype))[0] for i, p in enumerate(primals)]
    return Vectors(ct, t, v)


def check_diff_args(pair: Pair, args: Sequence[Any]) -> None:
    for i in pair.diff_args:
        if not (isinstance(args[i], np.ndarray) and is_float(args[i])):
            kind = type(args[i]).__name__ if not isinstance(args[i], np.ndarray) else str(args[i].dtype)
            raise TypeError(f"pair {pair.name!r}: diff_args names argument {i}, which is drawn as {kind}, not floating")


def evaluate(pair: Pair, args: Sequence[Any], seed: int, *, dtype: str, device: str, checks: Sequence[str],
             vectors: Vectors | None = None) -> Evaluation:
    """Run `checks` on both sides. `vectors` pins the cotangents etc. (float64 re-runs)."""
    check_diff_args(pair, args)
    primals = [args[i] for i in pair.diff_args]
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
    """One check of one example: errors first, then conventions, then values."""
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
    return verdict


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
    out = ev.torch.values.get("forward")
    out_leaves = [np.asarray(o) for o in (out if isinstance(out, list) else [out]) if is_float(o)]
    if len(out_leaves) != 1:
        raise ValueError(f"pair {pair.name!r}: convention {conv.name!r} needs exactly one floating output")
    out_shape = out_leaves[0].shape
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
