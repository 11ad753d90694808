"""Which side is off when the two results differ in form rather than value: a shape the pair's
reference decides, a dtype other than the run's, or None where the other side returned arrays
(equivcheck.ops.diagnose hands these here)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import Verdict, flatten
from equivcheck.ops.autodiff import Evaluation, keyed, leaf_at, widen
from equivcheck.ops.finite import as_tree

__all__ = ["odd_type", "shape_by_reference"]


def odd_type(pair: Any, check: str, ev: Evaluation, verdict: Verdict, dtype: str) -> None:
    """A side that returned None where the other returned arrays, or a floating dtype other than the
    run's where the other side's is the run's (bfloat16, complex64, float32 in a float64 run), is
    off: the inputs of both sides are of the run's dtype."""
    def has_none(tree: Any) -> bool:
        if isinstance(tree, dict):
            return any(has_none(v) for v in tree.values())
        if isinstance(tree, (list, tuple)):
            return any(has_none(v) for v in tree)
        return tree is None

    results = {r.side: r.values[check] for r in (ev.torch, ev.jax) if check in r.values}
    if verdict.kind == "structure":
        nones = [side for side, tree in results.items() if has_none(tree)]
        if len(nones) == 1 and len(results) == 2:
            verdict.side = nones[0]
            verdict.diagnosis = f"the {nones[0]} side returned None where the other returned arrays (a missing return?)"
        return
    if verdict.path is None or len(results) != 2:
        return
    kinds = {side: np.asarray(leaf).dtype for side, tree in results.items()
             for p, leaf in flatten(keyed(pair, check, tree)) if p == verdict.path}
    if len(kinds) != 2 or not all(k.kind in "fc" or k.name == "bfloat16" for k in kinds.values()):
        return
    off = [side for side, k in kinds.items() if k.name != dtype]
    if len(off) == 1:
        verdict.side = off[0]
        verdict.diagnosis = (f"{off[0]} returns {kinds[off[0]].name} at {verdict.path} where the inputs, and the other "
                             f"side's output, are {dtype}: a cast in {off[0]}'s code, or it computes in another "
                             f"precision")


def shape_by_reference(pair: Any, args: Sequence[Any], ev: Evaluation, verdict: Verdict) -> None:
    """Forward leaves of different shapes: the pair's reference, where it has one, gives the
    shape, and the one side whose shape differs from it is named (logsumexp over the wrong axis
    of a square batch). Without a reference, or where both or neither match it, no side."""
    if pair.reference is None:
        return
    path = verdict.path
    t, j = (leaf_at(keyed(pair, "forward", r.values["forward"]), path) if "forward" in r.values else None
            for r in (ev.torch, ev.jax))
    try:
        ref = leaf_at(as_tree(pair.reference(*widen(args, ev)[0])), path)
    except Exception:  # noqa: BLE001 - advice only: the shape failure stands, undecided
        return
    if t is None or j is None or ref is None:
        return
    want, shapes = list(np.shape(ref)), {"torch": list(np.shape(t)), "jax": list(np.shape(j))}
    off = [side for side, shape in shapes.items() if shape != want]
    if len(off) == 1:
        verdict.side = off[0]
        verdict.diagnosis = (f"the pair's NumPy reference gives shape {want} at {path}: {off[0]} (shape "
                             f"{shapes[off[0]]}) is off")
