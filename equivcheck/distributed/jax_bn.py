"""The JAX port of torch_jobs.ddp_bn: Linear -> BatchNorm -> tanh -> Linear, data parallel in shard_map.

The norm is hand-written (flax.linen.BatchNorm updates its running variance with the *biased* batch
variance, torch with the unbiased one: a port through flax's would differ from torch in running_var by
n/(n-1) whatever else it gets right). Its choices, each a keyword of `ddp_bn`:
  sync      False: each device normalises by its own shard's statistics (no axis_name: what plain
            BatchNorm under DDP does); True: mean and E[x^2] pmean-ed over the mesh axis (axis_name=
            "ranks": what SyncBatchNorm does)
  momentum  flax's convention: running = momentum * running + (1 - momentum) * batch; 0.9 is torch's 0.1
  carry     the running statistics carried into the next step: "rank0" (DDP's broadcast_buffers: rank
            0's), "mean" (pmean over devices, flax examples' sync_batch_stats), or a device index
"""
from __future__ import annotations

from typing import Any

import numpy as np

AXIS = "ranks"
EPS = 1e-5  # torch's BatchNorm1d default


def _forward(p: Any, x: Any, rm: Any, rv: Any, sync: bool, momentum: float) -> tuple[Any, Any, Any]:
    """One shard's forward in train mode: (outputs, new running mean, new running var)."""
    import jax.numpy as jnp
    from jax import lax

    z = x @ p["l1"]["kernel"] + p["l1"]["bias"]
    n = z.shape[0]
    mean, sq = jnp.mean(z, 0), jnp.mean(z * z, 0)
    if sync:
        mean, sq, n = lax.pmean(mean, AXIS), lax.pmean(sq, AXIS), n * lax.axis_size(AXIS)
    var = sq - mean * mean  # biased: what normalises, in torch as here
    a = (z - mean) * lax.rsqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
    out = jnp.tanh(a) @ p["l2"]["kernel"] + p["l2"]["bias"]
    stat = lambda r, b: momentum * r + (1.0 - momentum) * lax.stop_gradient(b)
    return out, stat(rm, mean), stat(rv, var * n / (n - 1))  # torch's running_var: unbiased


def _step_fn(ctx: Any, sync: bool, momentum: float) -> Any:
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    def local(p: Any, rm: Any, rv: Any, xl: Any, yl: Any) -> Any:
        mine = jax.tree.map(lambda a: lax.pcast(a, AXIS, to="varying"), p)  # see jax_jobs._grad_fn

        def loss(q: Any) -> Any:
            out, nm, nv = _forward(q, xl, rm, rv, sync, momentum)
            return jnp.mean((out - yl) ** 2), (out, nm, nv)

        g, (out, nm, nv) = jax.grad(loss, has_aux=True)(mine)
        return jax.tree.map(lambda a: lax.pmean(a, AXIS), g), out, nm[None], nv[None]

    return jax.shard_map(local, mesh=ctx.mesh, in_specs=(P(), P(), P(), P(AXIS), P(AXIS)),
                         out_specs=(P(), P(AXIS), P(AXIS), P(AXIS)))


def ddp_bn(ctx: Any, params: Any, x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 1, sync: bool = False,
           slips: dict[str, Any] | None = None) -> dict[str, Any]:
    """`steps` SGD steps of the port on the global batch x (B, d), y (B, o) (B a multiple of N, rank r's
    rows [r*B/N, (r+1)*B/N)), running statistics starting at 0 and 1 as torch's. params: {"l1", "l2":
    {"kernel", "bias"}, "bn": {"scale", "bias"}}. slips override the port's choices: {"sync": bool},
    {"momentum": m} (flax's convention), {"carry": "rank0" | "mean" | int}. Returns {"out": the first
    forward's outputs (B, o), "grads": the first gradient tree, "params": the tree after the last step,
    "running_mean", "running_var": (N, h), device r's after the last step}."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    slips = dict(slips or {})
    sync, momentum, carry = slips.get("sync", sync), float(slips.get("momentum", 0.9)), slips.get("carry", "rank0")
    key = ("bn", ctx.world, sync, momentum, x.shape, y.shape, x.dtype.str)
    fn = ctx.cache.get(key) or ctx.cache.setdefault(key, jax.jit(_step_fn(ctx, sync, momentum)))
    data, rep = NamedSharding(ctx.mesh, P(AXIS)), NamedSharding(ctx.mesh, P())
    xs, ys = jax.device_put(x, data), jax.device_put(y, data)
    h = params["bn"]["scale"].shape[0]
    p, rm, rv = jax.device_put(params, rep), jnp.zeros(h, x.dtype), jnp.ones(h, x.dtype)
    got: dict[str, Any] = {}
    for step in range(steps):
        g, out, rms, rvs = fn(p, rm, rv, xs, ys)
        if step == 0:
            got["out"], got["grads"] = np.asarray(out), jax.tree.map(np.asarray, g)
        p = jax.tree.map(lambda w, d: w - np.asarray(lr, x.dtype) * d, p, g)
        pick = (lambda a: jnp.mean(a, 0)) if carry == "mean" else (lambda a: a[0 if carry == "rank0" else int(carry)])
        rm, rv = pick(rms), pick(rvs)
    return {**got, "params": jax.tree.map(np.asarray, p), "running_mean": np.asarray(rms),
            "running_var": np.asarray(rvs)}
