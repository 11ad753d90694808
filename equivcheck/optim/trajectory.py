"""One drawn optimizer example on both sides, compared step by step, and the trajectory tolerance.

Tolerance over a trajectory. A one-step comparison uses the table's bound for the dtype.
After n steps the bound is n times that (`trajectory_tolerance`): each step adds at most
one step's rounding difference, and a stable step does not amplify earlier differences.
The roundings of the two sides are correlated (the same formula in a different operation
order repeats the same bias every step), so they add linearly rather than as a random walk
(sqrt(n)): measured (benchmarks/optim_margins.py), the float32 error of Adam-like rows grows
as n**1.0-1.3 and uses 2-5% of the linear bound after 100 steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from equivcheck.backends import SideError
from equivcheck.backends.jax import x64
from equivcheck.engine.compare import Verdict, compare, flatten, format_args, leaves
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import Tolerance
from equivcheck.optim.problems import LINEAR, MLP, QUADRATIC
from equivcheck.optim.sides import MAX_STEPS, run_jax, run_torch, scan_length
from equivcheck.optim.state import StateMapError

__all__ = ["BUCKETS", "GROWTH", "PROBLEM_OF", "Example", "Outcome", "compare_steps", "evaluate", "lr_sequences",
           "rate_tolerance", "trajectory_tolerance"]

GROWTH = "linear"
BUCKETS = ((1, 1), (2, 10), (11, 30), (31, MAX_STEPS))
PROBLEM_OF = {"step": LINEAR, "quadratic": QUADRATIC, "mlp": MLP}


def trajectory_tolerance(base: Tolerance, n: int) -> Tolerance:
    """The bound after n steps: n times the one-step bound (see the module docstring)."""
    return base if n <= 1 else base.scaled(n, f"after {n} steps (linear accumulation)")


@dataclasses.dataclass
class Example:
    check: str
    params: Any = None
    data: Any = None
    steps: int = 1
    split: int = 0  # mlp: the step after which the state moves to the other framework

    def describe(self) -> str:
        head = f"{self.steps} step{'s' * (self.steps != 1)}" + (f", state moved after step {self.split}" if self.split else "")
        if self.params is None:
            return head
        parts = [f"{path.replace('out', '', 1)}: {format_args([x]).removeprefix('arg0: ')}"
                 for path, x in flatten({"params": self.params, "data": self.data})]
        return f"{head}; " + "; ".join(parts)


@dataclasses.dataclass
class Outcome:
    ok: bool
    verdict: Verdict | None = None
    step: int = 0  # the first step out of tolerance (1-based, counted from the start or the move)
    where: str = ""  # after a state move: which direction
    ratios: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (n, error / one-step bound)
    side_error: str | None = None
    offset: int = 0  # steps before the compared stretch (after a state move: the step it moved at)
    torch_at: Any = None  # both sides at the failing step
    jax_at: Any = None
    start: Any = None  # after a state move: {"params", "state"} both sides continued from
    after: tuple[list[Any], list[Any]] = ((), ())  # (torch's, optax's) steps from the failing one to the last

    @property
    def global_step(self) -> int:
        return self.offset + self.step

    @property
    def model_ratio(self) -> float:
        return max((r / n for n, r in self.ratios), default=0.0)


# Learning rates, and a plateau schedule's lr scale: compared relative to their largest value
# in the trajectory. The dtype's absolute floor (1e-5 in float32) would pass a schedule off by
# 10% at lr 1e-4, or an lr reduced to 1e-10 where the other side stopped at 1e-7.
RATES = ("['lr']", "['scale']")


def rate_tolerance(base: Tolerance, peak: float) -> Tolerance:
    return dataclasses.replace(base, atol=base.rtol * peak,
                               reason=f"{base.reason}; a learning rate: atol = rtol x its peak {peak:.3g}")


def _signature(tree: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    return [(path, np.shape(x), np.asarray(x).dtype) for path, x in flatten(tree)]


def compare_steps(torch_steps: list[Any], jax_steps: list[Any], base: Tolerance, where: str = "",
                  offset: int = 0) -> Outcome:
    """Compare step by step; stop at the first step outside the bound for its step count.

    All steps of a leaf are compared in one vectorised pass (a 100-step trajectory has
    thousands of leaf-steps); the first failing step is then compared again in full, for
    the standard message and worst element.
    """
    out = Outcome(True, where=where, offset=offset)
    if not torch_steps:
        return out
    # structure, shapes and dtypes from step 1 (the same for every step); the full comparison
    # only where they differ, for its message
    signature = _signature(torch_steps[0])
    if signature != _signature(jax_steps[0]):
        first = compare(torch_steps[0], jax_steps[0], base)
        if not first.ok and first.kind != "values":
            first.message = f"step 1{where}: {first.message}"
            return dataclasses.replace(out, ok=False, verdict=first, step=1, torch_at=torch_steps[0],
                                       jax_at=jax_steps[0])
    n = min(len(torch_steps), len(jax_steps))
    t_flat = [leaves(s) for s in torch_steps[:n]]
    j_flat = [leaves(s) for s in jax_steps[:n]]
    ratios, nonfinite = np.zeros(n), np.zeros(n, bool)
    rates: dict[str, Tolerance] = {}
    for k, (path, _, _) in enumerate(signature):
        t = np.asarray(np.stack([f[k] for f in t_flat]), np.float64).reshape(n, -1)
        j = np.asarray(np.stack([f[k] for f in j_flat]), np.float64).reshape(n, -1)
        if t.shape[1] == 0:
            continue
        t_nan, j_nan, t_inf, j_inf = np.isnan(t), np.isnan(j), np.isinf(t), np.isinf(j)
        nonfinite |= ((t_nan != j_nan) | (t_inf != j_inf) | (t_inf & (t != j))).any(1)
        ok = ~(t_nan | t_inf | j_nan | j_inf)
        tf, jf = np.where(ok, t, 0.0), np.where(ok, j, 0.0)
        tol = base
        if path.endswith(RATES):
            tol = rates[path] = rate_tolerance(base, max(np.abs(tf).max(), np.abs(jf).max()))
        err, allowed = np.abs(tf - jf), tol.atol + tol.rtol * np.maximum(np.abs(tf), np.abs(jf))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
        ratios = np.maximum(ratios, r.max(1))
    steps = np.arange(1, n + 1)
    bad = nonfinite | (ratios > steps)
    stop = int(np.argmax(bad)) if bad.any() else n
    out.ratios = [(int(a), float(b)) for a, b in zip(steps[:stop], ratios[:stop])]
    if stop == n:
        return out
    m = stop + 1
    v = compare(torch_steps[stop], jax_steps[stop], trajectory_tolerance(base, m),
                per_path={p: trajectory_tolerance(t, m) for p, t in rates.items()})
    v.message = f"step {m}{where}: first step out of tolerance; {v.message}"
    return dataclasses.replace(out, ok=False, verdict=v, step=m, torch_at=torch_steps[stop], jax_at=jax_steps[stop],
                               after=(list(torch_steps[stop:n]), list(jax_steps[stop:n])))


def evaluate(pair: Any, ex: Example, dtype: str, run: RunSettings, base: Tolerance,
             start: dict[str, Any] | None = None) -> Outcome:
    """One example of one check, both sides, compared."""
    if ex.check == "schedule":
        return _schedule(pair, ex, dtype, base)
    problem = PROBLEM_OF[ex.check]
    length = scan_length(ex.check)
    try:
        t_full = run_torch(pair, problem, ex.params, ex.data, ex.steps, dtype=dtype, device=run.device, start=start)
    except Exception as exc:
        return _side_error("torch", exc)
    try:
        j_full = run_jax(pair, problem, length, ex.params, ex.data, ex.steps, dtype=dtype, device=run.device,
                         start=start)
    except Exception as exc:
        return _side_error("jax", exc)
    whole = compare_steps(t_full, j_full, base)
    if ex.check != "mlp" or not whole.ok or not ex.split or not movable(pair):
        return whole
    # The same trajectory again, with the optimizer state moved to the other framework
    # after step k (a checkpoint converted mid-run): training must continue identically.
    k, rest = ex.split, ex.steps - ex.split
    at_t, at_j = t_full[k - 1], j_full[k - 1]
    try:
        j_cont = run_jax(pair, problem, length, at_t["params"], ex.data, rest, dtype=dtype, device=run.device,
                         start=at_t["state"], start_step=k)
    except Exception as exc:
        return _side_error("jax", exc, f" (continuing from torch's state after step {k})")
    try:
        t_cont = run_torch(pair, problem, at_j["params"], ex.data, rest, dtype=dtype, device=run.device,
                           start=at_j["state"], start_step=k)
    except Exception as exc:
        return _side_error("torch", exc, f" (continuing from optax's state after step {k})")
    moved = [compare_steps(t_full[k:], j_cont, base, f" after the move (torch's state moved to optax after step {k})", k),
             compare_steps(t_cont, j_full[k:], base, f" after the move (optax's state moved to torch after step {k})", k)]
    for o, at in zip(moved, (at_t, at_j)):
        if not o.ok:
            o.start = at  # the moved state both sides continued from
            return o
    whole.ratios += [r for o in moved for r in o.ratios]
    return whole


def movable(pair: Any) -> bool:
    """Whether the pair says how its state reads on both sides: a StateMap with fields or a
    schedule state, or a pair optimizer_pair built (its map is the whole state, none for plain
    SGD). A pair of your own without one: the mlp check trains on and compares, moving nothing."""
    smap = pair.state_map
    return bool(smap.fields) or smap.sched is not None or pair.hparams is not None


def _side_error(side: str, exc: BaseException, context: str = "") -> Outcome:
    if isinstance(exc, StateMapError):  # the pair's declaration, neither side's code: no side is named
        return Outcome(False, Verdict(False, "error", f"{exc}{context}"), side_error="the pair's state_map")
    err = SideError.from_exc(side, "optimizer step", exc)
    v = Verdict(False, "error", err.describe() + context, side=side)
    return Outcome(False, v, side_error=side)


def lr_sequences(pair: Any, steps: int, dtype: str) -> tuple[list[float], list[float]]:
    """torch's lr for each update (read before optimizer.step(), scheduler stepped after it)
    and optax's schedule(count) for the same updates."""
    import warnings

    import jax.numpy as jnp
    import torch


    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = pair.torch_optimizer([p])
    scheduler = pair.torch_scheduler(optimizer)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            scheduler.step()
    key = (id(pair), dtype)
    if key not in _LRS:
        import jax

        with x64(dtype == "float64"):  # one count at a time: a schedule need not broadcast over counts
            values = np.asarray(jax.jit(jax.vmap(pair.optax_schedule))(jnp.arange(MAX_STEPS)), np.float64)
        _LRS[key] = (pair, values)  # holding the pair keeps its id from being reused by another
    return lrs, [float(x) for x in _LRS[key][1][:steps]]


_LRS: dict[Any, tuple[Any, np.ndarray]] = {}  # the optax schedule's first MAX_STEPS values, per pair and dtype


def _schedule(pair: Any, ex: Example, dtype: str, base: Tolerance) -> Outcome:
    try:
        t, j = lr_sequences(pair, ex.steps, dtype)
    except Exception as exc:
        return _side_error("torch/jax", exc)
    return compare_steps([{"lr": np.asarray(x)} for x in t], [{"lr": np.asarray(x)} for x in j], base)


# ---- the Hypothesis loop ----------------------------------------------------------------
