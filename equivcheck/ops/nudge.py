"""The minimal example moved off its kink: where a check's failure shrank to a point no side can
be named at (relu6 at 0, where each side picks its own derivative), the same check just left and
right of it, where the function is smooth, can decide. Shrinking and a fresh search both head for
the drawn specials (0 and 6 for relu6), so the mutation benchmark's relu6 derivative mutants were
all left undecided (equivcheck.ops.runner._decide_elsewhere tries these first)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from equivcheck.ops.autodiff import evaluate

__all__ = ["NUDGE", "nudged"]

NUDGE = 1e-3  # relative to max(1, |x|): past a kink's rounding, well inside the smooth pieces around it


def nudged(pair: Any, failure: Any, tol: Any, dtype: str, device: str,
           failure_of: Callable[..., Any]) -> list[Any]:
    """The failures of `failure.check` at the minimal example with every differentiated floating
    argument moved by +NUDGE, then -NUDGE (relative, clipped to its spec's range), with the same
    cotangents and tangents; `failure_of(pair, check, args, ev, tol, dtype)` judges each."""
    found = []
    for sign in (1.0, -1.0):
        args = [_moved(a, spec, sign) if i in pair.diff_args else a
                for i, (a, spec) in enumerate(zip(failure.args, _specs(pair, len(failure.args))))]
        if all(np.array_equal(a, b) for a, b in zip(args, failure.args)):
            continue
        ev = evaluate(pair, args, 0, dtype=dtype, device=device, checks=[failure.check], vectors=failure.ev.vectors)
        other = failure_of(pair, failure.check, args, ev, tol, dtype)
        if other is not None:
            found.append(other)
    return found


def _specs(pair: Any, n: int) -> Sequence[Any]:
    specs = list(getattr(pair.inputs, "args", ()))
    return specs + [None] * (n - len(specs))


def _moved(a: Any, spec: Any, sign: float) -> Any:
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        return a
    wide = a.astype(np.float64)
    moved = wide + sign * NUDGE * np.maximum(1.0, np.abs(wide))
    lo, hi = getattr(spec, "lo", None), getattr(spec, "hi", None)
    if lo is not None and hi is not None:
        moved = np.clip(moved, lo, hi)
    return np.asarray(moved, a.dtype)  # 0-d arithmetic gives a NumPy scalar, not an array
