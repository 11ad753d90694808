"""equivcheck: prove that PyTorch and JAX compute the same thing.

The public API, re-exported explicitly. Names load on first use (PEP 562), so importing
the package - which pytest does for the plugin at every start - pulls in neither torch,
jax, numpy nor Hypothesis.

The tree reads as the flow of a check:

  ops, models, optim, data   the check kinds: what runs on each side, drawn by Hypothesis
  backends                   both sides: placement, precision, NumPy round trip, compiled programs
  engine                     compare, tolerance table, the Hypothesis loop, records, CheckKind
  references, layers         float64 references that arbitrate; layers on the JAX side and their traps
  weights, checkpoints       state_dict <-> JAX trees; checkpoint files across formats
  report                     JSON, Markdown, terminal table, run comparison
  plugin, fixture            pytest's hooks and options; the `equiv` fixture
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "equivcheck.ops": ("CHECKS", "Convention", "Pair", "Registry", "run_pair", "Broadcast", "Custom", "Fixed", "Floats",
                       "Index", "Inputs", "Ints", "Lengths", "Mask", "MatMul", "Matrices", "Same", "Square", "Static", "binary",
                       "unary"),
    "equivcheck.engine": ("DTYPES", "CheckKind", "CheckRecord", "KnownDivergences", "RunSettings", "Tolerance"),
    "equivcheck.data": ("DataCheck",),
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
    from equivcheck.data import DataCheck  # noqa: F401
    from equivcheck.engine import (  # noqa: F401
        DTYPES,
        CheckKind,
        CheckRecord,
        KnownDivergences,
        RunSettings,
        Tolerance,
    )
    from equivcheck.ops import (  # noqa: F401
        CHECKS,
        Broadcast,
        Convention,
        Custom,
        Fixed,
        Floats,
        Index,
        Inputs,
        Ints,
        Lengths,
        Mask,
        MatMul,
        Matrices,
        Pair,
        Registry,
        Same,
        Square,
        Static,
        binary,
        run_pair,
        unary,
    )
