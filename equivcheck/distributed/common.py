"""What the distributed checks share: an example's Outcome, `judge` (torch against JAX, each against the
float64 reference, the side that is off named), the MLP's parameters and batch from a seed, the torch <->
JAX parameter layouts (equivcheck.weights' linear rules) and the tolerance lookup.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from equivcheck.distributed import reference as ref
from equivcheck.engine import tolerance
from equivcheck.engine.compare import Verdict, compare, leaves
from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import Tolerance
from equivcheck.weights.convert import to_jax, to_torch

LAYERS = ("l1", "l2")


@dataclasses.dataclass
class Outcome:
    ok: bool
    ratio: float = 0.0
    message: str = ""
    side: str | None = None
    diagnosis: str = ""
    inputs: str = ""
    verdict: Verdict | None = None


class Failed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


NO_REFERENCE = "no float64 reference for a custom job: give reference_job= to name the side"


def worst(v: Verdict, a: str, b: str) -> str:
    """The failing verdict in words, its sides named `a` and `b` (compare calls them torch and jax: a
    comparison of rank 0 with rank 1, or of a side with the reference, says so in its own names)."""
    w = v.worst if v.kind == "values" else None
    if w is None or w.worst_index is None:
        path, sep, rest = v.message.partition(": ")  # the leaf's path may hold any word; relabel after it
        rest = rest if sep else path
        if "gives NaN, the other side" in rest:  # compare's words for the side without the NaN: name it
            rest = rest.replace("the other side", "jax" if "torch gives NaN" in rest else "torch")
        rest = re.sub(r"\b(torch|jax)\b", lambda m: a if m.group(1) == "torch" else b, rest)
        return f"{path}{sep}{rest}" if sep else rest
    return (f"{w.path}{list(w.worst_index)}: {a} {w.torch_value:.9g}, {b} {w.jax_value:.9g} (max abs err "
            f"{w.max_abs:.3g}; {100 * w.frac_bad:.3g}% of elements out of tolerance)")


def judge(t: Any, j: Any, want: Any, tol: Tolerance, what: str, slip: Callable[[str, Any], str]) -> Outcome:
    """torch `t` against jax `j`, and each against the float64 `want`; the side(s) off the reference
    are named, `slip(side, result)` says what kind of mistake their numbers fit. `want` None (a custom
    job without a reference): torch against jax only, and no side named where they differ (NO_REFERENCE).
    Both sides must hold the dtype asked (equivcheck.distributed.results checks it first)."""
    if want is None:
        tj = compare(t, j, tol)
        if tj.ok:
            return Outcome(True, tj.ratio)
        return Outcome(False, tj.ratio, f"{what}: torch and jax differ: {worst(tj, 'torch', 'jax')}; {NO_REFERENCE}",
                       None, NO_REFERENCE, verdict=tj)
    # each side against the reference in its own dtype: a side in another dtype than its peer is not
    # blamed for the other's (the dtype asked is checked where it is known: equivcheck.distributed.results)
    own = lambda tree: ref.cast(want, np.asarray(leaves(tree)[0]).dtype)
    tj, tr, jr = compare(t, j, tol), compare(t, own(t), tol), compare(j, own(j), tol)
    ratio = max(tj.ratio, tr.ratio, jr.ratio)
    if tj.ok and tr.ok and jr.ok:
        return Outcome(True, ratio)
    if not tr.ok and not jr.ok:
        side = "both"
        both_text = "torch and jax agree with each other" if tj.ok else "torch and jax differ too"
        msg = (f"{what}: both sides are off the float64 reference ({both_text}): torch "
               f"{worst(tr, 'torch', 'reference')}; jax {worst(jr, 'jax', 'reference')}")
        diagnosis = "; ".join(s for s in (slip("torch", t), slip("jax", j)) if s)
    elif not tr.ok or not jr.ok:
        side = "torch" if not tr.ok else "jax"
        bad = tr if side == "torch" else jr
        msg = f"{what}: {side} is off the float64 reference: {worst(bad, side, 'reference')}"
        diagnosis = slip(side, t if side == "torch" else j)
    else:
        side, diagnosis = None, "both sides are within the bound of the float64 reference: a rounding difference"
        msg = f"{what}: torch and jax differ: {worst(tj, 'torch', 'jax')}"
    return Outcome(False, ratio, msg, side, diagnosis, verdict=tj if tj.kind != "match" else tr if not tr.ok else jr)


def mlp_example(pair: Any, dtype: str, seed: int, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Torch-layout MLP parameters and a global batch (N * rows, d) / (N * rows, o), from `seed`."""
    d, h, o = pair.sizes
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    params = {"l1.weight": rng.normal(0, d ** -0.5, (h, d)), "l1.bias": rng.normal(0, 0.1, h),
              "l2.weight": rng.normal(0, h ** -0.5, (o, h)), "l2.bias": rng.normal(0, 0.1, o)}
    b = pair.world * rows
    return ({k: v.astype(dt) for k, v in params.items()}, rng.normal(0, 1, (b, d)).astype(dt),
            rng.normal(0, 1, (b, o)).astype(dt))


def to_flax(params: dict[str, np.ndarray]) -> dict[str, Any]:
    """Torch-layout MLP parameters as the JAX side's tree, through equivcheck's weight conversion."""
    return {layer: to_jax("linear", {"weight": params[f"{layer}.weight"], "bias": params[f"{layer}.bias"]})
            for layer in LAYERS}


def from_flax(tree: dict[str, Any]) -> dict[str, np.ndarray]:
    return {f"{layer}.{k}": np.asarray(v) for layer in LAYERS for k, v in to_torch("linear", tree[layer]).items()}


def tolerance_for(pair: Any, dtype: str, run: RunSettings, check: str) -> Tolerance:
    return tolerance.lookup(dtype, device=run.device, precision=run.precision, check=check, override=pair.tolerance)





def custom_model(pair: Any) -> bool:
    """Whether `pair` runs a model job of the user's own on either side (the built-in MLP's float64
    reference then says nothing: equivcheck.distributed.runner uses `reference_job`, or none)."""
    return pair.job in (ref.MLP, ref.FSDP_MLP) and bool(pair.torch_job or pair.jax_job)


def reference_function(pair: Any) -> Any:
    """`pair.reference_job` as a callable ("module:function" imported here, in the parent). Raises
    ImportError / AttributeError where it does not resolve."""
    if callable(pair.reference_job):
        return pair.reference_job
    module, _, attr = pair.reference_job.partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["LAYERS", "NO_REFERENCE", "Failed", "Outcome", "custom_model", "from_flax", "judge", "mlp_example",
           "reference_function", "to_flax", "tolerance_for", "worst"]
