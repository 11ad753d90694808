"""Walking a jaxpr equation by equation: what the interpreters of `equivcheck.models.trace`
(every value of a port) and `equivcheck.ops.emulate` (XLA's per-primitive rounding) share."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["CALLS", "call_body"]

# Call-like primitives whose body is a jaxpr taking the equation's operands one for one: their
# inner equations are the user's own code (a jitted helper, a custom_vjp activation, remat).
CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                   "custom_vjp_call_jaxpr", "checkpoint", "remat"})


def call_body(eqn: Any, operands: int) -> tuple[Any, Sequence[Any]] | None:
    """(jaxpr, consts) of a call-like equation taking its `operands` one for one, else None."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    if eqn.primitive.name not in CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr) and len(sub.jaxpr.invars) == operands:
            return sub.jaxpr, sub.consts
        if isinstance(sub, Jaxpr) and not sub.constvars and len(sub.invars) == operands:
            return sub, ()
    return None
