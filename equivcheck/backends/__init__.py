"""One module per framework. Both take NumPy in and give NumPy out, so the engine never
touches a tensor, and both report errors per check instead of raising them.

The framework modules are imported lazily (`equivcheck.backends.torch_side()`), which keeps
`pytest --help` and the report tools fast.

results  SideResult, SideError, Vectors: what a side gives back for one example
deadline the per-call time limit of a side (--equiv-timeout): SideTimeout, with the stuck side's stack
torch    placement, precision mode, NumPy round trip, eager derivatives
jax      placement, precision mode, one jitted program per pair and shape, background compilation
worker   the background compile thread, and the process's exit while it still compiles
"""
from __future__ import annotations

from typing import Any

from equivcheck.backends.results import DEVICES, CotangentMismatch, SideError, SideResult, Vectors, shapes_text

__all__ = ["DEVICES", "CotangentMismatch", "SideError", "SideResult", "Vectors", "jax_side", "shapes_text",
           "torch_side"]


def torch_side() -> Any:
    from equivcheck.backends import torch as mod

    return mod


def jax_side() -> Any:
    from equivcheck.backends import jax as mod

    return mod
