"""The optimizer API on bad input, and the state mapping on its own: clear messages naming
the cause, and a checkpoint's optimizer state that moves between frameworks exactly."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch

from equivcheck.engine.compare import compare
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import Tolerance
from equivcheck.optim import (
    OptimizerPair,
    Schedule,
    Unmatched,
    load_torch_state,
    optax_state_from_torch,
    optimizer_pair,
)
from equivcheck.optim.mapping import ADAM_STATE
from equivcheck.optim.naive import NAIVE_PORTS
from equivcheck.optim.runner import run_optimizer_pair
from equivcheck.optim.state import optax_to_neutral, torch_to_neutral
from suites.test_optimizers import GRADIENTS, OPTIMIZERS, SCHEDULES

RUN = RunSettings(examples=5, seed=3, shrink_seconds=2)
PARAMS = {"layer": {"w": np.arange(6.0).reshape(2, 3) / 7 - 0.3, "b": np.array([0.5, -0.25])}, "scale": np.array(1.5)}


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"torch.optim.Adam has no hyperparameter momentum; it takes lr, betas"):
        optimizer_pair("x", "Adam", lr=1e-3, momentum=0.9)


@pytest.mark.parametrize("kw, words", [
    (dict(torch_optimizer="LBFGS", lr=1.0), "LBFGS: torch.optim.LBFGS runs up to max_iter inner iterations"),
    (dict(torch_optimizer="Adam", lr=1e-3, maximize=True), "(maximize=True): optax minimises"),
    (dict(torch_optimizer="SGD", lr=0.1, schedule=Schedule("OneCycleLR", max_lr=0.1, total_steps=100)),
     "cycle_momentum=True"),
    (dict(torch_optimizer="RMSprop", lr=0.1, momentum=0.9, schedule=Schedule("StepLR", step_size=3)),
     "RMSprop(momentum>0) with a schedule"),
    (dict(torch_optimizer="SGD", lr=0.1, schedule=Schedule("CyclicLR", base_lr=0.01, max_lr=0.1)),
     "no mapping for torch.optim.lr_scheduler.CyclicLR"),
])
def test_settings_without_an_optax_counterpart_say_why(kw, words):
    with pytest.raises(Unmatched, match=None) as err:
        optimizer_pair("x", **kw)
    assert words in str(err.value)


def test_an_optimizer_torch_lacks_is_skipped_with_the_reason():
    pair = optimizer_pair("lion", "Lion", lr=1e-3)
    if hasattr(torch.optim, "Lion"):
        pytest.skip("this torch has torch.optim.Lion: the pair runs")
    records = run_optimizer_pair(pair, dtype="float32", run=RUN)
    assert {r.outcome for r in records} == {"skipped"}
    assert records[0].message == f"torch {torch.__version__} has no torch.optim.Lion"


def _extra_param(params):
    extra = torch.zeros(1, requires_grad=True)
    return torch.optim.SGD([{"params": params, "lr": 0.1}, {"params": [extra], "lr": 0.01}], lr=0.1)


def test_a_torch_optimizer_holding_other_tensors_than_the_leaves_is_refused_with_the_counts():
    pair = OptimizerPair("extra", _extra_param, lambda: optax.sgd(0.1), checks=("step",))
    rec = run_optimizer_pair(pair, dtype="float32", run=RUN)[0]
    assert rec.outcome == "failed" and rec.side == "torch", rec
    assert "in 2 param group(s) (1 not among them)" in rec.message, rec.message


NO_DECAY_ON_VECTORS = [(lambda path, leaf: leaf.ndim < 2, {"weight_decay": 0.0})]


def _transformer_recipe(params):
    """What a user writes: decay on matrices, none on biases and norms (the leaves arrive in tree order)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=1e-2, weight_decay=0.1)


def test_param_groups_built_by_hand_run_every_check():
    """Before: refused as "the torch side raised" (2 param groups with different weight_decay)."""
    mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    tx = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=mask)
    pair = OptimizerPair("adamw_groups_by_hand", _transformer_recipe, lambda: tx, ADAM_STATE)
    records = run_optimizer_pair(pair, dtype="float32", run=RUN)
    assert [(r.check, r.outcome) for r in records] == [("step", "passed"), ("quadratic", "passed"),
                                                       ("mlp", "passed")], [r.failure_text() for r in records]


@pytest.mark.parametrize("torch_optimizer, groups", [
    ("SGD", [(lambda path, leaf: leaf.ndim < 2, {"weight_decay": 0.0, "lr": 0.01})]),
    ("Adam", [(lambda path, leaf: path.endswith("b1"), {"weight_decay": 0.0}),
              (lambda path, leaf: leaf.ndim == 0, {"lr": 0.05})]),
    ("Rprop", [(lambda path, leaf: leaf.ndim < 2, {"lr": 0.001})]),
])
def test_per_group_hyperparameters_reach_both_sides(torch_optimizer, groups):
    extra = {"weight_decay": 1e-2, "momentum": 0.9} if torch_optimizer == "SGD" else (
        {"weight_decay": 1e-2} if torch_optimizer == "Adam" else {})
    # Rprop's mlp trajectory is left out as in the suite: a gradient sign decided by rounding
    checks = ("step", "quadratic") if torch_optimizer == "Rprop" else None
    pair = optimizer_pair("grouped", torch_optimizer, lr=0.02, groups=groups, checks=checks, **extra)
    assert any("param group" in part for part in pair.parts), pair.parts
    records = run_optimizer_pair(pair, dtype="float64", run=RUN)
    assert {r.outcome for r in records} == {"passed"}, [r.failure_text() for r in records]
    # the groups act: without them the torch side differs
    ungrouped = pair.replace(param_groups=())
    assert {r.outcome for r in run_optimizer_pair(ungrouped, dtype="float64", run=RUN)} == {"failed"}


@pytest.mark.parametrize("kw, words", [
    (dict(torch_optimizer="RMSprop", lr=1e-2, groups=[(lambda p, x: x.ndim < 2, {"alpha": 0.9})]),
     "param group 1 sets alpha=0.9 (the optimizer's: 0.99); equivcheck maps per-group weight_decay for this"),
    (dict(torch_optimizer="RMSprop", lr=1e-2, groups=[(lambda p, x: True, {}), (lambda p, x: x.ndim < 2, {"lr": 0.1})]),
     "param group 2 sets lr=0.1"),
    (dict(torch_optimizer="SGD", lr=1e-2, schedule=Schedule("StepLR", step_size=3),
          groups=[(lambda p, x: x.ndim < 2, {"lr": 0.1})]), "param group 1 sets lr=0.1 under a schedule"),
    (dict(torch_optimizer="Adam", lr=1e-2, groups=[(lambda p, x: True, {"momentum": 0.9})]),
     "param group 1 sets 'momentum', which the optimizer does not take"),
])
def test_param_groups_that_cannot_be_mapped_are_refused_at_construction(kw, words):
    with pytest.raises(ValueError) as err:
        optimizer_pair("x", **kw)
    assert words in str(err.value), str(err.value)


def test_grouped_optimizer_state_moves_to_optax_and_back_exactly():
    pair = optimizer_pair("adamw_groups", "AdamW", lr=1e-2, weight_decay=0.1, groups=NO_DECAY_ON_VECTORS)
    leaves = [torch.tensor(x, requires_grad=True) for x in jax.tree.leaves(PARAMS)]
    optimizer = _transformer_recipe(leaves)  # its own group order: matrices first
    for p in leaves:
        p.grad = torch.ones_like(p) * (1 + p.ndim)
    optimizer.step()
    treedef = jax.tree.structure(PARAMS)
    before = torch_to_neutral(optimizer, pair.state_map, treedef, 1, params=leaves)
    with jax.enable_x64(True):
        opt_state = optax_state_from_torch(pair, optimizer, PARAMS, leaves=leaves)
        assert compare(before, optax_to_neutral(opt_state, pair.state_map, 1), Tolerance(0, 0, "exact")).ok
        fresh_leaves = [torch.zeros_like(p, requires_grad=True) for p in leaves]
        fresh = _transformer_recipe(fresh_leaves)
        load_torch_state(pair, opt_state, fresh, PARAMS, leaves=fresh_leaves)
    verdict = compare(before, torch_to_neutral(fresh, pair.state_map, treedef, 1, params=fresh_leaves),
                      Tolerance(0, 0, "exact"))
    assert verdict.ok, verdict.message
    with pytest.raises(ValueError, match="has 2 param groups; pass leaves="):
        optax_state_from_torch(pair.replace(param_groups=()), optimizer, PARAMS)


def test_mismatched_pytrees_name_both_structures():
    pair = optimizer_pair("adam", "Adam", lr=1e-3)
    optimizer = torch.optim.Adam([torch.zeros(2, 3), torch.zeros(2)], lr=1e-3)
    with pytest.raises(ValueError) as err:
        optax_state_from_torch(pair, optimizer, PARAMS)
    text = str(err.value)
    assert "holds 2 parameters of shapes [(2, 3), (2,)]" in text and "3 leaves" in text and "['scale']" in text


def test_a_state_map_naming_a_field_optax_lacks_is_reported_with_the_fields():
    from equivcheck.optim.state import StateField, StateMap

    pair = OptimizerPair("wrong_map", lambda ps: torch.optim.Adam(ps, lr=1e-3), lambda: optax.sgd(1e-3),
                         StateMap((StateField("exp_avg", "mu"),)), checks=("step",))
    rec = run_optimizer_pair(pair, dtype="float32", run=RUN)[0]
    # the pair's declaration, not the optax side: a new user's trial read "the jax side raised KeyError"
    assert rec.outcome == "failed" and rec.side is None, rec.failure_text()
    assert "the pair's state_map names the optax field 'mu', which the optax state does not have; it has no fields" \
        in rec.message, rec.message
    assert "state_map is wrong, not either side" in rec.diagnosis


def _sgd_then(fn):
    def make():
        base = optax.sgd(0.05)

        def update(g, s, p=None):
            u, s = base.update(g, s, p)
            return fn(u), s
        return optax.GradientTransformation(base.init, update)
    return make


def test_updates_shaped_otherwise_than_the_parameters_are_refused_naming_the_leaf():
    """Each leaf's update summed to a scalar broadcasts in optax.apply_updates: the step check passed
    with error 0 on one seed and blamed torch for "applying each update one step late" on another."""
    pair = OptimizerPair("sgd_summed", lambda ps: torch.optim.SGD(ps, lr=0.05),
                         _sgd_then(lambda u: jax.tree.map(lambda x: x.sum(), u)), checks=("step",))
    for seed in (1, 3):
        (rec,) = run_optimizer_pair(pair, dtype="float32", run=RunSettings(examples=5, seed=seed))
        assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
        assert "has shape () where the parameter has" in rec.message and "broadcasts" in rec.message, rec.message
        assert "concurrent/futures" not in rec.message and "equivcheck/" not in rec.message, rec.message


def test_a_nan_step_on_one_side_is_blamed_on_that_side():
    """optax's last leaf times NaN read "undecided: the two sides compute different steps", and in
    float64 "the gap is at float32's level" (from the finite elements alone)."""
    def nan_last(u):
        leaves, tdef = jax.tree.flatten(u)
        return jax.tree.unflatten(tdef, leaves[:-1] + [leaves[-1] * np.nan])

    pair = OptimizerPair("sgd_nan_leaf", lambda ps: torch.optim.SGD(ps, lr=0.05), _sgd_then(nan_last),
                         checks=("step", "mlp"))
    for dtype in ("float32", "float64"):
        for rec in run_optimizer_pair(pair, dtype=dtype, run=RUN):
            assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
            assert "NaN or infinite" in rec.diagnosis and "torch's is finite" in rec.diagnosis, rec.diagnosis


@pytest.mark.parametrize("torch_optimizer, optax_transform, words", [
    (lambda ps: None, lambda: optax.sgd(0.05), "its torch_optimizer returned NoneType, not a torch.optim.Optimizer"),
    (lambda ps: torch.optim.SGD(ps, lr=0.05), lambda: (lambda g: g),
     "its optax_transform returned function, not an optax GradientTransformation"),
])
def test_a_factory_returning_the_wrong_thing_is_named(torch_optimizer, optax_transform, words):
    (rec,) = run_optimizer_pair(OptimizerPair("odd_factory", torch_optimizer, optax_transform, checks=("step",)),
                                dtype="float32", run=RUN)
    assert rec.outcome == "failed" and words in rec.message, rec.message
    assert "concurrent/futures" not in rec.message and "equivcheck/optim" not in rec.message, rec.message


def test_a_tolerance_override_must_state_its_reason():
    with pytest.raises(ValueError, match="must state its reason"):
        optimizer_pair("x", "SGD", lr=0.1, tolerance=Tolerance(1e-3, 1e-3))


STATEFUL = [p for p in OPTIMIZERS + SCHEDULES + GRADIENTS if not p.unavailable]


def _torch_run(pair, steps):
    leaves = [torch.tensor(x, requires_grad=True) for x in jax.tree.leaves(PARAMS)]
    optimizer = pair.torch_optimizer(leaves)
    scheduler = pair.torch_scheduler(optimizer) if pair.torch_scheduler else None
    rng = np.random.default_rng(0)
    for _ in range(steps):
        for p in leaves:
            p.grad = torch.tensor(rng.normal(size=p.shape))
        optimizer.step()
        if scheduler is not None:
            scheduler.step(1.0) if pair.schedule_takes_loss else scheduler.step()
    return leaves, optimizer, scheduler


@pytest.mark.parametrize("pair", STATEFUL, ids=str)
def test_optimizer_state_moves_to_optax_and_back_exactly(pair):
    _, optimizer, scheduler = _torch_run(pair, 3)
    treedef = jax.tree.structure(PARAMS)
    before = torch_to_neutral(optimizer, pair.state_map, treedef, 3, scheduler)
    with jax.enable_x64(True):
        opt_state = optax_state_from_torch(pair, optimizer, PARAMS, step=3, scheduler=scheduler)
        assert compare(before, optax_to_neutral(opt_state, pair.state_map, 3), Tolerance(0, 0, "exact")).ok
        _, fresh, fresh_sched = _torch_run(pair, 0)
        load_torch_state(pair, opt_state, fresh, PARAMS, step=3, scheduler=fresh_sched)
    after = torch_to_neutral(fresh, pair.state_map, treedef, 3, fresh_sched)
    verdict = compare(before, after, Tolerance(0, 0, "exact"))
    assert verdict.ok, verdict.message


def test_every_naive_port_is_listed_as_a_known_divergence():
    from pathlib import Path

    text = Path(__file__).parents[1].joinpath("suites", "known_divergences.txt").read_text()
    for port in NAIVE_PORTS:
        assert f"\n{port.name}::" in text, port.name
        assert port.reconcile and port.differs and port.measured


def test_a_misspelled_optimizer_is_refused_not_skipped():
    # it used to become a skip ("torch has no torch.optim.Adamm"): a typo turned into a green run
    from equivcheck.optim import optimizer_pair

    with pytest.raises(ValueError, match=r"no optimizer named 'Adamm' \(did you mean 'Adam'\?\)"):
        optimizer_pair("typo", "Adamm", lr=1e-2)


def test_a_wrong_state_map_is_named_as_the_map_not_a_side():
    """Adam's two moments read from each other's optax field: the parameters agree, the state
    does not; the diagnosis names the map and the state fields, and blames neither side."""
    from equivcheck.optim.state import StateField, StateMap

    swapped = StateMap((StateField("exp_avg", "nu"), StateField("exp_avg_sq", "mu")))
    pair = OptimizerPair("adam_swapped_map", lambda ps: torch.optim.Adam(ps, lr=1e-2), lambda: optax.adam(1e-2),
                         swapped, checks=("step",))
    (rec,) = run_optimizer_pair(pair, dtype="float64", run=RUN)
    assert rec.outcome == "failed" and rec.side is None, rec.failure_text()
    assert "only the optimizer state read through the pair's state_map differs ('exp_avg', 'exp_avg_sq'" \
        in rec.diagnosis, rec.diagnosis


def test_a_pair_of_your_own_without_a_state_map_passes_and_says_the_state_did_not_move():
    """The mlp check moved optax's state into a torch Adam that had no map for it and blamed
    torch (KeyError 'exp_avg'): without a StateMap nothing moves, and the record says so."""
    pair = OptimizerPair("plain_adam", lambda ps: torch.optim.Adam(ps, lr=1e-2), lambda: optax.adam(1e-2))
    records = run_optimizer_pair(pair, dtype="float64", run=RUN)
    assert [r.outcome for r in records] == ["passed"] * 3, [r.failure_text() for r in records]
    assert any("was not moved between frameworks" in n for n in records[-1].notes), records[-1].notes


def test_float64_reruns_widen_floats_and_keep_integer_leaves():
    # a user's problem may carry class labels, and torch keeps integer state; a float64 re-run
    # that turned them into floats would feed cross_entropy probabilities, not classes
    from equivcheck.optim.state import StateField, StateMap, widen, widen_state

    tree = {"x": np.ones(2, np.float32), "y": np.array([1, 0], np.int64), "h": np.ones(1, np.float16)}
    out = widen(tree)
    assert out["x"].dtype == np.float64 and out["h"].dtype == np.float64
    assert out["y"].dtype == np.int64 and out["y"].tolist() == [1, 0]
    state = widen_state({"step": 3, "exp_avg": {"w": np.ones(2, np.float32)}, "count": np.int32(3)},
                        StateMap((StateField("exp_avg", "mu"),)))
    assert state["exp_avg"]["w"].dtype == np.float64 and state["step"] == 3 and state["count"].dtype == np.int32
