"""The port's side of a model check: `tap` (a layer's output, the `sow` of a pure function),
`dropout` (the mask torch drew) and `capturing` (the context a check runs the port in)."""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["capturing", "dropout", "first_array", "tap"]


class _Context(threading.local):
    def __init__(self) -> None:
        self.stack: list[_Capture] = []


@dataclasses.dataclass
class _Capture:
    taps: dict[str, Any] | None  # None: not recording
    masks: Mapping[str, Any]


_CTX = _Context()


@contextlib.contextmanager
def capturing(masks: Mapping[str, Any] | None = None, record: bool = False) -> Iterator[_Capture]:
    """While the port runs (traced or eager): its dropout masks, and its taps if `record`."""
    cap = _Capture({} if record else None, masks or {})
    _CTX.stack.append(cap)
    try:
        yield cap
    finally:
        _CTX.stack.pop()


def first_array(value: Any) -> Any:
    """A module's output as compared layer by layer: tuples and lists unwrapped from the front
    until an array (nn.MultiheadAttention and Hugging Face attention layers give (output,
    weights), nn.GRU (output, h_n)). The one rule for both sides: torch's hooked outputs and
    the port's taps, so a layer returning a tuple compares its first array on each side.
    Returns `value` itself when it is not a tuple or list (None for an empty one)."""
    while isinstance(value, (tuple, list)):
        if not value:
            return None
        value = value[0]
    return value


def tap(name: str, value: Any, to_torch: Callable[[Any], Any] | None = None) -> Any:
    """Mark `value` as the output of the torch module `name` (the port's `sow`); returns it.
    `to_torch` converts it to torch's layout (equivcheck.weights.convert.channels_first for NHWC)."""
    if _CTX.stack and _CTX.stack[-1].taps is not None:
        _CTX.stack[-1].taps[name] = to_torch(value) if to_torch is not None else value
    return value


def dropout(name: str, x: Any, rate: float, train: bool, from_torch: Callable[[Any], Any] | None = None) -> Any:
    """Inverted dropout with the mask torch's nn.Dropout `name` drew (in torch's layout;
    `from_torch` converts it to the port's). Identity unless `train`."""
    if not train or rate == 0.0:
        return x
    import jax.numpy as jnp

    masks = _CTX.stack[-1].masks if _CTX.stack else {}
    if name not in masks:
        raise KeyError(f"dropout {name!r}: no torch nn.Dropout of that name drew a mask (known: {sorted(masks)}); "
                       "name the port's dropout after the torch module")
    keep = masks[name] if from_torch is None else from_torch(masks[name])
    if tuple(keep.shape) != tuple(x.shape):
        raise ValueError(f"dropout {name!r}: torch's mask has shape {tuple(keep.shape)}, the port's activation "
                         f"{tuple(x.shape)}: pass from_torch to convert the layout")
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
