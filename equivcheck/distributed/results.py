"""What a job returned, checked before any comparison: a malformed result is the returning side's fault.

A job of the user's own (`torch_job=` / `jax_job=` / `reference_job=`) may return anything. Comparing
whatever came back would crash in the runner (a KeyError, a TypeError: no side named, no record) or,
worse, pass: one parameter snapshot where three steps were asked compares one step and says nothing of
the others. So each result is checked against what the check asked for (the keys, the structure, each
array's shape and dtype, one snapshot per SGD step) and a mismatch raises `BadResult` naming the side,
the job and what was expected; the runner files it as a failed record of that side.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.distributed.common import LAYERS, from_flax

Shapes = dict[str, tuple[int, ...]]


class BadResult(Exception):
    """A job's result is not what the check needs. `side`: "torch", "jax" or "reference"; `kind`:
    "structure", "shape" or "dtype" (the record's kind); str(self): the side, job and what was expected."""

    def __init__(self, side: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.side, self.kind, self.message = side, kind, message


def _got(value: Any) -> str:
    """A short description of what came back."""
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, np.ndarray):
        return f"an array {list(value.shape)} {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def array(who: str, what: str, value: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """`value` as an array of `shape` and `dtype`. Raises BadResult: not an array, another shape, another dtype
    (the dtype asked is `dtype`: the side that returned another is the one off, whatever the other side did)."""
    if value is None or isinstance(value, (Mapping, str)) or (
            isinstance(value, (list, tuple)) and not all(np.isscalar(v) or isinstance(v, (list, tuple)) for v in value)):
        raise BadResult(who.split()[1], "structure", f"{who} returned {_got(value)} as {what}, expected an array "
                                                      f"{list(shape)} {dtype}")
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nested lists
        raise BadResult(who.split()[1], "structure", f"{who} returned {_got(value)} as {what} that is no array, "
                                                      f"expected an array {list(shape)} {dtype}") from None
    if arr.shape != tuple(shape):
        raise BadResult(who.split()[1], "shape", f"{who} returned {what} of shape {list(arr.shape)}, expected "
                                                  f"{list(shape)} {dtype}")
    if arr.dtype != np.dtype(dtype):
        raise BadResult(who.split()[1], "dtype", f"{who} returned {what} in {arr.dtype}, expected {dtype}")
    return arr


def tree(who: str, what: str, value: Any, shapes: Shapes, dtype: str) -> dict[str, np.ndarray]:
    """`value` as a dict with exactly the keys of `shapes`, each an array of that shape in `dtype`."""
    if not isinstance(value, Mapping):
        raise BadResult(who.split()[1], "structure", f"{who} returned {_got(value)} as {what}, expected a dict "
                                                      f"with keys {sorted(shapes)}")
    missing, extra = sorted(set(shapes) - set(value)), sorted(set(map(str, value)) - set(shapes))
    if missing or extra:
        raise BadResult(who.split()[1], "structure",
                        f"{who} returned {what} with keys {sorted(map(str, value))}, expected {sorted(shapes)}"
                        + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
    return {k: array(who, f"{what}[{k!r}]", value[k], s, dtype) for k, s in shapes.items()}


def flax_tree(who: str, what: str, value: Any, shapes: Shapes, dtype: str) -> dict[str, np.ndarray]:
    """A JAX job's Flax-layout tree {"l1": {"kernel", "bias"}, "l2": ...} as torch-layout arrays (checked)."""
    want = {layer: ["bias", "kernel"] for layer in LAYERS}
    if not isinstance(value, Mapping) or sorted(map(str, value)) != list(LAYERS) or not all(
            isinstance(value[layer], Mapping) and sorted(map(str, value[layer])) == want[layer] for layer in LAYERS):
        raise BadResult(who.split()[1], "structure", f"{who} returned {_got(value)} as {what}, expected the Flax "
                                                      "layout {'l1': {'kernel', 'bias'}, 'l2': {'kernel', 'bias'}}")
    # each leaf checked in the layout the job returned (kernel (in, out) = torch's weight transposed), so the
    # message names the job's own leaf
    for layer in LAYERS:
        array(who, f"{what}[{layer!r}]['kernel']", value[layer]["kernel"], shapes[f"{layer}.weight"][::-1], dtype)
        array(who, f"{what}[{layer!r}]['bias']", value[layer]["bias"], shapes[f"{layer}.bias"], dtype)
    return from_flax(value)


def mlp(who: str, value: Any, shapes: Shapes, dtype: str, steps: int, flax: bool) -> dict[str, Any]:
    """A model job's result {"grads": tree, "params": [tree after each of `steps` SGD steps]}, checked
    (`flax`: the trees in JAX's layout) and in torch's layout. With steps 0 (the grads check) the snapshots
    are not read, so not checked. Raises BadResult: another structure, a tree's keys, shapes or dtypes, or a
    snapshot count other than `steps` (fewer snapshots compared would pass the steps never taken)."""
    if not isinstance(value, Mapping) or not {"grads", "params"} <= set(value):
        raise BadResult(who.split()[1], "structure",
                        f"{who} returned {_got(value)}, expected a dict with keys 'grads' and 'params'")
    read = flax_tree if flax else tree
    grads = read(who, "'grads'", value["grads"], shapes, dtype)
    trail = value["params"]
    if not steps:
        return {**value, "grads": grads, "params": []}
    if not isinstance(trail, Sequence) or isinstance(trail, (str, Mapping)):
        raise BadResult(who.split()[1], "structure", f"{who} returned {_got(trail)} as 'params', expected a list "
                                                      f"of {steps} parameter snapshots (one per SGD step)")
    if len(trail) != steps:
        raise BadResult(who.split()[1], "structure",
                        f"{who} returned {len(trail)} parameter snapshot{'s' * (len(trail) != 1)}, {steps} steps "
                        "were asked (one snapshot after each SGD step)")
    return {**value, "grads": grads,
            "params": [read(who, f"'params'[{k}]", p, shapes, dtype) for k, p in enumerate(trail)]}


__all__ = ["BadResult", "array", "flax_tree", "mlp", "tree"]
