"""Correct ports, written as users write them, pass: each defect that made one fail (issue 12,
section 3) is a case here, asserting the right outcome and, where a port is wrong, the message
that says what to change."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from equivcheck import Custom, Floats, Inputs, Lengths, Mask
from equivcheck.engine.records import RunSettings
from equivcheck.layers import flax_bridge
from equivcheck.models import ModelPair, mse
from equivcheck.models import mapping as mm
from equivcheck.models.zoo import (
    MATMUL,
    GRUClassifier,
    _attention,
    _dense,
    cnn_apply,
    cnn_pair,
    gru_pair,
    planted,
)
from equivcheck.optim import optimizer_pair
from equivcheck.weights import convert

RUN = RunSettings(examples=3, seed=20261126, shrink_seconds=5)


def outcomes(records):
    return {r.check: r.outcome for r in records}


def failures(records):
    return [r.failure_text() for r in records if r.outcome != "passed"]


# --------------------------------------------------------------------------- 1. GRU gradients


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_gradients_go_back_by_the_chain_rule(bidirectional):
    """The summed r/z biases of convert's GRU tree: both torch biases get the summed leaf's
    gradient; the n gate's two stay apart; fused gate rows are their gates' gradients joined.
    (The inverse layout gave bias_ih_l0 the hidden side's [0, 0, g_hn].)"""
    gru = torch.nn.GRU(2, 3, num_layers=2, bidirectional=bidirectional)
    sd = {k: v.detach().numpy().copy() for k, v in gru.state_dict().items()}
    tree = convert.to_jax("gru", sd)
    rng = np.random.default_rng(0)
    cot = jax.tree.map(lambda a: rng.standard_normal(np.shape(a)).astype(np.float32), tree)
    got = mm.chain_rule(lambda s: convert.to_jax("gru", s), sd, cot)
    for k, layer in enumerate(cot):
        cells = {"": layer["forward_rnn"]["cell"], "_reverse": layer["backward_rnn"]["cell"]} if bidirectional \
            else {"": layer}
        for sfx, g in cells.items():
            assert np.array_equal(got[f"bias_ih_l{k}{sfx}"], np.concatenate([g[n]["bias"] for n in ("ir", "iz", "in")]))
            assert np.array_equal(got[f"bias_hh_l{k}{sfx}"], np.concatenate([g[n]["bias"] for n in ("ir", "iz", "hn")]))
            assert np.array_equal(got[f"weight_ih_l{k}{sfx}"],
                                  np.concatenate([g[n]["kernel"].T for n in ("ir", "iz", "in")]))


def test_a_gru_models_gradients_match_torch_by_name():
    """The model mapping keeps both biases as leaves; the port's gradients, mapped back, are
    torch's own (bias_ih_l0 included) under the grad check's tolerance."""
    pair = gru_pair("gru_grad_names", checks=("grad",))
    (rec,) = pair.run_checks(dtype="float64", run=RUN)
    assert rec.outcome == "passed", rec.failure_text()
    model = GRUClassifier()
    ents = mm.entries(model)
    state = mm.to_jax(ents, {k: v.detach().numpy() for k, v in model.state_dict().items()})[0]
    assert {"bias"} <= set(state["gru"][0]["hr"]) and {"bias"} <= set(state["gru"][0]["ir"])


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_gru_models_pass_forward_grad_and_train(layers, bidirectional):
    pair = gru_pair(f"gru_{layers}_{bidirectional}", layers, bidirectional, checks=("forward", "grad", "train"))
    records = pair.run_checks(dtype="float32", run=RUN)
    assert outcomes(records) == dict.fromkeys(("forward", "grad", "train"), "passed"), failures(records)


# --------------------------------------------------------------------------- 2. mask inputs


class MaskedPool(torch.nn.Module):
    """A Linear per position, summed over the positions a boolean mask keeps."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x, keep):
        return (self.fc(x) * keep[..., None]).sum(1)


def masked_pool_apply(params, x, keep, train=False):
    return ((x @ params["fc"]["kernel"] + params["fc"]["bias"]) * keep[..., None]).sum(1)


def _seq_shapes(width):
    return Custom(lambda rng: ((b := int(rng.integers(1, 4)), n := int(rng.integers(2, 6)), width), (b, n), (b, 2)),
                  ((1, 2, width), (1, 2), (1, 2)))


def test_a_mask_input_is_drawn_for_train_batches():
    """Mask() inputs crashed the train check ("train batches are drawn for Floats and Ints
    inputs, not Mask") and its records never reached the report."""
    pair = ModelPair("masked_pool", MaskedPool, masked_pool_apply,
                     Inputs(_seq_shapes(3), (Floats(-1, 1), Mask(), Floats(-1, 1))), loss=mse(),
                     optimizer=optimizer_pair("masked_pool.sgd", "SGD", lr=0.1), steps=3, checks=("forward", "train"))
    records = pair.run_checks(dtype="float32", run=RUN)
    assert outcomes(records) == {"forward": "passed", "train": "passed"}, failures(records)


class MaskedAttention(torch.nn.Module):
    """Self-attention with a key padding mask (True = padding), mean-pooled, then a Linear."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(4, 2, bias=False, batch_first=True)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, pad):
        return self.head(self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0].mean(1))


def masked_attention_apply(params, x, pad, train=False):
    b, n, _ = x.shape
    keep = flax_bridge.attention_mask(2, n, n, b, key_padding_mask=pad)
    return _dense(params["head"], _attention(params["attn"], x, keep).mean(1))


def test_a_masked_attention_port_is_checked_with_lengths_masks():
    """Lengths(padding=True): torch's key_padding_mask with padding as a suffix and a key kept
    in every row, so no row is NaN; forward, gradients and training agree."""
    pair = ModelPair("masked_attention", MaskedAttention, masked_attention_apply,
                     Inputs(_seq_shapes(4), (Floats(-1, 1), Lengths(padding=True), Floats(-1, 1))), loss=mse(),
                     optimizer=optimizer_pair("masked_attention.adam", "Adam", lr=1e-2), steps=3,
                     checks=("forward", "grad", "train"), tags=MATMUL)
    records = pair.run_checks(dtype="float32", run=RUN)
    assert outcomes(records) == dict.fromkeys(("forward", "grad", "train"), "passed"), failures(records)


# --------------------------------------------------------------------------- 4. stateful ports


def test_a_port_returning_statistics_undeclared_is_told_to_set_stateful():
    """The CNN's port returns (output, BatchNorm statistics): without stateful=True it compared
    as "jax gives list of 2"."""
    pair = cnn_pair("cnn_undeclared", checks=("forward",)).replace(stateful=False)
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "the port returns statistics: set stateful=True" in rec.message, rec.message


def test_a_stateful_port_returning_a_bare_output_in_eval_mode_is_named():
    def port(params, x, train=False):
        out, stats = cnn_apply(params, x, train)
        return (out, stats) if train else out

    (rec,) = cnn_pair("cnn_bare_eval", port, checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "stateful=True, but the port returns a bare output" in rec.message, rec.message
    assert "in eval mode too" in rec.message


# --------------------------------------------------------------------------- 5. dropout masks


def test_a_port_drawing_its_own_dropout_masks_is_told_so():
    (rec,) = cnn_pair("cnn_own_masks", planted(cnn_apply, own_dropout=True), checks=("modes",)).run_checks(
        dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "dropout masks differ" in rec.diagnosis and "(drop)" in rec.diagnosis, rec.diagnosis
    assert "equivcheck.models.dropout(name, x, rate, train)" in rec.diagnosis, rec.diagnosis


def test_a_port_applying_torchs_masks_gets_no_dropout_hint():
    (rec,) = cnn_pair("cnn_masks", checks=("modes",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "passed", rec.failure_text()
