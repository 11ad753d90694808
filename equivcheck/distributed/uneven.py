"""The uneven last batch (check "epoch"): a dataset of D samples, N not dividing D, over N ranks.

What each side does:
  torch  `DistributedSampler(shuffle=False, drop_last=False)` (torch 2.14's __iter__): the index list
         0..D-1 is padded with its own first k = (-D) % N entries, indices[:k], until N divides it; rank r
         then takes every N-th index from r. Every rank sees ceil(D / N) samples, samples 0..k-1 twice.
         A DataLoader of b rows per rank makes ceil(D / N / b) SGD steps, the last one shorter, equally so
         on every rank, so DDP's average of the ranks' mean losses is the mean over that step's global batch.
  JAX    the port (jax_jobs.ddp_epoch) pads the same way and lays each step's rows out rank after rank,
         sharded over the mesh; the gradient is the ddp job's shard_map + pmean.
The float64 reference restates the sampler's padding (not the port's code) and trains on each step's
padded global batch. A side whose numbers fit another policy is named: the last D % N samples dropped
(drop_last=True, or a port that drops the remainder), padding by the last sample repeated, or the padded
duplicates masked out of the loss (each step's mean over its real samples only: "mask").

Arrays: params torch layout (reference.py), x (D, d), y (D, o); batch: rows per rank and step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from equivcheck.distributed import reference as ref
from equivcheck.distributed.common import Outcome, from_flax, judge, mlp_example, to_flax, tolerance_for
from equivcheck.engine.compare import format_args
from equivcheck.engine.records import RunSettings

POLICIES = ("pad", "drop", "pad_last")
SLIPS = ("drop", "pad_last", "mask")  # what a side off the padded reference is tried against
LRS = (0.05, 0.1, 0.5)


def rank_indices(size: int, world: int, remainder: str = "pad") -> list[list[int]]:
    """Each rank's sample indices for one epoch (shuffle=False), DistributedSampler's algorithm restated:
    "pad" (drop_last=False), "drop" (drop_last=True) or "pad_last". Raises ValueError for another policy."""
    indices = list(range(size))
    short = -size % world
    if remainder == "pad":
        indices += (indices * (short // max(size, 1) + 1))[:short]
    elif remainder == "drop":
        indices = indices[:size - size % world]
    elif remainder == "pad_last":
        indices += [size - 1] * short
    else:
        raise ValueError(f"no remainder policy {remainder!r}; known: {', '.join(POLICIES)}")
    return [indices[r::world] for r in range(world)]


def epoch(params: ref.Tree, x: np.ndarray, y: np.ndarray, world: int, batch: int, lr: float,
          remainder: str = "pad") -> dict[str, Any]:
    """One epoch of full-batch SGD in float64 on each step's global batch: {"grads": the last step's
    gradient, "params": after the epoch, "steps": the step count}. `remainder` is a policy of
    rank_indices, or "mask": padded as "pad", the padded rows left out of each step's loss."""
    size = x.shape[0]
    order = rank_indices(size, world, "pad" if remainder == "mask" else remainder)
    # the padded list's positions, dealt as the indices are: a position past the dataset's end is padding
    slots = rank_indices(len(order[0]) * world, world, "drop")
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    g: ref.Tree = {}
    steps = 0
    for start in range(0, len(order[0]), batch):
        rows = np.concatenate([o[start:start + batch] for o in order]).astype(int)
        if remainder == "mask":
            rows = rows[np.concatenate([q[start:start + batch] for q in slots]) < size]
        g = ref.grads(p, x[rows], y[rows])
        p = {k: p[k] - lr * g[k] for k in p}
        steps += 1
    return {"grads": g, "params": p, "steps": steps}


def _repeated(k: int) -> str:
    return "sample 0 repeated" if k == 1 else f"samples 0..{k - 1} repeated"


def remainder_slip(side: str, key: str, got: ref.Tree, params: ref.Tree, x: np.ndarray, y: np.ndarray, world: int,
                   batch: int, lr: float, tol: Any) -> str:
    """What `side`'s `key` ("grads" or "params") fits when it is off the padded reference, in words."""
    size = x.shape[0]
    k, r = -size % world, size % world
    for policy in SLIPS:
        if ref.close(got, epoch(params, x, y, world, batch, lr, policy)[key], tol):
            did = {"drop": f"dropped the last {r} sample{'s' * (r > 1)}",
                   "pad_last": f"padded with sample {size - 1} (the last) repeated {k} times",
                   "mask": f"masked the {k} padded sample{'s' * (k > 1)} out of the loss (each step's mean over "
                           "its real samples only)"}[policy]
            if side == "torch":
                return (f"the reference pads as DistributedSampler(drop_last=False) does ({_repeated(k)}); torch's "
                        f"ranks {did}" + (" (drop_last=True)" if policy == "drop" else ""))
            return f"torch's ranks see a padded batch ({_repeated(k)}); the JAX side {did}"
    return (f"{side}'s {key} fit no remainder policy known (pad with samples 0..k-1, drop, pad with the last, "
            "mask the padding out of the loss)")


def dataset(pair: Any, dtype: str, seed: int, size: int) -> tuple[ref.Tree, np.ndarray, np.ndarray]:
    """The MLP's parameters and a dataset of `size` samples from `seed`."""
    params, x, y = mlp_example(pair, dtype, seed, -(-size // pair.world))
    return params, x[:size], y[:size]


def strategy(pair: Any) -> st.SearchStrategy:
    """(seed, lr, D): D from N to 5N, so that N divides some sizes and not others."""
    return st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(LRS), st.integers(pair.world, 5 * pair.world))


def sides(pair: Any, pool: Any, params: ref.Tree, x: np.ndarray, y: np.ndarray, batch: int, lr: float,
          seconds: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    kw = {"params": params, "x": x, "y": y, "batch": batch, "lr": lr}
    t = pool.torch(pair.torch_job or "ddp_epoch", [{**kw, "slips": pair.torch_slips}] * pair.world, seconds)
    j = pool.jax(pair.jax_job or "ddp_epoch", {**kw, "params": to_flax(params), "slips": pair.jax_slips}, seconds,
                 world=pair.world)
    return t, {"grads": from_flax(j["grads"]), "params": from_flax(j["params"]), "steps": j["steps"]}


def example(pair: Any, pool: Any, drawn: Any, dtype: str, run: RunSettings, batch: int, seconds: float) -> Outcome:
    """One drawn dataset: torch's sampler indices against the restated padding, then the last step's
    gradient and the parameters after the epoch, torch against JAX, each against the float64 epoch."""
    seed, lr, size = drawn
    params, x, y = dataset(pair, dtype, seed, size)
    t, j = sides(pair, pool, params, x, y, batch, lr, seconds)
    n = pair.world
    want = epoch(params, x, y, n, batch, lr)
    seen = [list(map(int, r["indices"])) for r in t]
    inputs = (f"MLP {pair.sizes} from seed {seed}, dataset of {size} samples over {n} ranks ({size % n} left over), "
              f"{batch} rows per rank and step, lr {lr:g}: " + format_args([x, y]))
    if seen != rank_indices(size, n, "drop" if pair.torch_slips.get("drop_last") else "pad"):
        out = Outcome(False, float("inf"), f"torch's DistributedSampler gave ranks {seen}, not the padding "
                      f"restated from its source {rank_indices(size, n)}", "torch",
                      "torch's sampler pads otherwise than this torch's source says", inputs=inputs)
        return out
    grad_tol = tolerance_for(pair, dtype, run, "grads")
    slip = lambda key, tol: lambda side, got: remainder_slip(side, key, got, params, x, y, n, batch, lr, tol)
    out = judge(t[0]["grads"], j["grads"], want["grads"], grad_tol,
                f"gradient of the epoch's last step (of {want['steps']}; {size} samples, {n} ranks)",
                slip("grads", grad_tol))
    if out.ok:
        tol = tolerance_for(pair, dtype, run, "train").scaled(want["steps"], f"after {want['steps']} steps")
        out = judge(t[0]["params"], j["params"], want["params"], tol,
                    f"parameters after the epoch ({want['steps']} steps)", slip("params", tol))
    out.inputs = inputs
    return out


def warm(pair: Any, pool: Any, dtype: str, batch: int, seconds: float) -> None:
    """Every step shape once (last batches of 1..batch rows per rank): XLA's compilations."""
    for last in range(1, batch + 1):
        params, x, y = dataset(pair, dtype, 0, pair.world * (batch + last))
        sides(pair, pool, params, x, y, batch, LRS[0], seconds)
