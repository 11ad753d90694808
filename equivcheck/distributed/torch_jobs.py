"""The torch side's jobs, run on every rank of a pool (equivcheck.distributed.worker): NumPy in and out.

collective  one torch.distributed collective on this rank's array
ddp         a small MLP under DistributedDataParallel: the all-reduced gradients of this rank's shard,
            and the parameters after each of `steps` SGD steps
fsdp        the same under FSDP2 (fully_shard): parameters sharded over the ranks, gathered to compare
ddp_epoch   one epoch of DDP SGD through DistributedSampler(drop_last=False): the uneven last batch
ddp_bn      an MLP with BatchNorm1d under DDP (broadcast_buffers=True), SyncBatchNorm on GPU

`slips` (a dict) plant the mistakes a migration makes, on this side only, so that the checks can be
shown to catch them: {"grad_reduce": "sum"} (a DDP comm hook that sums gradients over replicas instead
of averaging), {"lr_scale": N} (the learning rate scaled by N), {"shard_of": [0, 0]} (the shard each
rank reads: here rank 1 reads rank 0's).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _tensor(x: np.ndarray, ctx: Any) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(ctx.device)


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()  # on CPU .numpy() shares the parameter's memory, which steps change


def collective(ctx: Any, op: str, x: np.ndarray, root: int = 0) -> np.ndarray:
    """This rank's result of collective `op` on its array `x` (any shape, float32/float64):

    all_reduce_sum / all_reduce_mean (sum, then / N) / all_reduce_max: x's shape;
    all_gather: the ranks' arrays concatenated along axis 0 (N * x.shape[0] rows);
    reduce_scatter: x.shape[0] must be a multiple of N: this rank's block of the sum over ranks;
    broadcast: rank `root`'s array. Raises ValueError for another `op`.
    """
    import torch.distributed as dist

    t = _tensor(x, ctx).clone()
    if op in ("all_reduce_sum", "all_reduce_mean"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.group)
        if op == "all_reduce_mean":
            t = t / ctx.world
    elif op == "all_reduce_max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    elif op == "all_gather":
        import torch

        parts = [torch.empty_like(t) for _ in range(ctx.world)]
        dist.all_gather(parts, t, group=ctx.group)
        t = torch.cat(parts, dim=0)
    elif op == "reduce_scatter":
        import torch

        chunks = [c.contiguous() for c in t.chunk(ctx.world, dim=0)]
        t = torch.empty_like(chunks[0])
        dist.reduce_scatter(t, chunks, op=dist.ReduceOp.SUM, group=ctx.group)
    elif op == "broadcast":
        dist.broadcast(t, src=root, group=ctx.group)  # ranks 0..n-1: group rank = global rank
    else:
        raise ValueError(f"no collective {op!r}")
    return _numpy(t)


def _mlp(params: dict[str, np.ndarray], ctx: Any) -> Any:
    """nn.Sequential(Linear, Tanh, Linear) holding `params` (torch layout: l1.weight (h, d), l1.bias (h),
    l2.weight (o, h), l2.bias (o)), in the arrays' dtype."""
    import torch

    d, h, o = params["l1.weight"].shape[1], params["l1.weight"].shape[0], params["l2.weight"].shape[0]
    dtype = torch.from_numpy(params["l1.weight"]).dtype
    model = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, o)).to(ctx.device, dtype)
    with torch.no_grad():
        for key, p in zip(NAMES, model.parameters()):
            p.copy_(_tensor(params[key], ctx))
    return model


def _sum_hook(state, bucket):  # unannotated: DDP refuses a hook annotated with types other than its own
    """A DDP comm hook that sums the bucket over replicas and does not divide: the planted slip."""
    import torch.distributed as dist

    return dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future().then(lambda fut: fut.value()[0])


def ddp(ctx: Any, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 0,
        slips: dict[str, Any] | None = None, accumulate: int = 1) -> dict[str, Any]:
    """DDP on the MLP `params` (see _mlp) with this rank's shard of the global batch.

    x (B, d) and y (B, o) are the whole global batch, B a multiple of N; this rank reads rows
    [s*B/N, (s+1)*B/N) with s = slips["shard_of"][rank] (default: its rank). The loss is the mean
    squared error over the shard; DDP averages the gradients over replicas. With `accumulate` = M > 1
    the shard is split into M micro-batches (its rows a multiple of M), each loss divided by M, the first
    M-1 backward passes under `model.no_sync()` (DDP reduces only the last one's, accumulated, gradients).
    Returns {"grads": the gradients after one backward (torch layout keys), "params": [the
    parameters after each of `steps` SGD steps of learning rate lr (x slips["lr_scale"])]}.
    """
    from torch.nn.parallel import DistributedDataParallel

    slips = dict(slips or {})
    xs, ys = _shard_rows(ctx, x, y, slips)
    model = DistributedDataParallel(_mlp(params, ctx), device_ids=None if ctx.device == "cpu" else [ctx.device],
                                    process_group=ctx.group)
    if slips.get("grad_reduce", "mean") == "sum":
        model.register_comm_hook(ctx.group, _sum_hook)
    return _train(model, xs, ys, lr * float(slips.get("lr_scale", 1.0)), steps, _numpy, accumulate, slips)


NAMES = ("l1.weight", "l1.bias", "l2.weight", "l2.bias")


def _backward(model: Any, xs: Any, ys: Any, accumulate: int, slips: dict[str, Any]) -> None:
    """One step's backward: `accumulate` micro-batches, the loss of each divided by their count (not with
    slips["accumulate_reduce"] == "sum"), all but the last under DDP's no_sync (all of them with
    slips["no_sync_all"]: the gradients then never leave their rank)."""
    import contextlib

    import torch

    divide = 1.0 if slips.get("accumulate_reduce") == "sum" else float(accumulate)
    parts = list(zip(xs.chunk(accumulate), ys.chunk(accumulate)))
    for i, (xm, ym) in enumerate(parts):
        quiet = (i < len(parts) - 1 or slips.get("no_sync_all")) and hasattr(model, "no_sync")
        with model.no_sync() if quiet else contextlib.nullcontext():
            (torch.nn.functional.mse_loss(model(xm), ym) / divide).backward()


def _train(model: Any, xs: Any, ys: Any, lr: float, steps: int, full: Any, accumulate: int = 1,
           slips: dict[str, Any] | None = None) -> dict[str, Any]:
    """SGD on the shard's mean squared error: {"grads": the first gradients, "params": [after each of
    `steps` steps]}, each tensor read by `full` (a DTensor's gathered from its shards)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    read = lambda ts: {k: full(t) for k, t in zip(NAMES, ts)}
    grads: dict[str, np.ndarray] = {}
    trail = []
    for step in range(max(steps, 1)):
        opt.zero_grad()
        _backward(model, xs, ys, accumulate, slips or {})
        if step == 0:
            grads = read(p.grad for p in model.parameters())
        if steps:
            opt.step()
            trail.append(read(model.parameters()))
    return {"grads": grads, "params": trail}


def _shard_rows(ctx: Any, x: np.ndarray, y: np.ndarray, slips: dict[str, Any]) -> tuple[Any, Any]:
    shard = list(slips.get("shard_of", range(ctx.world)))[ctx.rank]
    rows = x.shape[0] // ctx.world
    return _tensor(x[shard * rows:(shard + 1) * rows], ctx), _tensor(y[shard * rows:(shard + 1) * rows], ctx)


def fsdp(ctx: Any, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 0,
         slips: dict[str, Any] | None = None, accumulate: int = 1) -> dict[str, Any]:
    """The MLP under FSDP2 (`torch.distributed.fsdp.fully_shard` on a DeviceMesh of the request's ranks:
    each parameter sharded on dim 0, gathered for forward and backward, gradients reduce-scattered and
    averaged), this rank reading its shard of the batch as in `ddp`. Returns {"grads", "params"} like
    `ddp`, gathered to full arrays (DTensor.full_tensor), and "local": this rank's shard shapes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    slips = dict(slips or {})
    xs, ys = _shard_rows(ctx, x, y, slips)
    model = _mlp(params, ctx)
    fully_shard(model, mesh=DeviceMesh.from_group(ctx.group or dist.group.WORLD,
                                                  "cpu" if ctx.device == "cpu" else "cuda"))
    out = _train(model, xs, ys, lr * float(slips.get("lr_scale", 1.0)), steps, lambda t: _numpy(t.full_tensor()),
                 accumulate, slips)
    return {**out, "local": [tuple(p.to_local().shape) for p in model.parameters()]}


def probe(ctx: Any, rank: int, action: str, seconds: float = 3600.0) -> int:
    """For testing the pool's failure handling: on `rank`, "exit" (os._exit(3)), "raise" (RuntimeError)
    or "hang" (sleep `seconds`); other ranks return their rank at once."""
    import os
    import time

    if ctx.rank == rank:
        if action == "exit":
            os._exit(3)
        if action == "raise":
            raise RuntimeError(f"planted failure on rank {rank}")
        if action == "hang":
            time.sleep(seconds)
    return ctx.rank


def ddp_epoch(ctx: Any, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, batch: int, lr: float = 0.1,
              slips: dict[str, Any] | None = None) -> dict[str, Any]:
    """One epoch of DDP over the dataset x (D, d), y (D, o) (D any size >= 1) read through torch's own
    `DistributedSampler(shuffle=False, drop_last=False)` (drop_last=True with slips["drop_last"]) and a
    DataLoader of `batch` rows per rank, one SGD step per batch. drop_last=False pads the index list by
    repeating its first samples until N divides it, so every rank gets ceil(D / N) samples and the last
    step the same count on every rank. Returns {"indices": this rank's sample indices in order,
    "grads": the gradients of the epoch's last step, "params": the parameters after the epoch,
    "steps": the number of steps}."""
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(_tensor(x, ctx), _tensor(y, ctx))
    sampler = DistributedSampler(data, num_replicas=ctx.world, rank=ctx.rank, shuffle=False,
                                 drop_last=bool((slips or {}).get("drop_last")))
    model = DistributedDataParallel(_mlp(params, ctx), device_ids=None if ctx.device == "cpu" else [ctx.device],
                                    process_group=ctx.group)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads, steps = {}, 0
    for xb, yb in DataLoader(data, batch_size=batch, sampler=sampler):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        grads = {k: _numpy(p.grad) for k, p in zip(NAMES, model.parameters())}
        opt.step()
        steps += 1
    return {"indices": np.asarray(list(sampler), np.int64), "grads": grads, "steps": steps,
            "params": {k: _numpy(p) for k, p in zip(NAMES, model.parameters())}}


BN_NAMES = ("l1.weight", "l1.bias", "bn.weight", "bn.bias", "l2.weight", "l2.bias")


def ddp_bn(ctx: Any, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float = 0.1, steps: int = 1,
           sync: bool = False, slips: dict[str, Any] | None = None) -> dict[str, Any]:
    """Linear -> BatchNorm1d -> tanh -> Linear (params: BN_NAMES, torch layout, bn.* of shape (h,))
    under DDP with its default broadcast_buffers=True, this rank reading rows [r*B/N, (r+1)*B/N) of the
    global batch x (B, d), y (B, o); `steps` SGD steps of the shard's mean squared error.

    Plain BatchNorm1d normalises by this rank's shard statistics; DDP broadcasts rank 0's buffers
    (running_mean, running_var) to every rank at the start of each forward, and each rank then updates
    them with its own shard's (unbiased) statistics at momentum 0.1. sync=True converts the norm to
    SyncBatchNorm (statistics over the global batch), which torch 2.14 runs on GPU only: on CPU DDP's
    constructor raises ValueError ("SyncBatchNorm layers only work with GPU modules"). slips:
    {"momentum": m} (torch's momentum set to m), {"broadcast_buffers": False}.
    Returns {"out": this rank's outputs of the first forward (B/N, o), "grads": the first gradients,
    "params": after the last step, "running_mean", "running_var": this rank's buffers (h,) after it}.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    slips = dict(slips or {})
    xs, ys = _shard_rows(ctx, x, y, {})
    d, h, o = params["l1.weight"].shape[1], params["l1.weight"].shape[0], params["l2.weight"].shape[0]
    dtype = torch.from_numpy(params["l1.weight"]).dtype
    net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.BatchNorm1d(h, momentum=slips.get("momentum", 0.1)),
                              torch.nn.Tanh(), torch.nn.Linear(h, o)).to(ctx.device, dtype)
    with torch.no_grad():
        for key, p in zip(BN_NAMES, net.parameters()):
            p.copy_(_tensor(params[key], ctx))
    if sync:  # GPU only in torch 2.14 (see the docstring); never runs on this CPU machine
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net, process_group=ctx.group)
    model = DistributedDataParallel(net, device_ids=None if ctx.device == "cpu" else [ctx.device],
                                    process_group=ctx.group, broadcast_buffers=slips.get("broadcast_buffers", True))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out: dict[str, Any] = {}
    for step in range(steps):
        opt.zero_grad()
        pred = model(xs)
        torch.nn.functional.mse_loss(pred, ys).backward()
        if step == 0:
            out["out"], out["grads"] = _numpy(pred), {k: _numpy(p.grad) for k, p in zip(BN_NAMES, net.parameters())}
        opt.step()
    norm = net[1]
    return {**out, "params": {k: _numpy(p) for k, p in zip(BN_NAMES, net.parameters())},
            "running_mean": _numpy(norm.running_mean), "running_var": _numpy(norm.running_var)}


def barrier(ctx: Any) -> int:
    """Every rank of the default group meets once: the pool's health check after a job raised (a rank
    left inside a collective, or collectives left unmatched, makes it hang or raise)."""
    import torch.distributed as dist

    dist.barrier()
    return ctx.rank


JOBS = {"barrier": barrier, "collective": collective, "ddp": ddp, "ddp_bn": ddp_bn, "ddp_epoch": ddp_epoch, "fsdp": fsdp, "probe": probe}
