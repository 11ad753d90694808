"""Optimizer suite: torch.optim against optax, one step and whole trajectories.

One table, one generic test. Each row is a torch optimizer with its hyperparameters (and a
schedule, clipping or accumulation); `optimizer_pair` builds the optax side from the same
hyperparameters through equivcheck.optim.mapping, every optax argument explicit. Checks per row:
`step` (one step on drawn parameter pytrees and gradients), `quadratic` and `mlp`
(trajectories of up to 100 steps compared at every step; `mlp` also moves the optimizer
state between the frameworks mid-run), `schedule` (the learning-rate sequence).

The naive ports at the end (equivcheck.optim.naive) use each library's own defaults:
they must diverge, and suites/known_divergences.txt says why and what reconciles them.
"""
from __future__ import annotations

import pytest

from equivcheck.optim import Schedule, optimizer_pair
from equivcheck.optim.naive import NAIVE_PORTS
from equivcheck.optim.trajectory import Example

S = Schedule
TRAJECTORY = ("quadratic", "schedule")  # a schedule row: its lr sequence and an SGD trajectory under it

# nadam_optax::mlp::float64's witness (seed 1's shrunk example, issue 19's draws): a trajectory that
# amplifies torch's float32 mu_product roundings (~3e-9 per step) to 1.9e-5 by step 80.
NADAM_F64 = Example("mlp", {
    "b1": [-0.420768645, 0.609293203, 0.011177118, 0.0], "b2": [0.0],
    "w1": [[-7.471457590e-06, 7.410253870e-04, -3.184215501e-01, -4.199047016e-01],
           [-2.033726276e-01, -4.115901853e-06, -6.843405088e-04, -4.456725703e-02],
           [4.932941804e-04, 8.119694034e-01, 3.781868006e-01, -6.657831925e-01]],
    "w2": [[5.638087375e-01], [3.240281345e-01], [-6.103515625e-05], [0.0]]}, {
    "x": [[[2.381592146e-04, 2.526807486e-01, 1.0e-06], [-1.792987738e-05, 5.505376993e-01, 0.0],
           [-9.819723233e-03, 3.300376343e-04, -1.877006792e-05], [2.421066157e-05, -1.716801783e+00, 4.110236816e-03],
           [6.833304304e-06, 4.263320481e-04, 5.698737089e-01], [6.377558839e-02, -7.651290245e-01, 8.838652038e-01],
           [-8.421066133e-01, -2.801694649e-02, -1.623305137e-02], [5.371496279e-05, -2.359920521e-01, 1.899571351e+00]]],
    "y": [[[0.0], [0.614059948], [-0.99999], [0.424952108], [0.0], [-0.333333333], [0.0], [0.244351524]]]},
    steps=89, split=3)

OPTIMIZERS = [
    optimizer_pair("sgd", "SGD", lr=0.05),
    optimizer_pair("sgd_nesterov_wd", "SGD", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    optimizer_pair("sgd_dampening", "SGD", lr=0.05, momentum=0.9, dampening=0.5),
    optimizer_pair("adam", "Adam", lr=1e-2),
    optimizer_pair("adam_l2", "Adam", lr=1e-2, weight_decay=1e-2),
    optimizer_pair("adam_amsgrad", "Adam", lr=1e-2, betas=(0.8, 0.99), amsgrad=True),
    optimizer_pair("adamw", "AdamW", lr=1e-2),  # torch's default weight_decay 1e-2, passed to optax explicitly
    optimizer_pair("nadam", "NAdam", lr=1e-2),
    optimizer_pair("nadam_optax", "NAdam", lr=1e-2,  # exactly optax.nadam
                   momentum_decay=float("inf")).replace(witnesses=(NADAM_F64,)),
    optimizer_pair("nadamw", "NAdam", lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    optimizer_pair("radam", "RAdam", lr=1e-2),
    optimizer_pair("rmsprop", "RMSprop", lr=1e-2),
    optimizer_pair("rmsprop_centered_momentum", "RMSprop", lr=1e-2, centered=True, momentum=0.5, weight_decay=1e-2),
    optimizer_pair("adagrad", "Adagrad", lr=0.1, lr_decay=1e-2, initial_accumulator_value=0.1),
    optimizer_pair("adagrad_eps0", "Adagrad", lr=0.1, eps=0.0, initial_accumulator_value=0.1),  # optax.scale_by_rss
    optimizer_pair("adadelta", "Adadelta", lr=1.0, weight_decay=1e-2),
    optimizer_pair("adamax", "Adamax", lr=1e-2, weight_decay=1e-2),
    # Rprop's mlp trajectory is ill-conditioned: through a saturated tanh unit a gradient is 0 on
    # one side and a rounding-sized value on the other, and Rprop moves by +-step_size (up to 50)
    # on its sign alone (measured: w1 at -51.5 vs -61.7 after 40 float64 steps, both sides exact
    # on the quadratic)
    optimizer_pair("rprop", "Rprop", lr=1e-2, checks=("step", "quadratic")),
    # lambd and t0 raised from torch's defaults (1e-4, 1e6) so that eta decays and the average
    # (mu < 1 after step t0 + 1) moves within 100 steps; optax has no ASGD: equivcheck asgd_torch
    optimizer_pair("asgd", "ASGD", lr=1e-2, lambd=1e-2, t0=20.0, weight_decay=1e-2),
    optimizer_pair("lion", "Lion", lr=1e-3),  # skipped with the reason where torch has no torch.optim.Lion
]

SCHEDULES = [
    optimizer_pair("step_lr", "SGD", lr=0.05, momentum=0.9, schedule=S("StepLR", step_size=7, gamma=0.5),
                   checks=TRAJECTORY),
    optimizer_pair("multistep_lr", "SGD", lr=0.05, momentum=0.9,
                   schedule=S("MultiStepLR", milestones=[10, 30, 30, 60], gamma=0.5), checks=TRAJECTORY),
    optimizer_pair("exponential_lr", "SGD", lr=0.05, momentum=0.9, schedule=S("ExponentialLR", gamma=0.97),
                   checks=TRAJECTORY),
    optimizer_pair("cosine_lr", "Adam", lr=1e-2, schedule=S("CosineAnnealingLR", T_max=100, eta_min=1e-4),
                   checks=TRAJECTORY),
    optimizer_pair("linear_warmup", "SGD", lr=0.05, momentum=0.9,
                   schedule=S("LinearLR", start_factor=0.1, end_factor=1.0, total_iters=10), checks=TRAJECTORY),
    optimizer_pair("warmup_cosine", "AdamW", lr=1e-2, checks=TRAJECTORY,
                   schedule=S("SequentialLR", milestones=[10],
                              schedulers=[S("LinearLR", start_factor=0.1, end_factor=1.0, total_iters=10),
                                          S("CosineAnnealingLR", T_max=90, eta_min=1e-4)])),
    optimizer_pair("onecycle", "SGD", lr=0.05, schedule=S("OneCycleLR", max_lr=0.1, total_steps=100, pct_start=0.3,
                                                         cycle_momentum=False), checks=TRAJECTORY),
    optimizer_pair("plateau", "SGD", lr=0.05, momentum=0.9, checks=("quadratic", "mlp"),
                   schedule=S("ReduceLROnPlateau", patience=2, factor=0.5, threshold=0.1, cooldown=1)),
]

GRADIENTS = [
    optimizer_pair("clip_norm", "SGD", lr=0.05, momentum=0.9, clip_norm=1.0),
    # clip_grad_norm_'s +1e-6 moves a step by lr * max_norm * 1e-6 / norm: beyond float64's bound once
    # lr * max_norm is large against the parameters (else both optax and torch's clipping pass)
    optimizer_pair("clip_norm_large_step", "SGD", lr=1000.0, clip_norm=0.01, checks=("step",)),
    optimizer_pair("clip_value", "Adam", lr=1e-2, clip_value=0.5),
    optimizer_pair("accumulate4", "Adam", lr=1e-2, accumulate=4, clip_norm=1.0, checks=("step", "mlp")),
]

NO_DECAY_ON_VECTORS = (lambda path, leaf: leaf.ndim < 2, {"weight_decay": 0.0})  # biases and norms

GROUPS = [  # torch param groups: masked optax pieces (equivcheck.optim.groups)
    optimizer_pair("adamw_groups", "AdamW", lr=1e-2, weight_decay=0.1, groups=[NO_DECAY_ON_VECTORS]),
    optimizer_pair("sgd_groups_lr", "SGD", lr=0.05, momentum=0.9, weight_decay=1e-2,
                   groups=[(lambda path, leaf: leaf.ndim < 2, {"weight_decay": 0.0, "lr": 0.01})]),
]

NAIVE = [port.pair() for port in NAIVE_PORTS]
PAIRS = OPTIMIZERS + SCHEDULES + GRADIENTS + GROUPS + NAIVE


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_optimizer(pair, equiv):
    equiv.check(pair)
