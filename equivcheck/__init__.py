"""equivcheck: prove that PyTorch and JAX compute the same thing.

The public API, re-exported explicitly. Names load on first use (PEP 562), so importing
the package - which pytest does for the plugin at every start - pulls in neither torch,
jax, numpy nor Hypothesis.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "equivcheck.pairs": ("CHECKS", "DTYPES", "Convention", "Pair", "Registry"),
    "equivcheck.runner": ("CheckRecord", "RunSettings", "run_pair"),
    "equivcheck.strategies": ("Broadcast", "Custom", "Fixed", "Floats", "Index", "Inputs", "Ints", "Mask",
                              "MatMul", "Matrices", "Same", "Square", "Static", "binary", "unary"),
    "equivcheck.tolerance": ("Tolerance",),
    "equivcheck.knowns": ("KnownDivergences",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'equivcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static tools see the real names
    from equivcheck.knowns import KnownDivergences
    from equivcheck.pairs import CHECKS, DTYPES, Convention, Pair, Registry
    from equivcheck.runner import CheckRecord, RunSettings, run_pair
    from equivcheck.strategies import (
        Broadcast, Custom, Fixed, Floats, Index, Inputs, Ints, Mask, Matrices, MatMul, Same, Square, Static, binary,
        unary,
    )
    from equivcheck.tolerance import Tolerance
