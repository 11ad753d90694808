"""Outputs whose shapes are the cause (equivcheck.models.calls.shape_cause): an `output=`
selection of another shape on one side, or one the loss does not take, is named as a
structural mismatch with the side whose selection it is; the record's side and its text agree,
and no side is blamed for the numeric differences that follow from it."""
from __future__ import annotations

import pytest
import torch

from equivcheck import Fixed, Floats, Inputs
from equivcheck.models import ModelPair, mse
from equivcheck.optim import optimizer_pair
from tests.test_models_mapping import RUN, KeywordClassifier, _keyword_pair, keyword_port

PORT_TALK = ("the port differs", "port's head", "first diverging layer")


class ExtraDimLogits(KeywordClassifier):
    """torch's logits come out (batch, 1, classes): cross_entropy against (batch,) labels raises."""

    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        return {**out, "logits": out["logits"][:, None, :]}


def extra_dim_port(*args, **kw):
    out = keyword_port(*args, **kw)
    return {**out, "logits": out["logits"][:, None, :]}


@pytest.mark.parametrize("side", ["torch", "jax"])
def test_a_selection_of_another_shape_on_one_side_is_named_on_that_side(side):
    pair = _keyword_pair(f"kw_shape_{side}", output="logits")
    pair = pair.replace(torch_model=ExtraDimLogits) if side == "torch" else pair.replace(jax_apply=extra_dim_port)
    whose = {"torch": "torch's", "jax": "the port's"}[side]
    for rec in pair.run_checks(dtype="float32", run=RUN):
        text = rec.failure_text()
        assert rec.outcome == "failed" and rec.side == side, text
        assert "the outputs have different shapes (ModelPair(output='logits') picks them)" in rec.diagnosis, text
        assert f"{whose} output does not suit the loss (cross_entropy)" in rec.diagnosis, text
        assert f"{whose} output= selection (or the shape of what it picks) is off" in rec.diagnosis, text
        assert not any(p in rec.diagnosis for p in PORT_TALK), text


def test_a_selection_neither_loss_takes_is_named_on_both_sides():
    """Both sides pick hidden_states, (batch, tokens, features): the same shape on each, so it is
    not the port; cross_entropy refuses it in torch and in optax alike."""
    records = _keyword_pair("kw_hidden", output="hidden_states", checks=("grad", "train")).run_checks(
        dtype="float32", run=RUN)
    for rec in records:
        text = rec.failure_text()
        assert rec.outcome == "failed" and rec.side == "both", text
        assert "the output does not suit the loss (cross_entropy)" in rec.diagnosis, text
        assert "(ModelPair(output='hidden_states') picks them)" in rec.diagnosis, text
        assert "torch's loss raises" in rec.diagnosis and "the port's loss raises" in rec.diagnosis, text


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1)

    def forward(self, x):
        y = self.fc(x)
        return {"pred": y, "flat": y[:, 0]}


def flat_pred_port(p, x, train=False):
    y = x @ p["fc"]["kernel"] + p["fc"]["bias"]
    return {"pred": y[:, 0], "flat": y[:, 0]}


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # the very broadcast the test plants
def test_a_selection_that_broadcasts_in_torchs_loss_is_structural_not_numeric():
    """torch's "pred" is (4, 1) against a (4,) target: F.mse_loss broadcasts it to (4, 4) with a
    warning and trains on every output against every target, the port's (4,) does not. The
    trajectories then differ in value; the cause is the shape of torch's selection."""
    pair = ModelPair("reg_broadcast", Regressor, flat_pred_port, Inputs(Fixed((((4, 3), (4,)),)), (Floats(-1, 1),) * 2),
                     loss=mse(), optimizer=optimizer_pair("reg_broadcast.sgd", "SGD", lr=0.1), output="pred", steps=3,
                     checks=("forward", "train"))
    for rec in pair.run_checks(dtype="float64", run=RUN):
        text = rec.failure_text()
        assert rec.outcome == "failed" and rec.side == "torch", text
        assert "the outputs have different shapes (ModelPair(output='pred') picks them): torch [4, 1], the port [4]; " \
               "a structural mismatch, not a numeric difference" in rec.diagnosis, text
        assert "torch's loss broadcasts it against the target's [4] to [4, 4]" in rec.diagnosis, text
        assert not any(p in rec.diagnosis for p in PORT_TALK), text
