"""Optimizer state between torch.optim and optax, through one neutral form.

The neutral form is a plain dict of NumPy values keyed by torch's own names:
`{"step": k, "exp_avg": <tree like params>, "exp_avg_sq": <tree>, ...}` plus, for a
schedule with state of its own, `"sched": {...}`. Both sides convert to and from it, so a
checkpoint's optimizer state moves between frameworks and training continues identically
(the `mlp` check moves it mid-run, both ways, and compares every later step).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class StateField:
    """One entry of torch's per-parameter state and where optax keeps it.

    torch      key in `optimizer.state[p]` ("exp_avg")
    optax      field of a NamedTuple inside the optax state ("mu"); "" with `derive`, for
               what torch keeps and optax computes from the step (NAdam's mu_product
               when optax.nadam matches it)
    scale      optax value = scale * torch value (RMSprop momentum: optax traces -lr * buf)
    scalar     torch keeps one scalar per parameter, optax one for the whole tree (mu_product)
    """

    torch: str
    optax: str  # "" for a value optax does not keep: `derive(step)` gives it
    scale: float = 1.0
    scalar: bool = False
    derive: Callable[[int], Any] | None = None


# NamedTuple fields that count optimizer steps in optax states.
COUNT_FIELDS = ("count", "gradient_step")


@dataclasses.dataclass(frozen=True)
class StateMap:
    """How one optimizer's state reads in both frameworks.

    `torch_step`: whether torch keeps a per-parameter "step" (SGD does not: its step is
    the scheduler's, or the caller's). `sched`: the schedule's own state, if any
    (ReduceLROnPlateau), as (to_neutral(scheduler), load(scheduler, neutral), optax fields).
    """

    fields: tuple[StateField, ...] = ()
    torch_step: bool = True
    sched: Any = None

    def keys(self) -> list[str]:
        return [f.torch for f in self.fields]


# ---- the torch side -------------------------------------------------------------------

def held(optimizer: Any) -> list[Any]:
    """The optimizer's parameters in torch's own order: group by group."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def widen(tree: Any) -> Any:
    """A nested dict of arrays with each floating leaf as float64; integer and bool leaves (step
    counts, class labels) keep their dtype, so a float64 re-run sees the same kinds of values."""
    if isinstance(tree, dict):
        return {k: widen(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def widen_state(neutral: Mapping[str, Any], smap: StateMap) -> dict[str, Any]:
    """The neutral state with every mapped field widened (see `widen`); other keys as they are."""
    out = dict(neutral)
    for f in smap.fields:
        out[f.torch] = widen(neutral[f.torch])
    return out


def torch_to_neutral(optimizer: Any, smap: StateMap, treedef: Any, step: int, scheduler: Any = None, *,
                     params: Sequence[Any] | None = None) -> dict[str, Any]:
    """The neutral state of a torch optimizer holding the leaves of `treedef`: `params`, the
    tensors in tree order (with param groups the optimizer holds them group by group), or by
    default its own order. The step is torch's own per-parameter count, else the scheduler's,
    else the caller's `step`. A buffer torch has not created yet (SGD's momentum before the first
    step) reads as zeros, which is what optax starts from."""
    import torch

    params = held(optimizer) if params is None else params
    steps = [optimizer.state[p]["step"] for p in params if "step" in optimizer.state.get(p, {})]
    if smap.torch_step and steps:
        step = float(steps[0])
    elif scheduler is not None and hasattr(scheduler, "last_epoch"):
        step = scheduler.last_epoch
    out: dict[str, Any] = {"step": np.asarray(float(step))}
    for f in smap.fields:
        vals = []
        for p in params:
            v = optimizer.state.get(p, {}).get(f.torch)
            if v is None:
                v = torch.ones(()) if f.scalar else torch.zeros_like(p)
            vals.append(v.detach().cpu().numpy().copy())
        # a scalar's dtype is bookkeeping: torch keeps mu_product in float32 until a
        # load_state_dict casts it to the parameters' dtype
        out[f.torch] = np.asarray(vals[0], np.float64) if f.scalar else treedef.unflatten(vals)
    if smap.sched is not None and scheduler is not None:
        out["sched"] = smap.sched.torch_to_neutral(scheduler)
    return out


def load_torch(optimizer: Any, smap: StateMap, treedef: Any, neutral: Mapping[str, Any], scheduler: Any = None, *,
               params: Sequence[Any] | None = None) -> None:
    """Put a neutral state into a fresh torch optimizer (and its scheduler); `params` as in
    torch_to_neutral."""
    import torch

    # load_state_dict numbers the parameters group by group
    index = {id(p): k for k, p in enumerate(held(optimizer))}
    params = held(optimizer) if params is None else params
    step = int(np.asarray(neutral["step"]))
    leaves = {f.torch: (None if f.scalar else treedef.flatten_up_to(neutral[f.torch])) for f in smap.fields}
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        entry: dict[str, Any] = {}
        if smap.torch_step:
            entry["step"] = torch.tensor(float(step), dtype=torch.get_default_dtype())
        for f in smap.fields:
            value = neutral[f.torch] if f.scalar else leaves[f.torch][i]
            entry[f.torch] = torch.tensor(np.array(value), dtype=torch.get_default_dtype() if f.scalar else p.dtype)
        state[index[id(p)]] = entry
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state if step else {}, "param_groups": sd["param_groups"]})
    if scheduler is not None:
        if smap.sched is not None and "sched" in neutral:
            smap.sched.load_torch(scheduler, neutral["sched"])
            scheduler.last_epoch = step
        else:
            _advance(scheduler, step)


def _advance(scheduler: Any, steps: int) -> None:
    """A stateless schedule resumes by stepping it `steps` times (torch's chainable schedules
    read the group's current lr, so setting last_epoch alone is not enough)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
        for _ in range(steps):
            scheduler.step()


# ---- the optax side -------------------------------------------------------------------

def _walk(state: Any, visit: Callable[[Any], Any]) -> Any:
    """Rebuild an optax state, letting `visit` replace each NamedTuple (after its children)."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        rebuilt = type(state)(*[_walk(getattr(state, n), visit) for n in state._fields])
        return visit(rebuilt)
    if isinstance(state, (tuple, list)):
        return type(state)(_walk(s, visit) for s in state)
    if isinstance(state, Mapping) and not any(hasattr(v, "shape") for v in state.values()):
        return {k: _walk(v, visit) for k, v in state.items()}
    return state


def _named(state: Any) -> list[Any]:
    found: list[Any] = []
    _walk(state, lambda nt: found.append(nt) or nt)
    return found


def optax_to_neutral(opt_state: Any, smap: StateMap, step: int) -> dict[str, Any]:
    """The neutral state of an optax state built by the matching transformation. The step
    is the state's own count where it keeps one, else the caller's `step`."""
    import jax

    tuples = _named(opt_state)
    counts = [getattr(nt, c) for nt in tuples for c in COUNT_FIELDS if c in nt._fields and not _plateau(nt)]
    out: dict[str, Any] = {"step": np.asarray(float(np.asarray(counts[0]) if counts else step))}
    for f in smap.fields:
        if f.derive is not None:
            out[f.torch] = np.asarray(f.derive(int(out["step"])), np.float64)
            continue
        value = getattr(_owner(tuples, f.optax), f.optax)
        out[f.torch] = jax.tree.map(lambda x, k=f.scale: np.asarray(x) / k if k != 1.0 else np.asarray(x), value)
        if f.scalar:
            out[f.torch] = np.asarray(out[f.torch], np.float64)
    if smap.sched is not None:
        out["sched"] = smap.sched.optax_to_neutral(tuples)
    return out


class StateMapError(KeyError):
    """The pair's state_map names a field the optimizer state does not have: the pair's
    declaration is off, not either side's steps."""

    def __str__(self) -> str:  # KeyError's own quotes its message
        return str(self.args[0]) if self.args else ""


def _plateau(nt: Any) -> bool:
    """optax's ReduceLROnPlateauState has a `count` of loss values averaged, not of steps."""
    return "plateau_count" in nt._fields


def _owner(tuples: Sequence[Any], field: str) -> Any:
    owners = [nt for nt in tuples if field in nt._fields]
    if not owners:
        names = sorted({f for nt in tuples for f in nt._fields})
        raise StateMapError(f"the pair's state_map names the optax field {field!r}, which the optax state does not "
                            f"have; " + (f"its fields: {', '.join(names)}" if names else "it has no fields"))
    return owners[0]


def neutral_to_optax(template: Any, smap: StateMap, neutral: Mapping[str, Any]) -> Any:
    """`template` (the structure of tx.init(params)) with the neutral state's values put in place."""
    import jax

    step = int(np.asarray(neutral["step"]))
    by_field = {f.optax: f for f in smap.fields}
    seen: set[str] = set()

    def visit(nt: Any) -> Any:
        changes: dict[str, Any] = {}
        for name in nt._fields:
            old = getattr(nt, name)
            # NumPy only: an eager JAX conversion compiles once per shape and dtype
            if name in COUNT_FIELDS and not _plateau(nt):
                changes[name] = np.asarray(step, np.asarray(old).dtype)
            elif name in by_field and name not in seen:
                f = by_field[name]
                seen.add(name)
                value = neutral[f.torch]
                changes[name] = jax.tree.map(lambda o, v, k=f.scale: np.asarray(np.asarray(v) * k, np.asarray(o).dtype),
                                             old, value)
        if smap.sched is not None:
            changes.update(smap.sched.optax_fields(nt, neutral.get("sched"), step))
        return nt._replace(**changes) if changes else nt

    return _walk(template, visit)
