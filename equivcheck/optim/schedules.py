"""torch.optim.lr_scheduler -> optax schedules, with the step convention made explicit.

The convention, checked by the suite's `schedule` check: torch's loop is
`optimizer.step(); scheduler.step()`, so update t (1-based) uses the lr after t-1 scheduler
steps; optax evaluates `schedule(count)` with the count of updates already applied, so
update t uses `schedule(t - 1)`. The two agree with no shift: torch's lr after k scheduler
steps == optax's schedule(k). Calling `scheduler.step()` before `optimizer.step()` (or
evaluating the schedule at count + 1) shifts torch by one step, and the check says so.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optax

from equivcheck.optim import transforms as ot
from equivcheck.optim.mapping import Unmatched


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A torch scheduler by name and arguments: `Schedule("StepLR", step_size=30, gamma=0.5)`."""

    torch: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __init__(self, torch: str, **kwargs: Any) -> None:
        object.__setattr__(self, "torch", torch)
        object.__setattr__(self, "kwargs", dict(kwargs))

    def __repr__(self) -> str:
        return f"{self.torch}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"

    def torch_factory(self) -> Callable[[Any], Any]:
        import torch

        def build(optimizer: Any) -> Any:
            kw = dict(self.kwargs)
            if self.torch == "SequentialLR":
                kw["schedulers"] = [Schedule(s.torch, **s.kwargs).torch_factory()(optimizer) for s in kw["schedulers"]]
            return getattr(torch.optim.lr_scheduler, self.torch)(optimizer, **kw)

        return build

    @property
    def takes_loss(self) -> bool:
        return self.torch == "ReduceLROnPlateau"


@dataclasses.dataclass(frozen=True)
class MappedSchedule:
    schedule: Callable[[Any], Any] | None  # count -> lr, for scale_by_learning_rate
    transform: optax.GradientTransformationExtraArgs | None  # ReduceLROnPlateau: chained after the optimizer
    state: Any  # PlateauState for ReduceLROnPlateau
    parts: tuple[str, ...]


def map_schedule(spec: Schedule, lr: float) -> MappedSchedule:
    kw, name = dict(spec.kwargs), spec.torch
    if name == "ReduceLROnPlateau":
        return _plateau(kw, lr)
    fn, part = _schedule_fn(name, kw, lr)
    return MappedSchedule(float_count(fn), None, None, (part + " at a float count",))


def float_count(schedule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The schedule evaluated at a floating-point count.

    optax's counts are int32, and JAX divides int32 by int32 in float32 even with x64 on:
    exponential_decay, linear_schedule and piecewise_interpolate_schedule then give float32
    learning rates in a float64 run (measured: 0.05 comes out as 0.0500000007), a relative
    error of up to 6e-8 per step against torch's float64 lr that a float64 trajectory
    accumulates up to the table's bound. A float count keeps the run's precision.
    """
    import jax.numpy as jnp

    def at_float(count: Any) -> Any:
        return schedule(jnp.asarray(count, jnp.result_type(float)))

    return at_float


def _schedule_fn(name: str, kw: dict[str, Any], lr: float) -> tuple[Callable[[Any], Any], str]:
    if name == "StepLR":
        return (optax.exponential_decay(lr, transition_steps=kw["step_size"], decay_rate=kw.get("gamma", 0.1),
                                        staircase=True), "optax.exponential_decay(staircase=True)")
    if name == "MultiStepLR":
        gamma = kw.get("gamma", 0.1)
        # torch counts a repeated milestone twice; optax's dict keeps one key per boundary
        scales = {int(m): gamma**n for m, n in Counter(kw["milestones"]).items()}
        return optax.piecewise_constant_schedule(lr, scales), "optax.piecewise_constant_schedule"
    if name == "ExponentialLR":
        return optax.exponential_decay(lr, transition_steps=1, decay_rate=kw["gamma"]), "optax.exponential_decay"
    if name == "CosineAnnealingLR":
        eta_min = kw.get("eta_min", 0.0)
        return (optax.cosine_decay_schedule(lr, decay_steps=kw["T_max"], alpha=eta_min / lr),
                "optax.cosine_decay_schedule (equal up to T_max; torch's keeps oscillating after it)")
    if name == "LinearLR":
        start, end, n = kw.get("start_factor", 1 / 3), kw.get("end_factor", 1.0), kw.get("total_iters", 5)
        return optax.linear_schedule(lr * start, lr * end, transition_steps=n), "optax.linear_schedule"
    if name == "OneCycleLR":
        return _onecycle(kw)
    if name == "SequentialLR":
        subs = [_schedule_fn(s.torch, dict(s.kwargs), lr) for s in kw["schedulers"]]
        return (optax.join_schedules([f for f, _ in subs], list(kw["milestones"])),
                "optax.join_schedules(" + ", ".join(p for _, p in subs) + ")")
    raise Unmatched(f"no mapping for torch.optim.lr_scheduler.{name}; mapped: StepLR, MultiStepLR, ExponentialLR, "
                    "CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR, ReduceLROnPlateau")


def _onecycle(kw: dict[str, Any]) -> tuple[Callable[[Any], Any], str]:
    if kw.get("cycle_momentum", True):
        raise Unmatched("OneCycleLR(cycle_momentum=True) also cycles the optimizer's momentum/betas, which "
                        "optax's one-cycle schedules leave alone; pass cycle_momentum=False")
    if kw.get("three_phase", False) or kw.get("anneal_strategy", "cos") != "cos" or "total_steps" not in kw:
        raise Unmatched("OneCycleLR: only total_steps=..., anneal_strategy='cos', three_phase=False are mapped")
    total, pct = kw["total_steps"], kw.get("pct_start", 0.3)
    div, final = kw.get("div_factor", 25.0), kw.get("final_div_factor", 1e4)
    peak = pct * total - 1
    if peak != int(peak) or peak < 1:
        raise Unmatched(f"OneCycleLR: torch peaks at step pct_start*total_steps - 1 = {peak:g}; optax's boundaries are "
                        "integers, so choose pct_start*total_steps integral")
    # torch: initial -> max over [0, pct*T - 1], max -> min over [pct*T - 1, T - 1];
    # optax.cosine_onecycle_schedule uses [0, pct*T] and [pct*T, T]: one step later each.
    fn = optax.piecewise_interpolate_schedule("cosine", kw["max_lr"] / div,
                                              {int(peak): div, int(total - 1): 1.0 / (div * final)})
    return fn, "optax.piecewise_interpolate_schedule('cosine') with torch's phase ends (pct*T - 1, T - 1)"


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """ReduceLROnPlateau's state in the neutral form: best, num_bad_epochs, cooldown_counter,
    and the lr as a fraction of the initial one."""

    base_lr: float

    def torch_to_neutral(self, sch: Any) -> dict[str, Any]:
        lr = sch.optimizer.param_groups[0]["lr"]
        return {"best": np.asarray(float(sch.best)), "num_bad_epochs": np.asarray(float(sch.num_bad_epochs)),
                "cooldown_counter": np.asarray(float(sch.cooldown_counter)), "scale": np.asarray(lr / self.base_lr)}

    def load_torch(self, sch: Any, n: Mapping[str, Any]) -> None:
        sch.best = float(n["best"])
        sch.num_bad_epochs = int(n["num_bad_epochs"])
        sch.cooldown_counter = int(n["cooldown_counter"])
        for g in sch.optimizer.param_groups:
            g["lr"] = float(n["scale"]) * self.base_lr

    def optax_to_neutral(self, tuples: Sequence[Any]) -> dict[str, Any]:
        inner = next(nt for nt in tuples if "plateau_count" in nt._fields)
        return {"best": np.asarray(float(inner.best_value)), "num_bad_epochs": np.asarray(float(inner.plateau_count)),
                "cooldown_counter": np.asarray(float(inner.cooldown_count)), "scale": np.asarray(float(inner.scale))}

    def optax_fields(self, nt: Any, n: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
        if n is None:
            return {}
        cast = lambda old, v: np.asarray(v, np.asarray(old).dtype)
        if "plateau_count" in nt._fields:
            return {"best_value": cast(nt.best_value, n["best"]), "plateau_count": cast(nt.plateau_count, n["num_bad_epochs"]),
                    "cooldown_count": cast(nt.cooldown_count, n["cooldown_counter"]), "scale": cast(nt.scale, n["scale"]),
                    "count": cast(nt.count, 0)}
        if isinstance(nt, ot.LaggedState):
            return {"scale": cast(nt.scale, n["scale"])}
        return {}


def _plateau_floor(lr: float, factor: float, min_lr: float, eps: float) -> float:
    """The lowest scale torch's ReduceLROnPlateau reaches: it skips a reduction that changes the lr
    by `eps` or less (absolute, default 1e-8), so its lr stops there while optax's would keep
    shrinking (found after ~22 halvings of lr 0.05 in a 98-step run). optax's min_scale at this
    floor stops where torch stops; with min_lr the floor is at least min_lr / lr."""
    old = lr
    while True:
        new = max(old * factor, min_lr)
        if old - new <= eps:
            return old / lr
        old = new


def _plateau(kw: dict[str, Any], lr: float) -> MappedSchedule:
    if kw.get("mode", "min") != "min":
        raise Unmatched("ReduceLROnPlateau(mode='max'): optax.contrib.reduce_on_plateau minimises; pass the negated "
                        "metric with mode='min'")
    rel = kw.get("threshold_mode", "rel") == "rel"
    threshold = kw.get("threshold", 1e-4)
    inner = optax.contrib.reduce_on_plateau(
        factor=kw.get("factor", 0.1),
        patience=kw.get("patience", 10) + 1,  # torch reduces when bad epochs > patience, optax when == patience
        rtol=threshold if rel else 0.0, atol=0.0 if rel else threshold,
        cooldown=kw.get("cooldown", 0), accumulation_size=1,
        min_scale=_plateau_floor(lr, kw.get("factor", 0.1), kw.get("min_lr", 0.0), kw.get("eps", 1e-8)),
    )
    return MappedSchedule(None, ot.lag_one_step(inner), PlateauState(lr),
                          ("equivcheck lag_one_step(optax.contrib.reduce_on_plateau(patience=patience+1))",))
