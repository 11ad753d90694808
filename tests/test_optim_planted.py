"""Planted optimizer bugs: each wrong port must fail its check with the right diagnosis, and
its correct counterpart must pass the same examples."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from equivcheck.engine.records import RunSettings
from equivcheck.optim import OptimizerPair, Schedule, optimizer_pair
from equivcheck.optim.mapping import ADAM_STATE, Mapped, map_sgd
from equivcheck.optim.runner import run_optimizer_pair

SEED = 20261126
RUN = RunSettings(examples=25, seed=SEED, shrink_seconds=5)


def by_check(records):
    return {r.check: r for r in records}


def run(pair, dtype="float32", run=RUN):
    return by_check(run_optimizer_pair(pair, dtype=dtype, run=run))


def _map(build):
    """A port of one's own: (hparams) -> optax transformation, Adam-style state."""
    return lambda cls, hp, lr: Mapped(build(hp), ADAM_STATE, ("planted",))


def _adam_init(params):
    z = jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), z, z)


def adam_without_bias_correction(hp):
    b1, b2 = hp["betas"]

    init = _adam_init

    def update(g, s, params=None):
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, g, s.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, g, s.nu)
        u = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + hp["eps"]), mu, nu)
        return u, optax.ScaleByAdamState(optax.safe_increment(s.count), mu, nu)

    return optax.chain(optax.GradientTransformation(init, update), optax.scale_by_learning_rate(hp["lr"]))


RMS_STATE_FIELDS = {"square_avg": "nu"}


def _rms_inside(hp):
    return optax.rmsprop(hp["lr"], decay=hp["alpha"], eps=hp["eps"], eps_in_sqrt=True)


def _coupled_adamw(hp):
    b1, b2 = hp["betas"]
    return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), optax.scale_by_adam(b1, b2, hp["eps"]),
                       optax.scale_by_learning_rate(hp["lr"]))


def _rmsprop(name, build=None):
    from equivcheck.optim.state import StateField, StateMap

    smap = StateMap((StateField("square_avg", "nu"),))
    mapping = (lambda cls, hp, lr: Mapped(build(hp), smap, ("planted",))) if build else None
    return optimizer_pair(name, "RMSprop", lr=1e-2, optax_map=mapping, checks=("step",))


# (correct pair, planted pair, check that fails, words the diagnosis must contain)
PLANTED = [
    (_rmsprop("rmsprop"), _rmsprop("rmsprop_eps_inside_bug", _rms_inside), "step", "eps enters differently"),
    (optimizer_pair("adamw", "AdamW", lr=1e-2, weight_decay=0.1, checks=("step",)),
     optimizer_pair("adamw_coupled_bug", "AdamW", lr=1e-2, weight_decay=0.1, checks=("step",),
                    optax_map=_map(_coupled_adamw)),
     "step", "weight decay is applied differently"),
    (optimizer_pair("adam", "Adam", lr=1e-2, checks=("step",)),
     optimizer_pair("adam_no_bias_correction_bug", "Adam", lr=1e-2, checks=("step",),
                    optax_map=_map(adam_without_bias_correction)),
     "step", "bias correction differs"),
    (optimizer_pair("nadam", "NAdam", lr=1e-2, checks=("step",)),
     optimizer_pair("nadam_dozat_bug", "NAdam", lr=1e-2, checks=("step",), optax_map=_map(
         lambda hp: optax.nadam(hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"]))),
     "step", "first-moment (momentum / Nesterov) formula differs"),
    (optimizer_pair("sgd_nesterov", "SGD", lr=0.05, momentum=0.9, nesterov=True, checks=("quadratic",)),
     optimizer_pair("sgd_plain_momentum_bug", "SGD", lr=0.05, momentum=0.9, nesterov=True, checks=("quadratic",),
                    optax_map=lambda cls, hp, lr: map_sgd({**hp, "nesterov": False}, lr)),
     "quadratic", "Nesterov formula differs"),
]


@pytest.mark.parametrize("good, bad, check, words", PLANTED, ids=[bad.name for _, bad, _, _ in PLANTED])
def test_planted_optimizer_bug_is_caught_with_its_cause(good, bad, check, words):
    rec = run(bad)[check]
    assert rec.outcome == "failed", rec
    assert words in rec.diagnosis, rec.failure_text()
    assert rec.message.startswith("step 1:" if check == "step" else "step "), rec.message


@pytest.mark.parametrize("good, bad, check, words", PLANTED, ids=[good.name for good, _, _, _ in PLANTED])
def test_correct_optimizer_port_passes(good, bad, check, words):
    rec = run(good)[check]
    assert rec.outcome == "passed", rec.failure_text()
    assert rec.examples >= RUN.examples


STEP = Schedule("StepLR", step_size=7, gamma=0.5)


def _shifted_optax():
    good = optimizer_pair("steplr_shift_bug", "SGD", lr=0.05, momentum=0.9, schedule=STEP, checks=("schedule",))
    ahead = lambda count: good.optax_schedule(count + 1)
    tx = map_sgd(good.hparams, ahead).transform
    return good.replace(optax_schedule=ahead, optax_transform=lambda: tx, rebuild=None)


def _stepped_first(optimizer):
    """The classic torch bug: scheduler.step() before optimizer.step()."""
    sch = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch.step()
    return sch


@pytest.mark.parametrize("bad, words", [
    (_shifted_optax(), "optax evaluates its schedule one count ahead"),
    (optimizer_pair("steplr_torch_early_bug", "SGD", lr=0.05, momentum=0.9, schedule=STEP, checks=("schedule",))
     .replace(torch_scheduler=_stepped_first, rebuild=None), "torch calls scheduler.step() before optimizer.step()"),
], ids=["optax_ahead", "torch_scheduler_first"])
def test_schedule_shifted_by_one_step_is_named(bad, words):
    rec = run(bad)["schedule"]
    assert rec.outcome == "failed", rec
    assert "shifted by one step" in rec.diagnosis and words in rec.diagnosis, rec.failure_text()
    assert rec.message.startswith("step 7:"), rec.message  # the first update after the drop at 7


def test_the_schedule_convention_holds_without_shift():
    good = optimizer_pair("steplr", "SGD", lr=0.05, momentum=0.9, schedule=STEP, checks=("schedule", "quadratic"))
    records = run(good)
    assert [r.outcome for r in records.values()] == ["passed", "passed"], [r.failure_text() for r in records.values()]


def test_a_diverging_trajectory_names_its_first_step_and_leaf():
    """The two sides agree for 7 steps; from update 8 optax decays by 0.4 instead of 0.5."""
    good = optimizer_pair("gamma_bug", "SGD", lr=0.05, momentum=0.9, schedule=STEP, checks=("quadratic",))
    wrong = optax.exponential_decay(0.05, transition_steps=7, decay_rate=0.4, staircase=True)
    tx = map_sgd(good.hparams, wrong).transform
    bad = OptimizerPair("gamma_bug", good.torch_optimizer, lambda: tx, good.state_map,
                        torch_scheduler=good.torch_scheduler, checks=("quadratic",))
    rec = run(bad)["quadratic"]
    assert rec.outcome == "failed", rec
    assert rec.message.startswith("step 8: first step out of tolerance; out['params']"), rec.message
    assert "worst: out['params']" in rec.message


@pytest.mark.parametrize("min_lr", [0.0, 1e-7])
def test_plateau_lr_stops_where_torchs_eps_stops_it(min_lr):
    """torch skips a reduction smaller than eps (1e-8, absolute): on a flat loss its lr stops at a
    floor while optax.contrib.reduce_on_plateau alone would keep halving (found after 97 steps)."""
    import jax.numpy as jnp
    import torch

    from equivcheck.engine.tolerance import lookup
    from equivcheck.optim.schedules import map_schedule

    lr, kw = 0.05, dict(patience=2, factor=0.5, threshold=0.1, cooldown=1, min_lr=min_lr)
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr)
    sch = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    tx = map_schedule(Schedule("ReduceLROnPlateau", **kw), lr).transform
    params = {"w": jnp.zeros(1, jnp.float64)}
    state = tx.init(params)
    torch_lrs, optax_lrs = [], []
    for _ in range(150):
        torch_lrs.append(opt.param_groups[0]["lr"])
        optax_lrs.append(lr * float(state.scale))
        _, state = tx.update({"w": jnp.ones(1, jnp.float64)}, state, params, value=jnp.asarray(1.0, jnp.float64))
        opt.step()
        sch.step(1.0)
    assert torch_lrs[-1] == torch_lrs[-40] > min_lr * 0.999  # torch has stopped reducing
    # optax keeps the plateau scale in float32 (min_lr / lr = 2e-6 rounds), torch the lr in a Python float
    tol = lookup("float32")
    np.testing.assert_allclose(optax_lrs, torch_lrs, rtol=tol.rtol, atol=0)


def test_a_plateau_schedule_that_decides_differently_is_blamed_on_the_schedule(monkeypatch):
    """optax's reduce_on_plateau counts patience differently from torch (it reduces when the bad
    steps reach patience, torch when they exceed it): a port without the +1 reduces one step
    early. The parameters differ after that too; the diagnosis must name the schedule's
    state, not a hyperparameter of the optimizer (it once blamed momentum for a plateau bug)."""
    plateau = Schedule("ReduceLROnPlateau", patience=2, factor=0.5, threshold=0.1, cooldown=1)
    good = optimizer_pair("plateau", "SGD", lr=0.05, momentum=0.9, checks=("quadratic",), schedule=plateau)
    rec = run(good)["quadratic"]
    assert rec.outcome == "passed", rec.failure_text()
    original = optax.contrib.reduce_on_plateau
    monkeypatch.setattr(optax.contrib, "reduce_on_plateau", lambda patience, **kw: original(patience=patience - 1, **kw))
    bad = optimizer_pair("plateau_patience_bug", "SGD", lr=0.05, momentum=0.9, checks=("quadratic",), schedule=plateau)
    rec = run(bad)["quadratic"]
    assert rec.outcome == "failed", rec
    assert "the schedule's own state differs" in rec.diagnosis and "plateau decisions differ" in rec.diagnosis, \
        rec.failure_text()


def one_step_late(inner):
    """A correct transformation made to return the update it computed at the previous step
    (zero at the first): the planted form of optax.rprop's lag."""

    def init(params):
        return (inner.init(params), jax.tree.map(jnp.zeros_like, params))

    def update(g, state, params=None):
        u, s = inner.update(g, state[0], params)
        return state[1], (s, u)

    return optax.GradientTransformation(init, update)


def _late_pair(check):
    good = optimizer_pair("adam", "Adam", lr=1e-2, checks=(check,))
    tx = one_step_late(good.optax_transform())
    return OptimizerPair("adam_one_step_late_bug", good.torch_optimizer, lambda: tx, good.state_map, checks=(check,))


def _optax_rprop(cls, hp, lr):
    from equivcheck.optim.state import StateField, StateMap

    (minus, plus), (lo, hi) = hp["etas"], hp["step_sizes"]
    return Mapped(optax.rprop(hp["lr"], minus, plus, lo, hi), StateMap((StateField("step_size", "step_sizes"),)),
                  ("optax.rprop",))


LATE = [
    (_late_pair("step"), "step"),
    (_late_pair("quadratic"), "quadratic"),
    (_late_pair("mlp"), "mlp"),
    (optimizer_pair("optax_rprop", "Rprop", lr=1e-2, optax_map=_optax_rprop, checks=("quadratic",)), "quadratic"),
]


@pytest.mark.parametrize("bad, check", LATE, ids=[f"{bad.name}-{check}" for bad, check in LATE])
def test_an_update_applied_one_step_late_is_named(bad, check):
    """Before: "undecided: the two sides compute different steps". A lagging side's step n is
    the other's step n-1, so the lagging side is named, and which one it is."""
    rec = run(bad)[check]
    assert rec.outcome == "failed", rec
    assert rec.side == "jax", rec.failure_text()
    assert "the jax side applies each update one step late (its step n equals torch's step n-1" in rec.diagnosis, \
        rec.failure_text()
    assert rec.message.startswith("step 1:"), rec.message  # the lagging side has not moved yet


def test_a_first_learning_rate_of_zero_is_offered_as_a_cause_of_the_lag():
    # Audit of issue 11: optax's Adam with a schedule giving 0 at count 0 read "it applies the update
    # computed from the previous gradient (optax's scale_by_rprop does)" alone. Its first update is
    # zero, and its second sees the same gradient torch's first did: the first steps cannot tell the
    # two causes apart, so both are named.
    bad = OptimizerPair("adam_first_lr_zero", lambda ps: torch.optim.Adam(ps, lr=1e-2),
                        lambda: optax.adam(lambda c: jnp.where(c == 0, 0.0, 1e-2)), checks=("quadratic",))
    rec = run(bad)["quadratic"]
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "a learning rate of 0 at count 0" in rec.diagnosis, rec.failure_text()


def test_torchs_rprop_is_matched_step_for_step():
    """torch Rprop: every step size starts at lr, grows by 1.2 while the gradient keeps its
    sign, halves where it changes it, and there the parameter stays (torch zeroes the grad).
    On 0.5 * (p - 0.05)**2 from p = 0 with lr 0.02 (measured, torch 2.14.1): 0.02, 0.044,
    0.0728, 0.0728 (sign change: no move), 0.0584, ... - optax.rprop is one step behind
    (0, 0.02, 0.044, ...) and two after the first sign change; the mapping is exact."""
    lr, centre, n = 0.02, 0.05, 12
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Rprop([p], lr=lr)
    torch_path = []
    for _ in range(n):
        opt.zero_grad()
        (0.5 * (p - centre) ** 2).sum().backward()
        opt.step()
        torch_path.append(p.item())
    tx = optimizer_pair("rprop", "Rprop", lr=lr).optax_transform()
    q = jnp.zeros(1)
    state, ours = tx.init(q), []
    for _ in range(n):
        u, state = tx.update(q - centre, state, q)
        q = optax.apply_updates(q, u)
        ours.append(float(q[0]))
    assert ours == torch_path  # the same float32 operations: bit for bit
    assert torch_path[2] == torch_path[3]  # the sign change at step 4 moves nothing


NO_DECAY_ON_VECTORS = [(lambda path, leaf: leaf.ndim < 2, {"weight_decay": 0.0})]  # biases and norms


def _inverted_mask(cls, hp, lr):
    """optax.adamw with the mask the wrong way round: decay on the vectors, not the matrices."""
    b1, b2 = hp["betas"]
    wd = max(hp["weight_decay"].values)
    mask = lambda tree: jax.tree.map(lambda p: p.ndim < 2, tree)
    return Mapped(optax.adamw(hp["lr"], b1=b1, b2=b2, eps=hp["eps"], weight_decay=wd, mask=mask), ADAM_STATE,
                  ("planted: inverted mask",))


@pytest.mark.parametrize("check", ["step", "mlp"])
def test_weight_decay_on_the_other_param_group_is_named(check):
    """torch decays the matrices only (the transformer recipe); the optax port's mask decays
    the biases instead. The sides agree with weight decay off, and leaf by leaf the jax side
    matches torch with the *other* group's weight_decay: the diagnosis says so."""
    kw = dict(lr=1e-2, weight_decay=0.1, groups=NO_DECAY_ON_VECTORS, checks=(check,))
    good = optimizer_pair("adamw_groups", "AdamW", **kw)
    assert run(good)[check].outcome == "passed", run(good)[check].failure_text()
    rec = run(optimizer_pair("adamw_inverted_mask_bug", "AdamW", optax_map=_inverted_mask, **kw))[check]
    assert rec.outcome == "failed", rec
    assert rec.side == "jax", rec.failure_text()
    assert "weight decay is applied to other parameters on the two sides" in rec.diagnosis, rec.failure_text()
    if check == "mlp":  # its leaves are named: w1, w2 matrices; b1, b2 vectors
        assert "weight_decay=0.1 on ['w1', 'w2']" in rec.diagnosis, rec.diagnosis
        assert "w1, w2 as if weight_decay=0; b1, b2 as if weight_decay=0.1" in rec.diagnosis, rec.diagnosis


def test_torchs_float32_scalar_state_in_a_float64_run_is_blamed_on_torch():
    """torch NAdam keeps mu_product in float32 for float64 parameters; optax.nadam does not. On
    seed 1's shrunk trajectory the roundings grow to 1.9e-5 by step 80: the diagnosis reruns
    torch with float64 scalars and names torch."""
    from suites.test_optimizers import NADAM_F64

    once = RunSettings(examples=1, seed=SEED, shrink_seconds=5)
    pair = optimizer_pair("nadam_optax", "NAdam", lr=1e-2, momentum_decay=float("inf"), checks=("mlp",))
    rec = run(pair.replace(witnesses=(NADAM_F64,)), "float64", once)["mlp"]
    assert rec.outcome == "failed" and rec.side == "torch", rec.failure_text()
    assert "torch.set_default_dtype(torch.float64) the sides agree" in rec.diagnosis, rec.diagnosis


def _adam_dropping_mu_correction_after(late):
    """Adam whose port drops the first moment's bias correction after step `late` (a new user's trial)."""
    def build(hp):
        b1, b2 = hp["betas"]

        def update(g, s, params=None):
            count = s.count + 1
            mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, s.mu, g)
            nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, s.nu, g)

            def leaf(m, v):
                t = count.astype(m.dtype)
                c1 = jnp.where(count > late, 1.0, 1 - b1 ** t).astype(m.dtype)
                return (m / c1) / (jnp.sqrt(v / (1 - b2 ** t)) + hp["eps"])
            return jax.tree.map(leaf, mu, nu), optax.ScaleByAdamState(count, mu, nu)

        return optax.chain(optax.GradientTransformation(_adam_init, update), optax.scale_by_learning_rate(hp["lr"]))
    return build


@pytest.mark.parametrize("dtype, seed", [("float32", 2), ("float64", 5)])
def test_a_formula_slip_after_step_50_is_named_not_blamed_on_the_map_or_float32(dtype, seed):
    """In float32 the state parted past its bound at step 62 while the parameters were still within
    theirs (62x the one-step bound): "check the StateField" (a map's fault shows at step 1). In float64 the
    gap at step 51 was small enough to read "one side computes part of the step in float32"."""
    pair = optimizer_pair("adam_late50", "Adam", lr=1e-2, checks=("quadratic",),
                          optax_map=_map(_adam_dropping_mu_correction_after(50)))
    (rec,) = run_optimizer_pair(pair, dtype=dtype, run=RunSettings(examples=10, seed=seed))
    assert rec.outcome == "failed", rec.failure_text()
    assert "StateField" not in rec.diagnosis and "float32's level" not in rec.diagnosis, rec.diagnosis
    assert "bias correction 1 - beta1**t" in rec.diagnosis, rec.diagnosis
    # a port of one's own (optax_map) of torch.optim.Adam: torch is the specification, the port is off
    assert rec.side == "jax" and "torch is the specification this pair's jax side ports" in rec.diagnosis


def test_a_port_without_dampening_is_named():
    """torch's SGD(momentum=0.9, dampening=0.5) against optax.trace(0.9) (one step agrees: torch's first
    buffer is the gradient itself) read "no single change makes the sides agree": the momentum probe
    turns torch's buffer off, and the map then compares nothing with optax's trace. Dampening set to 0
    on both sides is the probe that names it."""
    from equivcheck.optim.state import StateField, StateMap

    def no_dampening(cls, hp, lr):
        tx = optax.chain(optax.trace(decay=hp["momentum"]), optax.scale(-hp["lr"]))
        return Mapped(tx, StateMap((StateField("momentum_buffer", "trace"),), torch_step=False), ("optax.trace",))

    pair = optimizer_pair("sgd_no_dampening", "SGD", lr=0.05, momentum=0.9, dampening=0.5, checks=("quadratic",),
                          optax_map=no_dampening)
    (rec,) = run_optimizer_pair(pair, dtype="float32", run=RunSettings(examples=5, seed=1))
    assert rec.outcome == "failed" and "dampening differs" in rec.diagnosis, rec.failure_text()


def _adam_second_moment_through(dtype):
    """Adam whose port keeps its second moment in `dtype`, or (float32) rounds it through float16."""
    def build(hp):
        b1, b2 = hp["betas"]

        def init(params):
            z = jax.tree.map(jnp.zeros_like, params)
            return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), z, jax.tree.map(lambda p: p.astype(dtype), z))

        def update(g, s, params=None):
            count = s.count + 1
            mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, s.mu, g)
            nu = jax.tree.map(lambda v, x: (b2 * v + (1 - b2) * x * x).astype(jnp.float16).astype(v.dtype), s.nu, g)
            t = count.astype(jnp.float32)
            u = jax.tree.map(lambda m, v: (m / (1 - b1 ** t)) / (jnp.sqrt(v.astype(m.dtype) / (1 - b2 ** t))
                                                                 + hp["eps"]), mu, nu)
            return u, optax.ScaleByAdamState(count, mu, nu)

        return optax.chain(optax.GradientTransformation(init, update), optax.scale_by_learning_rate(hp["lr"]))
    return build


@pytest.mark.parametrize("kept, words", [(jnp.float16, "jax keeps out['state']['exp_avg_sq']"),
                                         (jnp.float32, "is on the float16 grid")])
@pytest.mark.parametrize("check", ["step", "quadratic", "mlp"])
def test_a_state_buffer_kept_in_or_rounded_through_float16_is_named(kept, words, check):
    """Read "check the StateField" (quadratic) or "no single change makes the sides agree" (step, mlp);
    on the step check the second moment of a shrunk example (1e-15) is flushed to zero by float16."""
    pair = optimizer_pair("adam_nu16", "Adam", lr=1e-2, checks=(check,), optax_map=_map(_adam_second_moment_through(kept)))
    (rec,) = run_optimizer_pair(pair, dtype="float32", run=RunSettings(examples=10, seed=1))
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    said = (words, "is 0 where torch's is below float16's smallest subnormal")  # step: shrunk to nu of 1e-15
    assert any(w in rec.diagnosis for w in said) and "float16" in rec.diagnosis, rec.diagnosis
