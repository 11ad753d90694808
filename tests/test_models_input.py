"""Bad input to model pairs: a clear message naming the layer, key or side, never a crash."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Custom, Inputs, Static
from equivcheck.engine.records import RunSettings
from equivcheck.models import ModelPair, mse
from equivcheck.models.zoo import MLP, MLP_INPUTS, mlp_apply, mlp_naive_apply, mlp_pair

RUN = RunSettings(examples=3, seed=1, shrink_seconds=2)


def forward(pair, dtype="float32"):
    (rec,) = pair.replace(checks=("forward",)).run_checks(dtype=dtype, run=RUN)
    return rec


def test_params_tree_not_matching_the_mapping_names_the_key():
    own = {"fc1": {"kernel": np.zeros((10, 10)), "bias": np.zeros(10)},
           "dense2": {"kernel": np.zeros((10, 1)), "bias": np.zeros(1)}}
    rec = forward(mlp_pair("bad_tree", jax_params=lambda: own))
    assert rec.outcome == "failed" and rec.kind == "error"
    assert "['dense2']" in rec.message and "weight mapping" in rec.message


def test_params_tree_of_another_shape_names_the_key():
    own = {"fc1": {"kernel": np.zeros((10, 10)), "bias": np.zeros(10)},
           "fc2": {"kernel": np.zeros((1, 10)), "bias": np.zeros(1)}}
    rec = forward(mlp_pair("bad_shape_tree", jax_params=lambda: own))
    assert rec.outcome == "failed" and "['fc2']['kernel'] has shape (10, 1), the port expects (1, 10)" in rec.message


def test_output_of_another_shape():
    rec = forward(mlp_pair("bad_out", lambda p, x, train=False: mlp_apply(p, x)[:, 0]))
    assert rec.outcome == "failed" and rec.kind == "shape", rec.message
    assert "out" in rec.message


def test_naive_port_shows_the_shape_error_and_the_first_diverging_layer():
    rec = forward(mlp_pair("naive", mlp_naive_apply))
    assert rec.outcome == "failed" and rec.side == "jax"
    assert "jax side raised TypeError" in rec.message and "(1,) and (10,)" in rec.message
    assert "first diverging layer: fc1 (Linear)" in rec.diagnosis and "untransposed" in rec.diagnosis
    assert "the port raised after act: TypeError" in rec.diagnosis


class Raises(MLP):
    def forward(self, x):
        raise RuntimeError("torch model broke")


def test_a_torch_model_that_raises():
    rec = forward(ModelPair("raises", Raises, mlp_apply, MLP_INPUTS, loss=mse(), checks=("forward",)))
    assert rec.outcome == "failed" and rec.side == "torch" and "torch model broke" in rec.message


def test_a_port_that_raises_names_its_line():
    def port(params, x, train=False):
        raise ValueError("port broke")

    rec = forward(mlp_pair("port_raises", port))
    assert rec.outcome == "failed" and rec.side == "jax"
    assert "port broke" in rec.message and "test_models_input.py" in rec.message


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(10, 1)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_a_module_no_converter_knows_is_named():
    pair = ModelPair("unknown_module", Scaled, lambda p, x, train=False: x, MLP_INPUTS, loss=mse(), checks=("forward",))
    rec = forward(pair)
    assert rec.outcome == "failed" and "'<root>' (Scaled) holds scale" in rec.message and "weights.Rule" in rec.message


def test_a_port_reading_a_missing_key():
    rec = forward(mlp_pair("missing_key", lambda p, x, train=False: x @ p["dense"]["kernel"]))
    assert rec.outcome == "failed" and "KeyError" in rec.message and "dense" in rec.message


@pytest.mark.parametrize("kw, match", [
    ({"checks": ("train",), "optimizer": None}, "needs an optimizer"),
    ({"checks": ("sideways",)}, "not among"),
    ({"name": "a b"}, "letters, digits"),
    ({"steps": 0, "checks": ("forward",)}, "positive int"),
])
def test_model_pair_refuses_bad_declarations(kw, match):
    base = dict(name="m", torch_model=MLP, jax_apply=mlp_apply, inputs=MLP_INPUTS, loss=mse())
    with pytest.raises((ValueError, TypeError), match=match):
        ModelPair(**{**base, **kw})


def test_port_dropout_without_a_torch_mask_names_it():
    from equivcheck.models import capturing, dropout

    with capturing({"drop": np.ones((2, 3), bool)}), pytest.raises(KeyError, match="'other'"):
        dropout("other", jnp.ones((2, 3)), 0.5, True)


def _broken_rule_pair(sampler):
    return mlp_pair("broken_rule", checks=("forward", "train")).replace(
        inputs=Inputs(Custom(sampler, ((1, 10), (1, 1))), MLP_INPUTS.args))


@pytest.mark.parametrize("sampler, words", [
    (lambda rng: 1 / 0, "raised ZeroDivisionError"),
    (lambda rng: ((2, 10),), "returned ((2, 10),), which is not a tuple of 2 shapes"),
    (lambda rng: "shapes", "which is not a tuple of 2 shapes"),
], ids=["raises", "one_shape", "garbage"])
def test_a_shape_rule_that_raises_or_returns_garbage_fails_every_check_with_a_record(sampler, words):
    records = _broken_rule_pair(sampler).run_checks(dtype="float32", run=RUN)
    assert [(r.check, r.outcome, r.kind) for r in records] == [("forward", "failed", "error"), ("train", "failed", "error")]
    for rec in records:
        assert rec.message.startswith("the shape rule of model pair 'broken_rule' ") and words in rec.message, rec.message
        assert "neither side ran" in rec.diagnosis


class ScaledMLP(MLP):
    def forward(self, x, k):
        return super().forward(x) * k


def test_a_static_input_in_a_train_check_is_a_failed_record_naming_it():
    inputs = Inputs(Custom(lambda rng: ((2, 10), (2, 1)), ((2, 10), (2, 1))), (MLP_INPUTS.args[0], Static((2.0,)),
                                                                           MLP_INPUTS.args[1]))
    pair = mlp_pair("static_train", lambda p, x, k, train=False: mlp_apply(p, x) * k, checks=("train",)).replace(
        torch_model=ScaledMLP, inputs=inputs)
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.kind == "error", rec.failure_text()
    assert "train batches: input 1 is Static" in rec.message, rec.message
