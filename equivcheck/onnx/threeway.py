"""Three implementations compared pairwise, and which one is off.

torch, ONNX Runtime and the JAX port each give an output tree for the same inputs; every pair is
compared by the engine's `compare` under the same tolerance (from the table). The side that is off
is the one that disagrees with both others while those two agree (two witnesses against one).
When that does not decide (all three disagree, or only one pair does), torch's float64 forward on
the same inputs is the reference: the sides past the tolerance against it are named, else the one
furthest from it. When all three disagree the verdict says so and ranks the three by their distance
from the reference, nearest first (`ranking`); every side past the tolerance is named, all three
when all are. NumPy trees only; no framework is imported here.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import Verdict, compare, flatten
from equivcheck.engine.tolerance import Tolerance

__all__ = ["PAIRS", "SIDES", "ThreeWay", "relabel", "summary", "three_way", "two_way"]

SIDES = ("torch", "onnx", "jax")
# compare() words its messages as "torch ... jax"; each pair renames the side that is not one of those
PAIRS = (("torch", "onnx"), ("torch", "jax"), ("onnx", "jax"))


@dataclasses.dataclass
class ThreeWay:
    """The outcome: ok, the side(s) off ("torch" | "onnx" | "jax", "+"-joined when several), the
    pairwise verdicts keyed "a-b", the worst ratio (error / allowed) over the three pairs, a
    message naming the disagreeing pairs and how the side was decided, and, where the float64
    reference decided, every side's largest distance from it, nearest first."""

    ok: bool
    side: str | None
    verdicts: dict[str, Verdict]
    ratio: float
    message: str = ""
    how: str = ""
    ranking: list[tuple[str, float]] = dataclasses.field(default_factory=list)


def relabel(text: str, a: str, b: str) -> str:
    """compare()'s message for the pair (a, b), its sides named a and b instead of torch and jax."""
    if (a, b) == ("torch", "onnx"):
        return re.sub(r"\bjax\b", "onnx", text)
    if (a, b) == ("onnx", "jax"):
        # not "torch.testing", the tolerance's reason quoted in the message (it read "onnx.testing")
        return re.sub(r"\btorch\b(?!\.)", "onnx", text)
    return text


def _pair_text(v: Verdict, a: str, b: str) -> str:
    """"a vs b: " and compare()'s message, with the worst element's values and errors where values
    differ: the message alone says only that they differ beyond the bound, not by how much."""
    text = f"{a} vs {b}: {relabel(v.message, a, b)}"
    worst = v.worst if v.kind == "values" else None
    return f"{text} ({relabel(worst.summary(), a, b)})" if worst is not None else text


def _distance(tree: Any, ref: Any) -> float:
    """The largest |x - ref| over the leaves (inf where shapes or finiteness differ)."""
    worst = 0.0
    for (_, x), (_, r) in zip(flatten(tree), flatten(ref)):
        x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
        if x.shape != r.shape:
            return float("inf")
        d = np.abs(x - r)
        worst = max(worst, float(np.max(np.where(np.isnan(d), np.inf, d), initial=0.0)))
    return worst


def three_way(outs: Mapping[str, Any], tol: Tolerance, reference: Callable[[], Any] | None = None) -> ThreeWay:
    """Compare outs["torch"], outs["onnx"], outs["jax"] (NumPy trees of one structure) pairwise under
    `tol`. `reference()`: torch's float64 output on the same inputs, called only when two witnesses
    against one do not decide (it costs a float64 model run). Raises KeyError if a side is missing."""
    verdicts = {f"{a}-{b}": compare(outs[a], outs[b], tol) for a, b in PAIRS}
    ratio = max(v.ratio if v.kind in ("match", "values") else float("inf") for v in verdicts.values())
    bad = [(a, b) for a, b in PAIRS if not verdicts[f"{a}-{b}"].ok]
    if not bad:
        return ThreeWay(True, None, verdicts, ratio)
    message = "; ".join(_pair_text(verdicts[f"{a}-{b}"], a, b) for a, b in bad)
    # the side in both failing pairs, when the third pair (the two others) agrees
    if len(bad) == 2:
        (odd,) = set(bad[0]) & set(bad[1])
        return ThreeWay(False, odd, verdicts, ratio, message,
                        f"{odd} disagrees with both others, which agree with each other")
    if reference is None:
        return ThreeWay(False, None, verdicts, ratio, message, "undecided: no float64 reference")
    try:
        ref = reference()
    except Exception as exc:  # noqa: BLE001 - no reference leaves the failure standing, undecided
        return ThreeWay(False, None, verdicts, ratio, message,
                        f"undecided: torch's float64 reference raised {type(exc).__name__}: {exc}")
    everyone = len(bad) == 3
    off, ranking = _against({s: outs[s] for s in SIDES}, ref, tol, name_all=everyone)
    within = [s for s, _ in ranking if s not in off]
    if everyone:
        how = ("all three disagree; ranked against torch's float64 forward, nearest first: "
               + ", ".join(f"{s} {d:.3g}{' (within the bound)' if s in within else ''}" for s, d in ranking)
               + f"; {_are(off)} off")
    else:
        how = (f"one pair disagrees: against torch's float64 forward (largest distance: "
               f"{', '.join(f'{s} {d:.3g}' for s, d in ranking)}), {_are(off)} off")
    return ThreeWay(False, "+".join(off), verdicts, ratio, message, how, ranking)


def _are(sides: list[str]) -> str:
    return f"{' and '.join(sides)} {'is' if len(sides) == 1 else 'are'}"


def _against(outs: Mapping[str, Any], ref: Any, tol: Tolerance,
             name_all: bool = False) -> tuple[list[str], list[tuple[str, float]]]:
    """The sides of `outs` past `tol` against the float64 reference, nearest first (the furthest
    one alone when none are, or when all are and not `name_all`), and every side's largest distance
    from it, nearest first."""
    # in float64, so the reference's own dtype is no finding; the float32 bound is the one the sides face
    wide = {s: [np.asarray(x, np.float64) for _, x in flatten(outs[s])] for s in outs}
    ref = [np.asarray(x, np.float64) for _, x in flatten(ref)]
    dist = {s: _distance(outs[s], ref) for s in outs}
    ranking = sorted(dist.items(), key=lambda kv: kv[1])
    off = [s for s, _ in ranking if not compare(ref, wide[s], tol).ok]
    if not off or (len(off) == len(outs) and not name_all):
        off = [ranking[-1][0]]
    return off, ranking


def two_way(outs: Mapping[str, Any], tol: Tolerance, reference: Callable[[], Any] | None = None) -> ThreeWay:
    """Compare outs["torch"] and outs["onnx"] (no port) under `tol`, as three_way does one pair; when
    they disagree, torch's float64 output (`reference()`) names the side off, as three_way does when
    two witnesses do not decide. The result's verdicts hold the one pair "torch-onnx". Raises KeyError
    if a side is missing."""
    v = compare(outs["torch"], outs["onnx"], tol)
    ratio = v.ratio if v.kind in ("match", "values") else float("inf")
    if v.ok:
        return ThreeWay(True, None, {"torch-onnx": v}, ratio)
    message = _pair_text(v, "torch", "onnx")
    if reference is None:
        return ThreeWay(False, None, {"torch-onnx": v}, ratio, message, "undecided: no float64 reference")
    try:
        ref = reference()
    except Exception as exc:  # noqa: BLE001 - no reference leaves the failure standing, undecided
        return ThreeWay(False, None, {"torch-onnx": v}, ratio, message,
                        f"undecided: torch's float64 reference raised {type(exc).__name__}: {exc}")
    off, ranking = _against({s: outs[s] for s in ("torch", "onnx")}, ref, tol)
    return ThreeWay(False, "+".join(off), {"torch-onnx": v}, ratio, message,
                    f"against torch's float64 forward (largest distance: "
                    f"{', '.join(f'{s} {d:.3g}' for s, d in ranking)}), {_are(off)} off", ranking)


def summary(seen: Sequence[ThreeWay]) -> tuple[float, dict[str, dict[str, float]], float]:
    """Over passing examples' outcomes: the worst ratio, per pair of sides ("torch-onnx", ...) its worst
    ratio and largest absolute difference, and the largest absolute difference of all (0.0 when none)."""
    pairs = {f"{a}-{b}": {"worst_ratio": max((tw.verdicts[f"{a}-{b}"].ratio for tw in seen), default=0.0),
                          "max_abs": max((tw.verdicts[f"{a}-{b}"].worst.max_abs for tw in seen
                                          if tw.verdicts[f"{a}-{b}"].worst), default=0.0)}
             for a, b in PAIRS}
    return (max((tw.ratio for tw in seen), default=0.0), pairs,
            max((p["max_abs"] for p in pairs.values()), default=0.0))
