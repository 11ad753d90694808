"""BatchNorm under data parallelism (checks "bn" and "bn_port"): Linear(d, h) -> BatchNorm(h) -> tanh ->
Linear(h, o), the mean squared error, `steps` SGD steps; each rank reads its B/N rows of the global batch.

What each side does:
  torch, plain BatchNorm1d under DDP (broadcast_buffers=True, the default): each rank normalises by its
         own shard's batch statistics (biased variance); at the start of every forward DDP broadcasts rank
         0's buffers, and each rank then updates running_mean / running_var (unbiased) with its own shard's
         statistics at momentum 0.1. So after K steps rank r holds rank 0's statistics of K-1 steps updated
         once with its own shard's; DDP averages the per-shard gradients.
  torch, SyncBatchNorm (sync=True): statistics over the global batch. torch 2.14 refuses CPU (DDP's
         constructor raises ValueError "SyncBatchNorm layers only work with GPU modules"; its forward
         would raise "expected input tensor to be on GPU"), so the
         "bn" check of a synced pair is a skip on CPU; it runs on GPUs (NCCL) and was never run here.
  JAX    the port (jax_bn.ddp_bn) in shard_map: without axis_name (per-device statistics) or with
         mean and E[x^2] pmean-ed over "ranks" (sync); running statistics in flax's momentum convention
         (0.9 = torch's 0.1), rank 0's carried into the next step as DDP does.
The float64 reference (`train`) computes exactly those semantics, per replica or synced; "bn_port"
checks the JAX port alone against it (the check that still runs on CPU for a synced pair).

Arrays: params torch layout BN_NAMES (bn.weight, bn.bias: (h,)), x (B, d), y (B, o), B = N * rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from equivcheck.distributed import reference as ref
from equivcheck.distributed.common import Outcome, judge, mlp_example, tolerance_for, worst
from equivcheck.engine.compare import compare, format_args, leaves
from equivcheck.engine.records import RunSettings

EPS = 1e-5
BN_NAMES = ("l1.weight", "l1.bias", "bn.weight", "bn.bias", "l2.weight", "l2.bias")
SYNC_ON_CPU = ("torch.nn.SyncBatchNorm refuses CPU in torch 2.14 (DDP's constructor raises ValueError: "
               "SyncBatchNorm layers only work with GPU modules); on CPU the 'bn_port' check holds the JAX port's synced statistics "
               "to the float64 reference of global-batch statistics")


def skip_reason(pair: Any, check: str, device: str) -> str:
    """Why `check` of `pair` cannot run on `device` ("" if it can)."""
    return SYNC_ON_CPU if check == "bn" and pair.sync and device == "cpu" else ""


def example_params(pair: Any, dtype: str, seed: int, rows: int) -> tuple[ref.Tree, np.ndarray, np.ndarray]:
    """Torch-layout parameters (BN_NAMES) and a global batch (N * rows, d) / (N * rows, o) from `seed`."""
    params, x, y = mlp_example(pair, dtype, seed, rows)
    rng = np.random.default_rng(seed + 1)
    h = params["l1.bias"].shape[0]
    dt = params["l1.bias"].dtype
    params.update({"bn.weight": (1.0 + rng.normal(0, 0.1, h)).astype(dt), "bn.bias": rng.normal(0, 0.1, h).astype(dt)})
    return {k: params[k] for k in BN_NAMES}, x, y


def to_port(params: ref.Tree) -> dict[str, Any]:
    """Torch layout -> the JAX port's tree (kernels transposed, bn weight -> scale)."""
    lin = lambda k: {"kernel": np.ascontiguousarray(params[f"{k}.weight"].T), "bias": params[f"{k}.bias"]}
    return {"l1": lin("l1"), "bn": {"scale": params["bn.weight"], "bias": params["bn.bias"]}, "l2": lin("l2")}


def from_port(tree: dict[str, Any]) -> ref.Tree:
    out = {f"{k}.weight": np.asarray(tree[k]["kernel"]).T for k in ("l1", "l2")}
    out.update({f"{k}.bias": np.asarray(tree[k]["bias"]) for k in ("l1", "bn", "l2")})
    out["bn.weight"] = np.asarray(tree["bn"]["scale"])
    return {k: out[k] for k in BN_NAMES}


def _shard(p: ref.Tree, x: np.ndarray, y: np.ndarray, mean: np.ndarray, var: np.ndarray, scale: float
           ) -> tuple[np.ndarray, ref.Tree, np.ndarray]:
    """Forward and backward of one shard normalised by (mean, var) (its own statistics, or its group's):
    (outputs, the gradients of scale * its mean loss but for l1's, the gradient at the normalised
    pre-activations, which `_grads` takes back through the group's statistics to l1)."""
    z = x @ p["l1.weight"].T + p["l1.bias"]
    inv = 1.0 / np.sqrt(var + EPS)
    zh = (z - mean) * inv
    h = np.tanh(zh * p["bn.weight"] + p["bn.bias"])
    out = h @ p["l2.weight"].T + p["l2.bias"]
    d_out = scale * 2.0 * (out - y) / out.size
    d_a = (d_out @ p["l2.weight"]) * (1.0 - h * h)
    g = {"l2.weight": d_out.T @ h, "l2.bias": d_out.sum(0), "bn.weight": (d_a * zh).sum(0), "bn.bias": d_a.sum(0)}
    return out, g, d_a * p["bn.weight"]


def _grads(p: ref.Tree, xs: list[np.ndarray], ys: list[np.ndarray], sync: bool) -> tuple[np.ndarray, ref.Tree]:
    """The outputs (rank after rank) and the DDP gradient: the mean over ranks of each shard's mean-loss
    gradient, the statistics per shard or (sync) over the union of the shards."""
    zs = [x @ p["l1.weight"].T + p["l1.bias"] for x in xs]
    groups = [list(range(len(xs)))] if sync else [[r] for r in range(len(xs))]
    outs, total = [None] * len(xs), {k: np.zeros_like(v) for k, v in p.items()}
    for group in groups:
        z = np.concatenate([zs[r] for r in group])
        mean, var = z.mean(0), z.var(0)
        zh, inv = (z - mean) / np.sqrt(var + EPS), 1.0 / np.sqrt(var + EPS)
        parts = [_shard(p, xs[r], ys[r], mean, var, 1.0 / len(xs)) for r in group]
        d_zh = np.concatenate([pt[2] for pt in parts])
        d_z = inv * (d_zh - d_zh.mean(0) - zh * (d_zh * zh).mean(0))  # backward through the group's statistics
        x = np.concatenate([xs[r] for r in group])
        for r, pt in zip(group, parts):
            outs[r] = pt[0]
            for k, v in pt[1].items():
                total[k] += v
        total["l1.weight"] += d_z.T @ x
        total["l1.bias"] += d_z.sum(0)
    return np.concatenate(outs), total


def train(params: ref.Tree, x: np.ndarray, y: np.ndarray, world: int, lr: float, steps: int, sync: bool,
          momentum: float = 0.1, carry: Any = "rank0") -> dict[str, Any]:
    """The float64 reference: {"out": the first forward's outputs (B, o), "grads": the first gradients,
    "params": after `steps` SGD steps, "running_mean", "running_var": (world, h) per rank}. momentum in
    torch's convention (running = (1 - m) * running + m * batch); carry: the statistics each forward starts
    from: "rank0" (DDP's broadcast), "mean" (averaged over ranks), a rank, or "own" (no broadcast)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs, ys = np.split(np.asarray(x, np.float64), world), np.split(np.asarray(y, np.float64), world)
    h = p["l1.bias"].shape[0]
    rm, rv = np.zeros((world, h)), np.ones((world, h))
    got: dict[str, Any] = {}
    for step in range(steps):
        zs = [xr @ p["l1.weight"].T + p["l1.bias"] for xr in xs]
        stats = [np.concatenate(zs)] * world if sync else zs
        start = {"rank0": lambda a: a[[0] * world], "mean": lambda a: np.repeat(a.mean(0, keepdims=True), world, 0),
                 "own": lambda a: a}.get(carry, lambda a: a[[int(carry)] * world])
        rm, rv = start(rm), start(rv)
        rm = (1 - momentum) * rm + momentum * np.stack([z.mean(0) for z in stats])
        rv = (1 - momentum) * rv + momentum * np.stack([z.var(0, ddof=1) for z in stats])
        out, g = _grads(p, xs, ys, sync)
        if step == 0:
            got["out"], got["grads"] = out, g
        p = {k: p[k] - lr * g[k] for k in p}
    return {**got, "params": p, "running_mean": rm, "running_var": rv}


def _fits(got: Any, want: Any, tol: Any) -> bool:
    return ref.close(got, want, tol)


def bn_slip(side: str, key: str, got: Any, args: tuple[Any, ...], sync: bool, tol: Any) -> str:
    """What `side`'s `key` (out, grads, params or running) fits when it is off the reference of
    `train(*args, sync=sync)`, in words; args = (params, x, y, world, lr, steps)."""
    world = args[3]
    pick = (lambda r: {"running_mean": r["running_mean"], "running_var": r["running_var"]}) if key == "running" \
        else (lambda r: r[key])
    other = "torch's SyncBatchNorm" if sync else "torch's plain BatchNorm under DDP"
    if _fits(got, pick(train(*args, sync=not sync)), tol):
        if sync:
            return (f"BatchNorm statistics not synchronised where the other side syncs: {side} normalises each "
                    f"replica by its own shard's statistics, {other} (and the reference) by the global batch's")
        return (f"BatchNorm statistics synchronised where the other side does not: {side} normalises by the "
                f"global batch's statistics over {world} replicas (axis_name / pmean), {other} each replica by "
                "its own shard's")
    if key != "running":
        return ""
    momentum = ("torch's momentum set to 0.9 (flax's number for torch's 0.1)" if side == "torch" else
                "flax's momentum set to 0.1 (torch's number; flax's convention needs 0.9)")
    fits = [({"momentum": 0.9}, (f"{side}'s running statistics fit momentum 0.9 in torch's convention (running = "
             f"0.1 * running + 0.9 * batch): {momentum}, a momentum slip")),
            ({"carry": "mean"}, (f"{side}'s running statistics are averaged over the replicas each step; DDP "
             "broadcasts rank 0's (broadcast_buffers=True)")),
            ({"carry": "own"}, (f"{side}'s ranks each keep their own running statistics: DDP broadcasts rank "
             "0's at every forward (broadcast_buffers=False on this side)"))]
    fits += [({"carry": r}, (f"{side} carries rank {r}'s running statistics into the next step; DDP broadcasts "
              "rank 0's")) for r in range(1, world)]
    for kw, words in fits:
        if words and _fits(got, pick(train(*args, sync=sync, **kw)), tol):
            return words
    return f"{side}'s running statistics fit no known slip (momentum, averaged or another rank's statistics)"


def strategy() -> st.SearchStrategy:
    return st.tuples(st.integers(0, 2**32 - 1), st.sampled_from((0.05, 0.1, 0.5)))


def sides(pair: Any, check: str, pool: Any, params: ref.Tree, x: np.ndarray, y: np.ndarray, lr: float,
          seconds: float) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(torch's results, rank 0's with the ranks' running statistics stacked (N, h); None for "bn_port"),
    the JAX port's (torch layout)."""
    kw = {"x": x, "y": y, "lr": lr, "steps": pair.steps, "sync": pair.sync}
    t = None
    if check == "bn":
        ranks = pool.torch(pair.torch_job or "ddp_bn", [{**kw, "params": params, "slips": pair.torch_slips}]
                           * pair.world, seconds)
        t = {**ranks[0], "out": np.concatenate([r["out"] for r in ranks]),
             "running_mean": np.stack([r["running_mean"] for r in ranks]),
             "running_var": np.stack([r["running_var"] for r in ranks])}
    j = pool.jax(pair.jax_job or "ddp_bn", {**kw, "params": to_port(params), "slips": pair.jax_slips}, seconds,
                 world=pair.world)
    return t, {**j, "grads": from_port(j["grads"]), "params": from_port(j["params"])}


def _port_only(j: Any, want: Any, tol: Any, what: str, slip: Any) -> Outcome:
    """The JAX port alone against the float64 reference (torch cannot run: SyncBatchNorm on CPU)."""
    v = compare(j, ref.cast(want, np.asarray(leaves(j)[0]).dtype), tol)
    if v.ok:
        return Outcome(True, v.ratio)
    return Outcome(False, v.ratio, f"{what}: jax is off the float64 reference: {worst(v, 'jax', 'reference')}",
                   "jax", slip("jax", j), verdict=v)


def condition(params: ref.Tree, x: np.ndarray, world: int, sync: bool) -> float:
    """kappa = max over shards (the global batch when synced) and features of max|z| / std(z), z the
    pre-normalisation activations at the start. Rounding leaves z off by ~eps * max|z|, and the norm
    divides z - mean by std, so relative errors downstream of it (outputs, and BatchNorm's backward
    to l1 most of all) grow by kappa. Typically 2-4; a feature whose shard values nearly coincide makes it
    large (17 in a float32 example, where JAX's l1 gradient was 7x the unscaled bound off float64)."""
    groups = [np.asarray(x, np.float64)] if sync else np.split(np.asarray(x, np.float64), world)
    w, b = np.asarray(params["l1.weight"], np.float64), np.asarray(params["l1.bias"], np.float64)
    return max(float((np.abs(z).max(0) / np.sqrt(z.var(0) + EPS)).max()) for z in (g @ w.T + b for g in groups))


def example(pair: Any, check: str, pool: Any, drawn: Any, dtype: str, run: RunSettings, rows: int,
            seconds: float) -> Outcome:
    """One drawn (seed, lr): the first forward's outputs, the first gradients, the parameters and the
    ranks' running statistics after `steps` steps, in that order; the first that fails is the outcome."""
    seed, lr = drawn
    params, x, y = example_params(pair, dtype, seed, rows)
    t, j = sides(pair, check, pool, params, x, y, lr, seconds)
    args = (params, x, y, pair.world, lr, pair.steps)
    want = train(*args, sync=pair.sync)
    kappa = max(1.0, condition(params, x, pair.world, pair.sync))
    why = f"BatchNorm's conditioning kappa = max|z| / std(z) = {kappa:.3g} (batchnorm.condition)"
    grad_tol = tolerance_for(pair, dtype, run, "grads").scaled(kappa, why)
    late = tolerance_for(pair, dtype, run, "train").scaled(pair.steps * kappa, f"after {pair.steps} steps; {why}")
    stats = lambda r: {"running_mean": r["running_mean"], "running_var": r["running_var"]}
    norm = "SyncBatchNorm (global-batch statistics)" if pair.sync else "per-replica BatchNorm statistics"
    out = Outcome(True)
    for key, tol, what in (("out", grad_tol, "outputs of the first forward"), ("grads", grad_tol, "first gradients"),
                           ("params", late, f"parameters after {pair.steps} steps"),
                           ("running", late, f"ranks' running statistics after {pair.steps} steps")):
        get = stats if key == "running" else (lambda r, key=key: r[key])
        slip = lambda side, got, key=key, tol=tol: bn_slip(side, key, got, args, pair.sync, tol)
        what = f"{what} ({norm}, {pair.world} ranks)"
        step = _port_only(get(j), get(want), tol, what, slip) if t is None else \
            judge(get(t), get(j), get(want), tol, what, slip)
        out = Outcome(out.ok and step.ok, max(out.ratio, step.ratio))
        if not step.ok:
            out = step
            break
    out.inputs = (f"BatchNorm MLP {pair.sizes} from seed {seed}, global batch of {x.shape[0]} ({rows} rows per "
                  f"rank), lr {lr:g}, {pair.steps} steps, kappa {kappa:.3g}: " + format_args([x, y]))
    return out


def warm(pair: Any, check: str, pool: Any, dtype: str, rows: int, seconds: float) -> None:
    params, x, y = example_params(pair, dtype, 0, rows)
    sides(pair, check, pool, params, x, y, 0.1, seconds)
