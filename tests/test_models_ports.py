"""Correct ports, written as users write them, pass: each defect that made one fail (issue 12,
section 3) is a case here, asserting the right outcome and, where a port is wrong, the message
that says what to change."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from equivcheck.engine.records import RunSettings
from equivcheck.models import mapping as mm
from equivcheck.models.zoo import GRUClassifier, gru_pair
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
