"""XLA's low-precision arithmetic, emulated: a function's float32 program with every primitive's
result rounded to bfloat16 or float16.

In bfloat16/float16 XLA rounds each primitive of a composite op or derivative to the dtype, and
torch's kernels compute in float32 and round once per kernel. How far that moves an answer
depends on the function and the input (a softmax VJP subtracts two nearly equal terms rounded
at the larger one's scale: 38 bfloat16 ulps of the result, measured on the built-in suite),
so no fixed number of ulps separates it from a wrong low-precision formula (tanh x 1.2 in
bfloat16 only: 26 ulps). The float32 program both sides agree on, run with each primitive's
float result rounded by `lax.reduce_precision` (XLA keeps such a rounding, where it may drop
a pair of converts), shows how far that arithmetic moves this answer on this input.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from equivcheck.backends.jaxpr import call_body

__all__ = ["BITS", "rounded_each_primitive"]

# (exponent bits, mantissa bits) of the emulated dtype: IEEE 754 binary16, and bfloat16
# (Google's brain float: float32's exponent, 7 stored mantissa bits).
BITS = {"bfloat16": (8, 7), "float16": (5, 10)}


def rounded_each_primitive(fn: Callable[..., Any], args: Sequence[Any], dtype: str) -> Any:
    """`fn(*args)` (float32 arrays in, a pytree of arrays out) with every primitive run by XLA in
    `dtype` ("bfloat16" or "float16") on its operands rounded to it, its result back in float32
    (a primitive whose parameters fix its types, a loop or a branch, runs in float32 and its
    result is rounded); the
    equations of jit, custom_jvp/custom_vjp and remat calls are rounded one by one, loops and
    branches by their outputs. Returns NumPy arrays in the structure `fn` returns. Raises
    KeyError for another dtype, and what tracing or running `fn` raises."""
    import jax
    from jax import lax
    from jax.extend.core import Literal

    exponent, mantissa = BITS[dtype]
    low = jax.numpy.dtype(dtype)

    def floating(x: Any) -> bool:
        return jax.dtypes.issubdtype(getattr(x, "dtype", np.int32), np.floating)

    def rounded(x: Any) -> Any:
        return lax.reduce_precision(x, exponent_bits=exponent, mantissa_bits=mantissa) if floating(x) else x

    def bind(eqn: Any, ins: list[Any]) -> list[Any]:
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            try:  # XLA's own kernel in the dtype: it may expand a primitive (logistic) into several roundings
                outs = eqn.primitive.bind(*[x.astype(low) if floating(x) else x for x in ins], **params)
                outs = outs if eqn.primitive.multiple_results else [outs]
                return [o.astype(np.float32) if floating(o) else o for o in outs]
            except Exception:  # noqa: BLE001 - typed parameters (a loop's body): float32, rounded once
                outs = eqn.primitive.bind(*ins, **params)
                return [rounded(o) for o in (outs if eqn.primitive.multiple_results else [outs])]

    def run(jaxpr: Any, consts: Sequence[Any], operands: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, operands))
        read = lambda v: v.val if isinstance(v, Literal) else env[v]
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            body = call_body(eqn, len(ins))
            if body is not None:
                outs = run(body[0], body[1], ins)
            else:
                outs = [rounded(o) for o in bind(eqn, ins)]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = jax.jit(lambda *xs: run(closed.jaxpr, closed.consts, xs))(*jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), [np.asarray(x) for x in flat])


def torch_rounding(dtype: str) -> Any:
    """A context in which every torch operator's floating result (forward and autograd's backward
    alike) is rounded to `dtype` and kept in its own dtype: torch's float32 program run as its
    low-precision kernels round, once per operator. Raises KeyError for another dtype."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    class _Rounding(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            return torch.utils._pytree.tree_map(
                lambda t: t.to(low).to(t.dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t,
                out)

    return _Rounding()
