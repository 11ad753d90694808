"""The JAX side's jobs, run in the pool's JAX process over a 1-D Mesh of N devices (axis "ranks").

collective  per-rank arrays stacked on axis 0, through `jax.shard_map` with lax.psum / pmean / pmax /
            all_gather / psum_scatter
fsdp        the MLP with its parameters sharded over the mesh axis, the gradient by XLA's partitioner
ddp         the MLP (Flax-style tree: {"l1": {"kernel", "bias"}, "l2": ...}) trained data-parallel:
            the global batch placed with NamedSharding(mesh, P("ranks")), parameters replicated, each
            shard's gradient taken inside shard_map and averaged with lax.pmean (DDP's form)
ddp_epoch   the uneven last batch's port: one epoch over an index list padded as DistributedSampler
            pads it (epoch_order), each step through the ddp job's gradient
ddp_bn      the BatchNorm port (equivcheck.distributed.jax_bn): per-device or pmean-ed statistics

Compiled programs are kept in the context's cache by (job, shapes, dtype, options): each new shape
costs one XLA compilation, the calls after it a fraction of a millisecond. `slips` plant a
migration's mistakes on this side: {"grad_reduce": "sum"} (psum, not pmean, of the shards'
gradients), {"loss_reduce": "shard_mean_sum"} (each shard's mean loss summed over ranks, then
differentiated), {"lr_scale": N}, {"shard_of": [...]} (the shard each rank reads).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.distributed.jax_bn import AXIS, ddp_bn


def _collective_body(op: str, root: int) -> Any:
    from jax import lax

    def body(block: Any) -> Any:  # block: this rank's (1, *shape)
        v = block[0]
        if op == "all_reduce_sum":
            r = lax.psum(v, AXIS)
        elif op == "all_reduce_mean":
            r = lax.pmean(v, AXIS)
        elif op == "all_reduce_max":
            r = lax.pmax(v, AXIS)
        elif op == "all_gather":
            r = lax.all_gather(v, AXIS, axis=0, tiled=True)
        elif op == "reduce_scatter":
            r = lax.psum_scatter(v, AXIS, scatter_dimension=0, tiled=True)
        elif op == "broadcast":
            r = lax.all_gather(v, AXIS)[root]
        else:
            raise ValueError(f"no collective {op!r}")
        return r[None]

    return body


def collective(ctx: Any, op: str, x: np.ndarray, root: int = 0) -> np.ndarray:
    """x: (N, *shape), rank r's array at x[r]. Returns (N, *out_shape): rank r's result at [r], with the
    shapes of equivcheck.distributed.torch_jobs.collective. Raises ValueError for another `op`."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    key = ("collective", ctx.world, op, root, x.shape, x.dtype.str)
    fn = ctx.cache.get(key)
    if fn is None:
        fn = ctx.cache[key] = jax.jit(jax.shard_map(_collective_body(op, root), mesh=ctx.mesh, in_specs=P(AXIS),
                                                    out_specs=P(AXIS), check_vma=False))
    return np.asarray(fn(jax.device_put(x, NamedSharding(ctx.mesh, P(AXIS)))))


def mlp(params: Any, x: Any) -> Any:
    """tanh MLP on a Flax-style tree: x (B, d) -> (B, o)."""
    import jax.numpy as jnp

    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def _grad_fn(ctx: Any, slips: dict[str, Any], accumulate: int) -> Any:
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    def shard_loss(p: Any, xl: Any, yl: Any) -> Any:
        return jnp.mean((mlp(p, xl) - yl) ** 2)

    if slips.get("loss_reduce", "mean") == "shard_mean_sum":
        def summed(p: Any, x: Any, y: Any) -> Any:
            total = jax.shard_map(lambda p, xl, yl: lax.psum(shard_loss(p, xl, yl), AXIS), mesh=ctx.mesh,
                                  in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P())
            return total(p, x, y)
        return jax.grad(summed)
    reduce = lax.psum if slips.get("grad_reduce", "mean") == "sum" else lax.pmean

    def local(p: Any, xl: Any, yl: Any) -> Any:
        # Replicated parameters are invariant over the axis, and the transpose of that is a psum: a
        # gradient taken of them inside shard_map is already summed over ranks. Made varying first,
        # each rank's gradient is its shard's alone, reduced explicitly as DDP does.
        mine = jax.tree.map(lambda a: lax.pcast(a, AXIS, to="varying"), p)
        # `accumulate` micro-batches, their gradients averaged (summed with slips["accumulate_reduce"] == "sum")
        parts = [jax.grad(shard_loss)(mine, xm, ym)
                 for xm, ym in zip(jnp.split(xl, accumulate), jnp.split(yl, accumulate))]
        divide = 1.0 if slips.get("accumulate_reduce") == "sum" else float(accumulate)
        total = jax.tree.map(lambda *gs: sum(gs) / divide, *parts)
        return jax.tree.map(lambda g: reduce(g, AXIS), total)

    return jax.shard_map(local, mesh=ctx.mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P())


def _batch(ctx: Any, x: np.ndarray, y: np.ndarray, slips: dict[str, Any]) -> tuple[Any, Any]:
    """The global batch sharded by rows over the mesh, rank r's rows being shard slips["shard_of"][r]."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = x.shape[0] // ctx.world
    order = np.concatenate([np.arange(s * rows, (s + 1) * rows) for s in slips.get("shard_of", range(ctx.world))])
    data = NamedSharding(ctx.mesh, P(AXIS))
    return jax.device_put(x[order], data), jax.device_put(y[order], data)


def ddp(ctx: Any, params: Any, x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 0,
        slips: dict[str, Any] | None = None, accumulate: int = 1) -> dict[str, Any]:
    """Data-parallel training of the MLP tree `params` on the global batch x (B, d), y (B, o), B a
    multiple of N; returns {"grads": the first gradient tree, "params": [the tree after each of `steps`
    SGD steps]}, like equivcheck.distributed.torch_jobs.ddp in JAX's layout; `accumulate` micro-batches per
    shard as there."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    slips = dict(slips or {})
    xs, ys = _batch(ctx, x, y, slips)
    step_lr = lr * float(slips.get("lr_scale", 1.0))
    kinds = ("grad_reduce", "loss_reduce", "accumulate_reduce")
    key = ("ddp", ctx.world, accumulate, tuple(sorted((k, str(v)) for k, v in slips.items() if k in kinds)),
           x.shape, y.shape, x.dtype.str)
    fns = ctx.cache.get(key)
    if fns is None:
        grad = _grad_fn(ctx, slips, accumulate)
        step = lambda p, x, y, lr: jax.tree.map(lambda w, g: w - lr * g, p, grad(p, x, y))
        fns = ctx.cache[key] = (jax.jit(grad), jax.jit(step))
    grad, step = fns
    p = jax.device_put(params, NamedSharding(ctx.mesh, P()))
    out = {"grads": jax.tree.map(np.asarray, grad(p, xs, ys)), "params": []}
    lr_arr = np.asarray(step_lr, x.dtype)
    for _ in range(steps):
        p = step(p, xs, ys, lr_arr)
        out["params"].append(jax.tree.map(np.asarray, p))
    return out


def _sharded_spec(shape: tuple[int, ...], n: int) -> Any:
    """P("ranks") on the first axis that n divides (FSDP's dim-0 sharding where it fits), else replicated."""
    from jax.sharding import PartitionSpec as P

    for i, size in enumerate(shape):
        if size % n == 0:
            return P(*([None] * i), AXIS)
    return P()


def fsdp(ctx: Any, params: Any, x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 0,
         slips: dict[str, Any] | None = None, accumulate: int = 1) -> dict[str, Any]:
    """The MLP with its parameters sharded over the mesh axis (each leaf on the first axis N divides) and
    the batch sharded by rows, the full-batch mean loss differentiated under jit: XLA's partitioner
    gathers the parameters and reduce-scatters the gradients (ZeRO-3 / FSDP by sharding annotations).
    Returns {"grads", "params", "local"} like torch_jobs.fsdp, in JAX's layout. `accumulate` is accepted
    for the jobs' common signature: micro-batches of equal size change nothing in a full-batch mean."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    slips = dict(slips or {})
    xs, ys = _batch(ctx, x, y, slips)
    placed = jax.tree.map(lambda a: NamedSharding(ctx.mesh, _sharded_spec(a.shape, ctx.world)), params)
    key = ("fsdp", ctx.world, x.shape, y.shape, x.dtype.str)
    fns = ctx.cache.get(key)
    if fns is None:
        grad = jax.grad(lambda p, x, y: jnp.mean((mlp(p, x) - y) ** 2))
        step = lambda p, x, y, lr: jax.tree.map(lambda w, g: w - lr * g, p, grad(p, x, y))
        fns = ctx.cache[key] = (jax.jit(grad, out_shardings=placed), jax.jit(step, out_shardings=placed))
    grad, step = fns
    p = jax.device_put(params, placed)
    out = {"grads": jax.tree.map(np.asarray, grad(p, xs, ys)), "params": [],
           "local": [tuple(a.addressable_shards[0].data.shape) for a in jax.tree.leaves(p)]}
    lr_arr = np.asarray(lr * float(slips.get("lr_scale", 1.0)), x.dtype)
    for _ in range(steps):
        p = step(p, xs, ys, lr_arr)
        out["params"].append(jax.tree.map(np.asarray, p))
    return out


def probe(ctx: Any, action: str, seconds: float = 3600.0) -> int:
    """For testing the pool's failure handling: "exit" (os._exit(3)), "raise" or "hang"."""
    import os
    import time

    if action == "exit":
        os._exit(3)
    if action == "raise":
        raise RuntimeError("planted failure in the JAX worker")
    if action == "hang":
        time.sleep(seconds)
    return ctx.world


def epoch_order(size: int, world: int, remainder: str = "pad") -> list[np.ndarray]:
    """Each rank's sample indices for one epoch of `size` samples over `world` ranks, in order, rank r
    taking every world-th index from r (DistributedSampler's striding, shuffle=False). remainder: "pad"
    (torch's drop_last=False: the index list padded with its first samples, repeated, until world divides
    it), "drop" (the last size % world samples dropped: drop_last=True), "pad_last" (padded by repeating
    the last sample). Raises ValueError for another `remainder`."""
    idx = np.arange(size)
    short = -size % world
    if remainder == "pad":
        idx = np.concatenate([idx, np.resize(idx, short)])  # np.resize repeats from the start, as torch does
    elif remainder == "drop":
        idx = idx[:size - size % world]
    elif remainder == "pad_last":
        idx = np.concatenate([idx, np.full(short, size - 1)])
    else:
        raise ValueError(f"no remainder policy {remainder!r}; known: pad, drop, pad_last")
    return [idx[r::world] for r in range(world)]


def _masked_loss(params: Any, x: Any, y: Any, real: Any) -> Any:
    """The mean squared error over the rows where `real` is 1, the padded ones weighing 0; jit partitions it
    over the batch's sharding (a port that masks padding with a weighted global mean)."""
    import jax.numpy as jnp

    per_row = jnp.mean((mlp(params, x) - y) ** 2, axis=-1)
    return jnp.sum(per_row * real) / jnp.sum(real)


def ddp_epoch(ctx: Any, params: Any, x: np.ndarray, y: np.ndarray, batch: int, lr: float = 0.1,
              slips: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JAX port of torch_jobs.ddp_epoch: the epoch's per-rank index lists from `epoch_order` (the
    port pads as torch's sampler does; slips {"remainder": "drop" | "pad_last" | "mask"} plant a port that
    drops the remainder, pads otherwise, or masks the padded rows out of the loss), each step's rows laid out rank after rank and sharded over the mesh,
    the gradient by the ddp job's shard_map + pmean. Returns {"grads": the last step's gradient tree,
    "params": the tree after the epoch, "steps"}."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    remainder = (slips or {}).get("remainder", "pad")
    size = x.shape[0]
    order = epoch_order(size, ctx.world, "pad" if remainder == "mask" else remainder)
    slots = epoch_order(len(order[0]) * ctx.world, ctx.world, "drop")  # positions: past `size` is padding
    p, g, steps = jax.device_put(params, NamedSharding(ctx.mesh, P())), None, 0
    data = NamedSharding(ctx.mesh, P(AXIS))
    for start in range(0, len(order[0]), batch):
        rows = np.concatenate([o[start:start + batch] for o in order])
        xs, ys = jax.device_put(x[rows], data), jax.device_put(y[rows], data)
        key = ("epoch", remainder == "mask", ctx.world, rows.shape, x.shape[1:], y.shape[1:], x.dtype.str)
        if remainder == "mask":
            real = np.concatenate([q[start:start + batch] for q in slots]) < size
            grad = ctx.cache.get(key) or ctx.cache.setdefault(key, jax.jit(jax.grad(_masked_loss)))
            g = grad(p, xs, ys, jax.device_put(real.astype(x.dtype), data))
        else:
            grad = ctx.cache.get(key) or ctx.cache.setdefault(key, jax.jit(_grad_fn(ctx, {}, 1)))
            g = grad(p, xs, ys)
        p = jax.tree.map(lambda w, d: w - np.asarray(lr, x.dtype) * d, p, g)
        steps += 1
    return {"grads": jax.tree.map(np.asarray, g), "params": jax.tree.map(np.asarray, p), "steps": steps}


JOBS = {"collective": collective, "ddp": ddp, "ddp_bn": ddp_bn, "ddp_epoch": ddp_epoch, "fsdp": fsdp, "probe": probe}
