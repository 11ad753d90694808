"""A user's own distributed jobs, from the fresh-user trial (/work/trial-new/dist/my_jobs.py), for
tests/test_distributed_jobs.py: a hand-written data-parallel MLP (no DDP wrapper) on both sides, tanh or
ReLU, and the malformed results the trial returned (a missing key, a list for a tree, None, float16, one
parameter snapshot of three steps, a NaN on one rank). Run in the pool's workers as
"tests.distributed_user_jobs:<name>", with the built-in ddp job's arguments; `relu_reference` runs in
the parent as the ReLU model's float64 reference_job.
"""
from __future__ import annotations

from typing import Any

import numpy as np

NAMES = ("l1.weight", "l1.bias", "l2.weight", "l2.bias")


def _torch(ctx: Any, params: Any, x: Any, y: Any, lr: float, steps: int, act: str = "tanh",
           nan_rank: int | None = None) -> dict[str, Any]:
    """Per rank: {"grads": the all-reduced mean gradient at `params`, "params": [after each step]}."""
    import torch
    import torch.distributed as dist

    f = getattr(torch, act)
    ps = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    rows = x.shape[0] // ctx.world
    xs, ys = (torch.tensor(a[ctx.rank * rows:(ctx.rank + 1) * rows]) for a in (x, y))
    trail, first = [], None
    for _ in range(max(steps, 1)):
        loss = ((f(xs @ ps["l1.weight"].T + ps["l1.bias"]) @ ps["l2.weight"].T + ps["l2.bias"] - ys) ** 2).mean()
        out = {}
        for k, g in zip(NAMES, torch.autograd.grad(loss, [ps[k] for k in NAMES])):
            g = g.clone()
            dist.all_reduce(g, group=ctx.group)
            out[k] = g / ctx.world
        if ctx.rank == nan_rank:
            out["l1.bias"][0] = float("nan")
        first = first or {k: v.numpy().copy() for k, v in out.items()}
        if steps:
            with torch.no_grad():
                for k in NAMES:
                    ps[k] -= lr * out[k]
            trail.append({k: ps[k].detach().numpy().copy() for k in NAMES})
    return {"grads": first, "params": trail}


def _jax(ctx: Any, params: Any, x: Any, y: Any, lr: float, steps: int, act: str = "tanh",
         reduce: str = "pmean") -> dict[str, Any]:
    """{"grads", "params"} in Flax's layout; `reduce` "psum" is the slip of a forgotten mean."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    f = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act]

    def loss(p: Any, xl: Any, yl: Any) -> Any:
        return jnp.mean((f(xl @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] + p["l2"]["bias"] - yl) ** 2)

    def local(p: Any, xl: Any, yl: Any) -> Any:
        p = jax.tree.map(lambda a: lax.pcast(a, "ranks", to="varying"), p)
        return jax.tree.map(lambda g: getattr(lax, reduce)(g, "ranks"), jax.grad(loss)(p, xl, yl))

    grad = jax.jit(jax.shard_map(local, mesh=ctx.mesh, in_specs=(P(), P("ranks"), P("ranks")), out_specs=P()))
    xs, ys = (jax.device_put(a, NamedSharding(ctx.mesh, P("ranks"))) for a in (x, y))
    p, trail = params, []
    g0 = jax.tree.map(np.asarray, grad(p, xs, ys))
    for _ in range(steps):
        p = jax.tree.map(lambda w, g: w - lr * g, p, grad(p, xs, ys))
        trail.append(jax.tree.map(np.asarray, p))
    return {"grads": g0, "params": trail}


def torch_ok(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return _torch(ctx, params, x, y, lr, steps)


def jax_ok(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return _jax(ctx, params, x, y, lr, steps)


def torch_relu(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return _torch(ctx, params, x, y, lr, steps, act="relu")


def jax_relu(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return _jax(ctx, params, x, y, lr, steps, act="relu")


def jax_relu_forgot_pmean(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return _jax(ctx, params, x, y, lr, steps, act="relu", reduce="psum")


def relu_reference(params: Any, x: Any, y: Any, lr: float, steps: int) -> dict[str, Any]:
    """The ReLU MLP's full-batch float64 gradient and SGD trail, torch layout (a user's reference_job)."""
    def grads(p: Any) -> dict[str, np.ndarray]:
        z = x @ p["l1.weight"].T + p["l1.bias"]
        h = np.maximum(z, 0.0)
        out = h @ p["l2.weight"].T + p["l2.bias"]
        d_out = 2.0 * (out - y) / out.size
        d_z = (d_out @ p["l2.weight"]) * (z > 0)
        return {"l1.weight": d_z.T @ x, "l1.bias": d_z.sum(0), "l2.weight": d_out.T @ h, "l2.bias": d_out.sum(0)}

    p, trail = dict(params), []
    for _ in range(steps):
        g = grads(p)
        p = {k: p[k] - lr * g[k] for k in p}
        trail.append(p)
    return {"grads": grads(params), "params": trail}


def torch_nan_rank1(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return _torch(ctx, params, x, y, lr, steps, nan_rank=1)


def torch_missing_key(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _torch(ctx, params, x, y, lr, steps)
    del out["grads"]["l2.bias"]
    return out


def torch_wrong_shape(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _torch(ctx, params, x, y, lr, steps)
    out["grads"]["l1.weight"] = out["grads"]["l1.weight"].T.copy()
    return out


def torch_f16(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _torch(ctx, params, x, y, lr, steps)
    out["grads"] = {k: v.astype(np.float16) for k, v in out["grads"].items()}
    return out


def jax_f16(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _jax(ctx, params, x, y, lr, steps)
    out["grads"] = {layer: {k: v.astype(np.float16) for k, v in t.items()} for layer, t in out["grads"].items()}
    return out


def jax_list(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _jax(ctx, params, x, y, lr, steps)
    out["grads"] = list(out["grads"].values())
    return out


def jax_none(ctx: Any, **_: Any) -> None:
    return None


def torch_no_trail(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    return {**_torch(ctx, params, x, y, lr, steps), "params": []}


def torch_one_step(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _torch(ctx, params, x, y, lr, steps)
    return {**out, "params": out["params"][:1]}


def jax_one_step(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    out = _jax(ctx, params, x, y, lr, steps)
    return {**out, "params": out["params"][:1]}


def torch_hang_rank1(ctx: Any, params: Any, x: Any, y: Any, lr: float = 0.1, steps: int = 0, **_: Any) -> Any:
    """Rank 1 sleeps; rank 0 then waits for it inside the first all_reduce."""
    import time

    if ctx.rank == 1:
        time.sleep(3600)
    return _torch(ctx, params, x, y, lr, steps)


def torch_coll_f16(ctx: Any, op: str, x: Any, root: int = 0) -> Any:
    from equivcheck.distributed.torch_jobs import collective

    return np.asarray(collective(ctx, op, x, root)).astype(np.float16)


def jax_coll_f16(ctx: Any, op: str, x: Any, root: int = 0) -> Any:
    from equivcheck.distributed.jax_jobs import collective

    return np.asarray(collective(ctx, op, x, root)).astype(np.float16)
