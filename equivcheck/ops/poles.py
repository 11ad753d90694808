"""Values that are not finite on one side only, and poles: when a NaN or an infinity names a side.

A NaN or inf on one side where the other side's value is finite and in range, in float64 too,
names the non-finite side (`lone_nonfinite`): a representable answer exists and the other side
computes it. Unless that side's own float64 forward grows without bound approaching the input
(`pole`, `forward_pole`: 1/x or log at 0), where its infinity may be the answer, rounded.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import Verdict
from equivcheck.ops.autodiff import leaf_at
from equivcheck.ops.conditioning import largest
from equivcheck.ops.finite import forward64

__all__ = ["POLE_STEPS", "forward_pole", "lone_nonfinite", "pole"]


def lone_nonfinite(verdict: Verdict, t: np.ndarray, j: np.ndarray, t64: np.ndarray, j64: np.ndarray,
                    dtype: str) -> tuple[str, str] | None:
    """(side, why) where one side alone is not finite (NaN, +inf or -inf alike) and the other
    side's value is finite both in the tested dtype and in float64, within the dtype's range:
    a representable answer exists and the other side computes it, and a value that is not
    finite on one side only is rarely the right answer. None where that does not hold at every
    element whose finiteness differs (both sides not finite, each side at some, the other side
    not finite or out of range in float64, or the non-finite side's own float64 answer out of
    range: then its inf is that answer, rounded)."""
    if verdict.kind != "nonfinite":
        return None
    with np.errstate(invalid="ignore"):
        ft, fj = np.isfinite(t), np.isfinite(j)
        if np.any(~ft & ~fj & ~((t == j) | (np.isnan(t) & np.isnan(j)))):
            return None  # inf against -inf, NaN against inf: no side is the finite one
        lone_t, lone_j = ~ft & fj, ft & ~fj
        if lone_t.any() == lone_j.any():
            return None
        side, other, o, o64, s64, where = (("torch", "jax", j, j64, t64, lone_t) if lone_t.any()
                                           else ("jax", "torch", t, t64, j64, lone_j))
        top = largest(dtype)
        if not np.all(np.isfinite(o64[where]) & (np.abs(o64[where]) <= top)):
            return None
        if np.any(np.isfinite(s64[where]) & (np.abs(s64[where]) > top)):
            return None  # its own float64 answer is beyond the dtype: its inf is that answer, rounded
    at = tuple(int(i) for i in np.argwhere(where)[0]) if where.ndim else ()
    bad = (t if side == "torch" else j)[at]
    n = int(np.count_nonzero(where))
    return side, (f"{side} gives {float(bad)} at {verdict.path}{list(at) if at else ''}"
                  f"{f' (and {n - 1} more)' if n > 1 else ''} where {other} gives {float(o[at]):.9g} "
                  f"({float(o64[at]):.9g} in float64, within {dtype}'s range): a finite answer exists and {other} "
                  f"computes it, and a value that is not finite on one side only is rarely the right one: "
                  f"{side} is off")


POLE_STEPS = (1e-4, 1e-6, 1e-8)  # relative nudges of the input, approaching the failing point


def pole(pair: Any, args64: Sequence[Any], vec64: Any, side: str, path: str, s64: np.ndarray) -> str:
    """Why an infinity on one side alone may be the answer, or "": approaching the input, that
    side's own float64 forward grows without bound at the element (1/x at 0, log at 0: each step
    closer adds at least half of what the last one did), so the point is a pole and what a side
    gives there is a convention, not an error of one side. A side whose values settle to a finite
    limit nearby has no such excuse."""
    at = _infinite_at(s64)
    if at is None:
        return ""
    near = _approach(pair, args64, vec64, side,
                     lambda leaves: float(np.asarray(leaves[0] if len(leaves) == 1 else leaf_at(leaves, path))[at]))
    if near is None:
        return ""
    return (f"{side} gives {float(s64[at])} at {path}{list(at) if at else ''}, and its own float64 values approaching "
            f"the input grow without bound ({', '.join(f'{v:.3g}' for v in near)} at relative steps "
            f"{', '.join(f'{h:g}' for h in POLE_STEPS)}): a pole, where the infinity may be the answer and a finite "
            f"value a clamp; no side is named: give the Pair a float64 `reference` (or a Convention) that says "
            f"which value the pole takes")


def _approach(pair: Any, args64: Sequence[Any], vec64: Any, side: str, read: Any) -> list[float] | None:
    """`side`'s float64 forward, read by `read(leaves)`, at the inputs moved by POLE_STEPS towards
    the example; those values where they grow without bound (a pole), else None."""
    f = forward64(pair, args64, side, vec64)
    primals = [np.asarray(args64[i], np.float64) for i in pair.diff_args]
    try:
        near = [read(f([p * (1 + h) + h * (p == 0) for p in primals])) for h in POLE_STEPS]
    except Exception:  # noqa: BLE001 - no evidence of a pole: the lone-value rule stands
        return None
    size = np.abs(near)
    if not (np.all(np.isfinite(size)) and size[0] < size[1] < size[2] and size[2] - size[1] >= (size[1] - size[0]) / 2):
        return None
    return near


def forward_pole(pair: Any, args64: Sequence[Any], vec64: Any, side: str) -> bool:
    """Whether `side`'s float64 forward is infinite at the example at a pole (`_pole`'s test): a
    forward that is NaN, or infinite without growing towards it (a constant inf), is no pole."""
    try:
        leaves = forward64(pair, args64, side, vec64)([np.asarray(args64[i], np.float64) for i in pair.diff_args])
    except Exception:  # noqa: BLE001 - no evidence either way: the lone-value rule stands
        return False
    for k, leaf in enumerate(leaves):
        at = _infinite_at(leaf)
        if at is not None and _approach(pair, args64, vec64, side, lambda ls, k=k, at=at: float(np.asarray(ls[k])[at])):
            return True
    return False


def _infinite_at(leaf: np.ndarray) -> tuple[int, ...] | None:
    """The first non-finite element's index where every non-finite element is infinite (a
    candidate pole), else None: a NaN is no pole."""
    bad = ~np.isfinite(leaf)
    if not bad.any() or np.isnan(leaf[bad]).any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0]) if leaf.ndim else ()


# Formats a side may quietly compute in: the name, its unit roundoff, and whether a value lies on
# its grid (TF32 keeps float32's range with a 10-bit mantissa: the low 13 bits are zero).
