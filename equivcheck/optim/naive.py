"""Known divergences of naive ports: "the same" optimizer in torch.optim and optax, each
side with its own defaults, and the setting that reconciles them.

Machine readable: `NAIVE_PORTS` is a list of records; the optimizer suite runs each naive
pair (it must fail, and is listed in suites/known_divergences.txt with the reason, so the
report shows it), and `equivcheck.optim.mapping` holds the reconciled mapping. `measured` is the error on the
minimal failing example Hypothesis found (30 examples, seed 0; torch 2.13.0, optax 0.2.8,
CPU), from `python benchmarks/optim_margins.py --naive`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from equivcheck.optim import OptimizerPair, optimizer_pair
from equivcheck.optim.mapping import ADAM_STATE, Mapped
from equivcheck.optim.schedules import Schedule
from equivcheck.optim.state import StateField, StateMap
from equivcheck.optim.trajectory import Example


@dataclasses.dataclass(frozen=True)
class NaivePort:
    name: str  # the pair's name in the suite and in known_divergences.txt
    torch: str  # what the user writes in torch
    optax: str  # what the user writes in optax, believing it the same
    differs: str
    reconcile: str
    measured: str
    build: Callable[[], OptimizerPair]
    dtypes: tuple[str, ...] = ("float32", "float64")
    witness: Example | None = None  # where the default WITNESSES[check] does not show the divergence

    def pair(self) -> OptimizerPair:
        """The naive pair, with a witness per check: the defaults differ on any input, and these
        trajectories show it on every seed (the known divergence is then strict)."""
        pair = self.build().replace(dtypes=self.dtypes)
        return pair.replace(witnesses=(self.witness,) if self.witness else tuple(WITNESSES[c] for c in pair.checks))


# Two leaves, one gradient small enough for eps to matter (sqrt(v) ~ eps) and one of order one.
WITNESSES = {
    "step": Example("step", {"p0": [1.0, -2.0]}, {"g": {"p0": [[1e-4, 1.0]]}}, 1),
    "quadratic": Example("quadratic", {"p0": [1.0, -2.0]}, {"a": {"p0": [1.0, 0.5]}, "c": {"p0": [[0.0, 0.5]]}}, 20),
    "schedule": Example("schedule", steps=100),
}


def _naive(tx: Callable[[dict[str, Any]], Any], smap: StateMap = ADAM_STATE) -> Callable[..., Mapped]:
    """A mapping that ignores torch's hyperparameters beyond lr: optax's own defaults."""
    return lambda cls, hp, lr: Mapped(tx(hp), smap, ("naive: optax defaults",))


def _pair(port: str, torch_cls: str, tx: Callable[[dict[str, Any]], Any], smap: StateMap = ADAM_STATE, *,
          checks: tuple[str, ...], **kw: Any) -> Callable[[], OptimizerPair]:
    return lambda: optimizer_pair(port, torch_cls, optax_map=_naive(tx, smap), checks=checks, **kw)


RMS = StateMap((StateField("square_avg", "nu"),))
RSS = StateMap((StateField("sum", "sum_of_squares"),))
SGD_M = StateMap((StateField("momentum_buffer", "trace"),), torch_step=False)
RPROP = StateMap((StateField("step_size", "step_sizes"),))


def _schedule_pair(port: str, spec: Schedule, naive: Callable[[], Any], checks: tuple[str, ...]) -> Callable[[], OptimizerPair]:
    def build() -> OptimizerPair:
        good = optimizer_pair(port, "SGD", lr=0.05, momentum=0.9, schedule=spec, checks=checks)
        schedule = naive()
        tx = optax.sgd(schedule, momentum=0.9)
        return good.replace(optax_transform=lambda: tx, optax_schedule=schedule, rebuild=None,
                            parts=("naive: " + spec.torch + " as the optax schedule of the same name",))
    return build


NAIVE_PORTS: list[NaivePort] = [
    NaivePort("naive_adamw", "AdamW(lr=1e-3)", "optax.adamw(1e-3)",
              "weight decay defaults: torch 1e-2, optax 1e-4 (both multiply it by lr)",
              "optax.adamw(1e-3, weight_decay=1e-2)", "2.0e-5 (float32) / 9.9e-6 (float64) at step 1, lr 1e-3",
              _pair("naive_adamw", "AdamW", lambda hp: optax.adamw(hp["lr"]), checks=("quadratic",), lr=1e-3)),
    NaivePort("naive_adam_l2", "Adam(lr=1e-2, weight_decay=1e-2)", "optax.adamw(1e-2, weight_decay=1e-2)",
              "torch's Adam adds weight_decay * param to the gradient (L2, through the moments); optax.adamw "
              "decays the parameters outside them",
              "optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-2)), or torch.optim.AdamW",
              "1.0e-3 in exp_avg at step 1 (relative 1)",
              _pair("naive_adam_l2", "Adam", lambda hp: optax.adamw(hp["lr"], weight_decay=hp["weight_decay"]),
                    checks=("step",), lr=1e-2, weight_decay=1e-2)),
    NaivePort("naive_amsgrad", "Adam(lr=1e-2, amsgrad=True)", "optax.amsgrad(1e-2)",
              "torch takes the running max of the raw second moment and bias-corrects afterwards; optax of the "
              "corrected one (google-deepmind/optax#1389)",
              "no optax setting: equivcheck.optim.transforms.scale_by_amsgrad_torch", "5.0e-5 at step 2 (float32); 1.6e-4 (float64)",
              _pair("naive_amsgrad", "Adam", lambda hp: optax.amsgrad(hp["lr"]), checks=("quadratic",), lr=1e-2,
                    amsgrad=True)),
    NaivePort("naive_nadam", "NAdam(lr=1e-2)", "optax.nadam(1e-2)",
              "torch's NAdam schedules the momentum, mu_t = b1 * (1 - 0.5 * 0.96**(t * 4e-3)); optax uses b1",
              "torch NAdam(momentum_decay=float('inf')) == optax.nadam; else equivcheck scale_by_nadam_torch",
              "4.1e-3 at step 1 (relative 4.2e-3)",
              _pair("naive_nadam", "NAdam", lambda hp: optax.nadam(hp["lr"]), checks=("step",), lr=1e-2)),
    NaivePort("naive_radam", "RAdam(lr=1e-2, eps=0.1)", "optax.radam(1e-2, eps=0.1)",
              "torch adds eps to the uncorrected sqrt(v) and rectifies from rho_t > 5; optax adds eps to the "
              "corrected sqrt(v_hat) (a step-dependent eps in torch's terms) and rectifies from rho_t >= 5",
              "no optax setting for eps != 0: equivcheck scale_by_radam_torch", "1.2e-4 at step 6, the first rectified step (eps=0.1)",
              _pair("naive_radam", "RAdam", lambda hp: optax.radam(hp["lr"], eps=hp["eps"]), checks=("quadratic",),
                    lr=1e-2, eps=0.1),
              # gradients of 0.1-0.5 (sqrt(v) ~ eps): apart at step 6, the first rectified one (Hypothesis's find)
              witness=Example("quadratic", {"p0": [-1.0, 0.149, 0.1, 1.0]},
                              {"a": {"p0": [1.6, 1.5, 1.0, 1.0]}, "c": {"p0": [[-1.0, -0.14, 0.0, 0.9]]}}, 6)),
    NaivePort("naive_rmsprop", "RMSprop(lr=1e-2)", "optax.rmsprop(1e-2)",
              "decay: torch alpha=0.99, optax decay=0.9; eps: torch outside the sqrt, optax inside "
              "(eps_in_sqrt=True)",
              "optax.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False)", "9.1e-2 at step 1",
              _pair("naive_rmsprop", "RMSprop", lambda hp: optax.rmsprop(hp["lr"]), RMS, checks=("step",), lr=1e-2)),
    NaivePort("naive_rmsprop_eps", "RMSprop(lr=1e-2, alpha=0.9)", "optax.rmsprop(1e-2, decay=0.9)",
              "eps placement alone: torch g / (sqrt(v) + eps), optax g / sqrt(v + eps); differs where "
              "sqrt(v) is near eps (small gradients)",
              "optax.rmsprop(..., eps_in_sqrt=False)", "3.1e-2 at step 1",
              _pair("naive_rmsprop_eps", "RMSprop", lambda hp: optax.rmsprop(hp["lr"], decay=0.9), RMS,
                    checks=("step",), lr=1e-2, alpha=0.9)),
    NaivePort("naive_adagrad", "Adagrad(lr=1e-1)", "optax.adagrad(1e-1)",
              "initial accumulator: torch 0, optax 0.1; eps: torch 1e-10 outside the sqrt, optax 1e-7 inside",
              "optax.adagrad(1e-1, initial_accumulator_value=0.0, eps=0.0) when torch's eps is 0; else "
              "equivcheck scale_by_adagrad_torch", "0.1 in the accumulator at step 1 (its initial value)",
              _pair("naive_adagrad", "Adagrad", lambda hp: optax.adagrad(hp["lr"]), RSS, checks=("step",), lr=0.1)),
    NaivePort("naive_sgd_dampening", "SGD(lr=0.05, momentum=0.9, dampening=0.5)", "optax.sgd(0.05, momentum=0.9)",
              "optax's trace has no dampening: torch's buffer is m*buf + (1 - d)*g after the first step",
              "dampening=0, or equivcheck trace_dampened", "0.48 in the momentum buffer at step 2",
              _pair("naive_sgd_dampening", "SGD", lambda hp: optax.sgd(hp["lr"], momentum=hp["momentum"]), SGD_M,
                    checks=("quadratic",), lr=0.05, momentum=0.9, dampening=0.5)),
    NaivePort("naive_rprop", "Rprop(lr=1e-2)", "optax.rprop(1e-2)",
              "optax's scale_by_rprop returns the update it computed at the previous step: its first update is "
              "zero, then it runs one step behind torch, two after the first sign change",
              "equivcheck scale_by_rprop_torch", "1.0e-2 (= lr) at step 1, both dtypes; the diagnosis names the lag",
              _pair("naive_rprop", "Rprop", lambda hp: optax.rprop(hp["lr"]), RPROP, checks=("quadratic",), lr=1e-2)),
    NaivePort("naive_clip_norm", "SGD(lr=1000) after clip_grad_norm_(params, 0.01)", "optax.clip_by_global_norm(0.01)",
              "torch scales by max_norm / (norm + 1e-6), optax by max_norm / norm: a step differs by "
              "lr * max_norm * 1e-6 / norm, beyond float64's tolerance once lr * max_norm is large",
              "equivcheck clip_by_global_norm_torch", "2.5e-4 at step 1 (relative 6.3e-5), float64",
              lambda: optimizer_pair("naive_clip_norm", "SGD", lr=1000.0, clip_norm=0.01, checks=("step",))
              .replace(optax_transform=lambda: optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(1000.0)),
                       rebuild=None, parts=("naive: optax.clip_by_global_norm",)),
              dtypes=("float64",)),
    NaivePort("naive_cosine_past_tmax", "CosineAnnealingLR(T_max=40)", "optax.cosine_decay_schedule(lr, 40)",
              "past T_max torch's cosine rises again (period 2*T_max), optax's stays at its floor",
              "stop at T_max, or restart explicitly (optax.sgdr_schedule / CosineAnnealingWarmRestarts)",
              "lr 6.9e-4 apart at step 44 (T_max=40), relative 1",
              _schedule_pair("naive_cosine_past_tmax", Schedule("CosineAnnealingLR", T_max=40),
                             lambda: optax.cosine_decay_schedule(0.05, 40), ("schedule",))),
    NaivePort("naive_onecycle", "OneCycleLR(max_lr=0.1, total_steps=100, cycle_momentum=False)",
              "optax.cosine_onecycle_schedule(100, 0.1)",
              "torch peaks at step pct*T - 1 and ends at T - 1; optax at pct*T and T (one step later each)",
              "optax.piecewise_interpolate_schedule('cosine', max_lr/div, {pct*T - 1: div, T - 1: 1/(div*final)})",
              "lr 7.3e-5 apart at step 3 (relative 1.4e-2)",
              _schedule_pair("naive_onecycle", Schedule("OneCycleLR", max_lr=0.1, total_steps=100,
                                                        cycle_momentum=False),
                             lambda: optax.cosine_onecycle_schedule(100, 0.1), ("schedule",))),
    NaivePort("naive_plateau", "ReduceLROnPlateau(patience=2, factor=0.5)",
              "optax.contrib.reduce_on_plateau(patience=2, factor=0.5)",
              "torch reduces after patience+1 bad steps and from the next update on; optax after patience and "
              "on the update that saw the loss",
              "patience + 1, and apply the scale decided before this step's loss "
              "(equivcheck lag_one_step)", "num_bad_epochs 2 apart at step 3; the lr then differs by the factor",
              lambda: _plateau_naive(),
              # a flat curvature: every step improves the loss by under the 10% threshold, so every step is bad
              witness=Example("quadratic", {"p0": [2.0]}, {"a": {"p0": [0.1]}, "c": {"p0": [[0.0]]}}, 20)),
]


def _plateau_naive() -> OptimizerPair:
    spec = Schedule("ReduceLROnPlateau", patience=2, factor=0.5, threshold=0.1)
    good = optimizer_pair("naive_plateau", "SGD", lr=0.05, schedule=spec, checks=("quadratic",))
    tx = optax.chain(optax.sgd(0.05), optax.contrib.reduce_on_plateau(patience=2, factor=0.5, rtol=0.1))
    return good.replace(optax_transform=lambda: tx, rebuild=None, parts=("naive: optax.contrib.reduce_on_plateau",))


def by_name() -> dict[str, NaivePort]:
    return {p.name: p for p in NAIVE_PORTS}
