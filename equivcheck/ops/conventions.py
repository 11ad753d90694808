"""Documented derivatives where a derivative is undefined: the `Convention` record a Pair declares."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Convention:
    """A point where a derivative is undefined and each framework documents its own value.

    At the elements that `where(*args)` marks (a boolean mask over the differentiable
    argument `arg`), each side's derivative must equal its own documented value instead of
    the other side's: the suite checks the documented behaviour rather than passing by luck.
    For an elementwise op the derivative there is `value * cotangent` (VJP) and
    `value * tangent` (JVP); for a full reduction the scalar cotangent is broadcast and the
    tangent summed. A value may be a callable of the arguments (JAX's inf-norm at 0 gives
    1/(2n)). `hvp=(torch, jax)` states the second derivatives of an elementwise op at a kink of
    its first derivative (elu''(0): torch 0, JAX 1); without it, marked points are left out
    of the HVP comparison.
    """

    name: str
    where: Callable[..., Any]
    torch: float | Callable[..., Any]
    jax: float | Callable[..., Any]
    doc: str
    arg: int = 0
    checks: tuple[str, ...] = ("vjp", "jvp")
    hvp: tuple[float, float] | None = None

    def value(self, side: str, args: Any, check: str = "vjp") -> Any:
        if check == "hvp":
            assert self.hvp is not None
            v = self.hvp[0] if side == "torch" else self.hvp[1]
        else:
            v = self.torch if side == "torch" else self.jax
        return v(*args) if callable(v) else v
