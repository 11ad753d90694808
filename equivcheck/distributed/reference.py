"""Float64 NumPy references for the distributed checks, and the slips read from a side's results.

The reference of a collective is the sum / mean / max / concatenation of the per-rank inputs in
float64; that of data-parallel training is single-process, full-batch training of the same MLP in
float64 (hand-written backward: tanh MLP, mean squared error). Where one side is off, `gradient_slip`
and `update_slip` say what kind of mistake its numbers fit: a gradient N times (or 1/N of) the
full-batch one, a rank that read another rank's shard, a step N times the reference's with the right
gradient (a learning rate scaled by N).

Parameter trees here are torch's layout: {"l1.weight": (h, d), "l1.bias": (h,), "l2.weight": (o, h),
"l2.bias": (o,)}; batches x (B, d), y (B, o) with B a multiple of the world size N.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance

Tree = dict[str, np.ndarray]
COLLECTIVES = ("all_reduce_sum", "all_reduce_mean", "all_reduce_max", "all_gather", "reduce_scatter", "broadcast")
MLP = "mlp"  # the one model: Linear(d, h) -> tanh -> Linear(h, o); DDP against shard_map + pmean
FSDP_MLP = "fsdp_mlp"  # the same under FSDP2 fully_shard against parameters sharded over the mesh axis
UNEVEN_MLP = "uneven_mlp"  # one epoch through DistributedSampler(drop_last=False): the uneven last batch
BN_MLP = "bn_mlp"  # Linear -> BatchNorm -> tanh -> Linear under DDP against the JAX port's BatchNorm
MODELS = (MLP, FSDP_MLP, UNEVEN_MLP, BN_MLP)


def collective(op: str, xs: list[np.ndarray], root: int = 0) -> list[np.ndarray]:
    """Each rank's result of `op` on the per-rank arrays `xs`, in float64. Raises ValueError for an
    unknown op, or for reduce_scatter when the leading dimension is not a multiple of N."""
    wide = [np.asarray(x, np.float64) for x in xs]
    n = len(wide)
    if op == "all_reduce_sum":
        out = [np.sum(wide, axis=0)] * n
    elif op == "all_reduce_mean":
        out = [np.sum(wide, axis=0) / n] * n
    elif op == "all_reduce_max":
        out = [np.max(wide, axis=0)] * n
    elif op == "all_gather":
        out = [np.concatenate(wide, axis=0)] * n
    elif op == "reduce_scatter":
        if wide[0].shape[0] % n:
            raise ValueError(f"reduce_scatter over {n} ranks needs a leading dimension divisible by {n}")
        out = np.split(np.sum(wide, axis=0), n, axis=0)
    elif op == "broadcast":
        out = [wide[root]] * n
    else:
        raise ValueError(f"no collective {op!r}; known: {', '.join(COLLECTIVES)}")
    return list(out)


def _forward(p: Tree, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.tanh(x @ p["l1.weight"].T + p["l1.bias"])
    return h, h @ p["l2.weight"].T + p["l2.bias"]


def grads(params: Tree, x: np.ndarray, y: np.ndarray) -> Tree:
    """The gradient of mean((mlp(x) - y)**2) over every element of the batch, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h, out = _forward(p, x)
    d_out = 2.0 * (out - y) / out.size
    d_z = (d_out @ p["l2.weight"]) * (1.0 - h * h)
    return {"l1.weight": d_z.T @ x, "l1.bias": d_z.sum(0), "l2.weight": d_out.T @ h, "l2.bias": d_out.sum(0)}


def sgd(params: Tree, x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> list[Tree]:
    """The parameters after each of `steps` full-batch SGD steps, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    trail = []
    for _ in range(steps):
        g = grads(p, x, y)
        p = {k: p[k] - lr * g[k] for k in p}
        trail.append(p)
    return trail


def cast(tree: Any, dtype: Any) -> Any:
    """`tree` (dicts, lists, arrays) with every array in `dtype`."""
    if isinstance(tree, dict):
        return {k: cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [cast(v, dtype) for v in tree]
    return np.asarray(tree).astype(dtype)


def close(got: Any, want: Any, tol: Tolerance) -> bool:
    """`got` matches the float64 `want` (cast to got's dtype) under `tol`."""
    dtype = np.asarray(next(iter(got.values())) if isinstance(got, dict) else got).dtype
    return compare(got, cast(want, dtype), tol).ok


def _factor(got: Tree, want: Tree) -> float:
    """The least-squares c with got ~ c * want (nan when want is all zero)."""
    g = np.concatenate([np.ravel(np.asarray(got[k], np.float64)) for k in sorted(want)])
    w = np.concatenate([np.ravel(want[k]) for k in sorted(want)])
    ww = float(w @ w)
    return float(g @ w) / ww if ww > 0 else float("nan")


def _scaled(got: Tree, want: Tree, factor: float, tol: Tolerance) -> bool:
    return close(got, {k: factor * v for k, v in want.items()}, tol)


def shard_swaps(x: np.ndarray, y: np.ndarray, n: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(r, s, x', y'): the global batch with rank r's shard replaced by rank s's, for every r != s."""
    rows = x.shape[0] // n
    out = []
    for r in range(n):
        for s in range(n):
            if r != s:
                x2, y2 = x.copy(), y.copy()
                x2[r * rows:(r + 1) * rows], y2[r * rows:(r + 1) * rows] = x[s * rows:(s + 1) * rows], \
                    y[s * rows:(s + 1) * rows]
                out.append((r, s, x2, y2))
    return out


def gradient_slip(side: str, got: Tree, params: Tree, x: np.ndarray, y: np.ndarray, n: int,
                  tol: Tolerance, accumulate: int = 1) -> str:
    """What `side`'s gradient `got` (off the full-batch reference) fits, in words; "" if nothing known.
    `accumulate`: micro-batches per step, whose gradients summed rather than averaged scale it by M."""
    want = grads(params, x, y)
    c = _factor(got, want)
    micro = (f"the {accumulate} micro-batches' gradients summed, not averaged (each loss not divided by the "
             "accumulation steps)") if accumulate > 1 else ""
    if _scaled(got, want, float(n), tol):
        return (f"{side}'s gradient is {n}x the full-batch gradient: summed, not averaged, over replicas "
                "(gradients all-reduced without dividing by N, or each shard's mean loss summed over ranks)"
                + (f", or {micro}" if micro and accumulate == n else ""))
    if micro and _scaled(got, want, float(accumulate), tol):
        return f"{side}'s gradient is {accumulate}x the full-batch gradient: {micro}"
    if _scaled(got, want, 1.0 / n, tol):
        return f"{side}'s gradient is 1/{n} of the full-batch gradient: averaged twice over replicas"
    for r, s, x2, y2 in shard_swaps(x, y, n):
        if close(got, grads(params, x2, y2), tol):
            return (f"{side}'s gradient is that of a batch where rank {r} read rank {s}'s shard: "
                    f"rank {r} reads the same shard as rank {s}")
    return f"{side}'s gradient is {c:.4g}x the full-batch gradient (by least squares); no known slip fits"


def update_slip(side: str, first: Tree, start: Tree, first_grad: Tree, lr: float, params: Tree, x: np.ndarray,
                y: np.ndarray, n: int, tol: Tolerance, grad_tol: Tolerance, accumulate: int = 1) -> str:
    """What `side`'s first SGD step fits: `first` the parameters after it, `start` before it,
    `first_grad` the side's own gradient at `start`; "" where the gradient itself is off (then
    `gradient_slip` says more)."""
    want_grad = grads(params, x, y)
    if not close(first_grad, want_grad, grad_tol):
        return gradient_slip(side, first_grad, params, x, y, n, grad_tol, accumulate)
    step = {k: np.asarray(first[k], np.float64) - np.asarray(start[k], np.float64) for k in start}
    ratio = _factor(step, {k: -lr * v for k, v in want_grad.items()})
    if _scaled(first, {k: start[k] - n * lr * want_grad[k] for k in start}, 1.0, tol):
        return (f"{side}'s gradient matches the full-batch one but its first step is {n}x the reference's: "
                f"the learning rate is scaled by N={n} on this side")
    return f"{side}'s gradient matches the full-batch one; its first step is {ratio:.4g}x the reference's"


def first_divergence(steps: list[tuple[Any, Any, Any]], tol_at: Callable[[int], Tolerance]) -> tuple[int, str] | None:
    """(step, who) of the first step (1-based) where torch, jax or the float64 reference part ways:
    steps[k] = (torch, jax, reference) after step k + 1 (reference None: torch against jax only, for a custom
    job without a float64 reference); who is "torch", "jax", "both" or "torch vs jax"."""
    for k, (t, j, ref) in enumerate(steps, start=1):
        tol = tol_at(k)
        t_ok, j_ok = (True, True) if ref is None else (close(t, ref, tol), close(j, ref, tol))
        if not (t_ok and j_ok and compare(t, j, tol).ok):
            who = "both" if not (t_ok or j_ok) else "torch" if not t_ok else "jax" if not j_ok else "torch vs jax"
            return k, who
    return None
