"""One optimizer step of an OptimizerPair on both sides, ready to time: the `step` check's work.

The same parameters and gradients (NumPy, drawn at a fixed seed) on both sides. torch: `optimizer.step()`
on leaves whose `.grad` holds the gradients, parameters and state updated in place (clipping first, where
the pair clips, and its scheduler after). JAX: `optax.apply_updates(params, tx.update(grads, state, params))`
jitted, parameters and state returned, their input buffers donated so that XLA may update them in place
as torch does; each call feeds the next its output, as a training loop does.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from equivcheck.backends import jax_side, torch_side
from equivcheck.bench.memory import jax_memory, torch_memory
from equivcheck.bench.workload import SEED, Workload, no_persistent_cache, shared_rules, xla_threads
from equivcheck.optim.sides import torch_optimizer_for

SHAPES = {"w1": (256, 256), "b1": (256,), "w2": (256, 64), "b2": (64,)}  # an MLP's worth: 82,240 parameters


def problem(dtype: str, seed: int = SEED) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, grads): a two-layer MLP's parameter tree and one gradient of the same shapes."""
    from equivcheck.engine.dtypes import np_dtype

    rng = np.random.default_rng(seed)
    draw = lambda scale: {k: (rng.standard_normal(s) * scale).astype(np_dtype(dtype)) for k, s in SHAPES.items()}
    return draw(0.1), draw(0.01)


def unfit(pair: Any) -> str:
    """Why this pair's step cannot be timed as one call per side ("" when it can)."""
    if pair.unavailable:
        return pair.unavailable
    if pair.accumulate != 1:
        return f"accumulates {pair.accumulate} micro-batches per step: one call is not one step on both sides"
    if pair.schedule_takes_loss:
        return "its scheduler steps on the loss, which a step without a problem has not"
    return ""


def torch_step(pair: Any, dtype: str, device: str) -> Workload:
    import torch

    tb = torch_side()
    dev = tb.device_of(device)
    params, grads = problem(dtype)
    leaves = [torch.tensor(params[k], device=dev).requires_grad_() for k in sorted(params)]
    for leaf, k in zip(leaves, sorted(grads)):
        leaf.grad = torch.tensor(grads[k], device=dev)
    optimizer = torch_optimizer_for(pair, leaves, params)
    scheduler = pair.torch_scheduler(optimizer) if pair.torch_scheduler else None

    def call() -> None:
        if pair.torch_clip is not None:
            pair.torch_clip(leaves)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        tb.sync(device)

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    memory, measure = torch_memory(call, device)
    rules = [("torch eager: one optimizer.step() (clipping and scheduler included where the pair has them), "
              "parameters and state updated in place"),
             "synchronised: torch.cuda.synchronize() after every call" if device == "gpu"
             else "synchronised: torch's CPU kernels return when done",
             "no compile step (eager)", "the same parameters and gradients on both sides, on the device"]
    return Workload("torch", call, None, first, memory, measure, rules + shared_rules(), torch.get_num_threads())


def jax_step(pair: Any, dtype: str, device: str) -> Workload:
    import jax
    import optax

    jb = jax_side()
    dev = jb.device_of(device)
    tx = pair.optax_transform()

    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    with jb.x64(dtype == "float64"), no_persistent_cache():
        params, grads = (jax.device_put(t, dev) for t in problem(dtype))
        state = jax.device_put(tx.init(params), dev)
        jax.block_until_ready((params, grads, state))
        start = time.perf_counter()
        executable = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        compile_seconds = time.perf_counter() - start
    carry = [params, state]

    def call() -> Any:
        carry[:] = executable(carry[0], carry[1], grads)
        return jax.block_until_ready(carry)

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    memory, measure = jax_memory(call, executable, dev, device)
    rules = ["jax jit: optax update + apply_updates, parameters and state returned (input buffers donated)",
             "synchronised: jax.block_until_ready on every output leaf",
             "compile time apart: trace+lower+compile timed before the first call, persistent cache off",
             "the same parameters and gradients on both sides, on the device"]
    return Workload("jax", call, compile_seconds, first, memory, measure, rules + shared_rules(), xla_threads())


def build_step(pair: Any, side: str, dtype: str, device: str) -> Workload:
    """The `step` workload of `side` ("torch" or "jax"); ValueError for another side (torch.compile
    of an optimizer step is not timed)."""
    if side == "torch":
        return torch_step(pair, dtype, device)
    if side == "jax":
        return jax_step(pair, dtype, device)
    raise ValueError(f"side {side!r}: an optimizer step is timed on torch and jax")
